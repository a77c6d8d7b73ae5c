"""Latency of our Infinity sampler (random weights) at 1024x1024, for comparison with the
official PyTorch model (../shared/baselines/official_infinity/bench_infinity.py).

Setting of ../shared/reference/anchors_h100.md: 13 scales (pn 1M, 1:1), cfg 4 (batch 2
inside), tau 1, bf16 blocks, random 64-token text features; median of 5 after 2
warm-ups; latency without and with VAE decode; per-scale breakdown; peak memory.

  python scripts/bench_infinity.py --model 2b
Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="2b", choices=["2b", "8b", "tiny"])
  ap.add_argument("--cfg", type=float, default=4.0)
  ap.add_argument("--tau", type=float, default=1.0)
  ap.add_argument("--text_len", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--attn_impl", default="cudnn")
  a = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sparvar_jax import configs, schedules  # pylint: disable=g-import-not-at-top
  from sparvar_jax.families.infinity import InfinitySampling, infinity_generator  # pylint: disable=g-import-not-at-top
  from sparvar_jax.models.infinity import Infinity  # pylint: disable=g-import-not-at-top
  from sparvar_jax.vae.bsq import BSQVAE  # pylint: disable=g-import-not-at-top

  cfg, vcfg = {"2b": (configs.INFINITY_2B, configs.BSQ_D32REG),
               "8b": (configs.INFINITY_8B, configs.BSQ_D56_PATCHIFY),
               "tiny": (configs.INFINITY_TINY_D32, configs.BSQ_D32REG)}[a.model]
  # tiny: a CPU smoke test of this script (fp32, xla attention).
  bf16 = jnp.float32 if a.model == "tiny" else jnp.bfloat16
  t0 = time.perf_counter()
  rngs = nnx.Rngs(0)
  model = Infinity(cfg, rngs=rngs, dtype=bf16, param_dtype=bf16, attn_impl=a.attn_impl)
  vae = BSQVAE(vcfg, rngs=rngs)
  sch = schedules.get_schedule(1.0, "1M")
  gen = infinity_generator(model, vae, sch, 1,
                          InfinitySampling(cfg=a.cfg, tau=a.tau, top_k=900, top_p=0.97),
                          text_len=a.text_len, cache_dtype=bf16)
  build_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  text = rng.standard_normal((1, a.text_len, cfg.text_channels)).astype(np.float32)
  lens = np.array([a.text_len])

  def once(seed, decode):
    t = time.perf_counter()
    res = gen(text, lens, seed=seed, decode=decode, sync_each_scale=False)
    jax.block_until_ready(res.latent)
    return time.perf_counter() - t, res

  t = time.perf_counter()
  once(0, True)
  first_s = time.perf_counter() - t
  for i in range(1, a.warmup):
    once(i, True)
  no_dec = [once(100 + i, False)[0] for i in range(a.repeats)]
  with_dec = [once(200 + i, True)[0] for i in range(a.repeats)]
  res = gen(text, lens, seed=7, decode=True, sync_each_scale=True)
  assert np.isfinite(res.image_BHW3).all()
  stats = jax.devices()[0].memory_stats() or {}
  # The allocator peak includes XLA's autotuning scratch; report weights + KV cache too.
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)) + jax.tree.leaves(nnx.state(vae)))
  cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      jax.eval_shape(lambda: model.init_cache(2, sch, bf16))))
  print(json.dumps({
      "impl": "sparvar_jax", "model": a.model, "attn_impl": a.attn_impl,
      "median_ms_no_decode": statistics.median(no_dec) * 1e3,
      "min_max_ms_no_decode": [min(no_dec) * 1e3, max(no_dec) * 1e3],
      "median_ms_with_decode": statistics.median(with_dec) * 1e3,
      "per_scale_ms": [round(x * 1e3, 2) for x in res.scale_seconds],
      "decode_ms": round(res.decode_seconds * 1e3, 2),
      "first_call_s_incl_compile": first_s, "build_s": build_s,
      "weights_gib": weights / 2**30, "kv_cache_gib": cache / 2**30,
      "peak_gib_incl_autotune": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
      "image_shape": list(res.image_BHW3.shape),
      "jax": jax.__version__, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
  main()
