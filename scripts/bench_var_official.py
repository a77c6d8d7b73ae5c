"""Times the official PyTorch VAR sampler (baseline for scripts/bench_var.py).

The official FoundationVision/VAR source is never committed: extract it into an ignored
folder (`git archive HEAD models dist.py | tar -x -C .baseline/var_src`) and pass it
with --src. Random weights (build_vae_var's init), 256x256, bf16 autocast, VAE decode
included — the setting of ../shared/reference/anchors_h100.md.

  python scripts/bench_var_official.py --src .baseline/var_src --depth 16 --batch 8
Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import time


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--src", required=True)
  ap.add_argument("--depth", type=int, default=16)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--cfg", type=float, default=4.0)
  ap.add_argument("--top_k", type=int, default=900)
  ap.add_argument("--top_p", type=float, default=0.95)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  a = ap.parse_args()
  sys.path.insert(0, a.src)
  import torch  # pylint: disable=g-import-not-at-top
  from models import build_vae_var  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  dev = "cuda"
  vae, var = build_vae_var(device=dev, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096,
                           Cvae=32, ch=160, share_quant_resi=4, num_classes=1000,
                           depth=a.depth, shared_aln=False, attn_l2_norm=True)
  # build_vae_var turns off torch's built-in init for speed and VAR.init_weights only
  # covers the transformer, so the VQVAE would keep uninitialised memory (NaN images,
  # NaN sampling probabilities): give it small random weights.
  with torch.no_grad():
    for p in vae.parameters():
      p.normal_(0.0, 0.02)
    for name, p in var.named_parameters():
      if not torch.isfinite(p).all():
        raise RuntimeError(f"official VAR parameter {name} is not finite after init_weights")
  vae.eval()
  var.eval()
  for p in list(var.parameters()) + list(vae.parameters()):
    p.requires_grad_(False)
  labels = torch.arange(a.batch, device=dev) * 97 % 1000

  def once(seed):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", enabled=True, dtype=torch.bfloat16,
                                                cache_enabled=True):
      img = var.autoregressive_infer_cfg(B=a.batch, label_B=labels, cfg=a.cfg, top_k=a.top_k,
                                         top_p=a.top_p, g_seed=seed, more_smooth=False)
    torch.cuda.synchronize()
    assert torch.isfinite(img).all()
    return time.perf_counter() - t0

  for i in range(a.warmup):
    once(i)
  torch.cuda.reset_peak_memory_stats()
  times = [once(100 + i) for i in range(a.repeats)]
  med = statistics.median(times)
  print(json.dumps({"impl": "official_pytorch", "depth": a.depth, "batch": a.batch,
                    "median_s": med, "min_s": min(times), "max_s": max(times),
                    "images_per_s": a.batch / med,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "torch": torch.__version__}))


if __name__ == "__main__":
  main()
