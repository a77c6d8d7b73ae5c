"""Generation latency of Infinity at 1024x1024 under several attention plans, one process.

Random weights, bf16, batch 1 with CFG (2 rows inside), 13 scales (pn 1M, 1:1), random
64-token text features, no VAE decode in the totals (the official harness's setting,
../shared/reference/anchors_h100.md). Variants (--variants):
  dense           every layer dense (the model's --attn_impl, cuDNN by default)
  sparvar         SparVAR, the authors' setting (CS4A layers 0-10, CSLA above, decision 10)
  sparvar_blocks  SparVAR with block-granular CS4A (whole key blocks, block-sparse kernel)
  sparvar_skip2   + skip the last 2 scales
  sparvar_drop2   + no unconditional branch on the last 2 scales
  noattn          self-attention replaced by its queries (no attention at all): per scale,
                  t(variant) - t(noattn) is that variant's attention time
For each: the first call (compile + autotune, cold or from the persistent cache in
--cache_dir), whether a second image with a new prompt and seed traces any step again,
per-scale times (synced per scale), the median total of --repeats runs (one sync at the
end) and the allocator peak so far. Prints one JSON line.

  python scripts/bench_generate.py --model 2b --cache_dir /tmp/xla_cache
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("dense", "sparvar", "sparvar_blocks", "sparvar_skip2", "sparvar_drop2", "noattn")


@dataclasses.dataclass(frozen=True)
class NoAttention:
  """Self-attention output := its queries (measures everything but attention)."""
  kind = "none"
  consumes_state = False
  produces_state = False

  def __call__(self, q, k, v, kv_len, state=None, *, scale, impl, mask=None, layer=None):
    return q, None


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="2b", choices=["2b", "8b", "tiny"])
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--cfg", type=float, default=4.0)
  ap.add_argument("--text_len", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--attn_impl", default="cudnn")
  ap.add_argument("--kernels", default="auto", choices=["auto", "reference", "interpret"])
  ap.add_argument("--cache_dir", default=None, help="persistent compilation cache")
  a = ap.parse_args()
  names = [v for v in a.variants.split(",") if v]
  if set(names) - set(VARIANTS):
    ap.error(f"unknown variants {sorted(set(names) - set(VARIANTS))}; choose from {VARIANTS}")
  if a.cache_dir:
    os.environ["SPARVAR_COMPILE_CACHE"] = a.cache_dir

  from sparvar_jax import runner  # pylint: disable=g-import-not-at-top
  jax = runner.setup_jax()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sparvar_jax import configs, schedules  # pylint: disable=g-import-not-at-top
  from sparvar_jax.families.infinity import InfinityAdapter, InfinitySampling  # pylint: disable=g-import-not-at-top
  from sparvar_jax.generate import LoopOptions, ScaleLoop, row_keys  # pylint: disable=g-import-not-at-top
  from sparvar_jax.models.infinity import Infinity  # pylint: disable=g-import-not-at-top
  from sparvar_jax.sparse.config import SparVARConfig  # pylint: disable=g-import-not-at-top
  from sparvar_jax.sparse.plan import Segment, dense_plan, sparvar_plan  # pylint: disable=g-import-not-at-top
  from sparvar_jax.vae.bsq import BSQVAE  # pylint: disable=g-import-not-at-top

  cfg, vcfg = {"2b": (configs.INFINITY_2B, configs.BSQ_D32REG),
               "8b": (configs.INFINITY_8B, configs.BSQ_D56_PATCHIFY),
               "tiny": (configs.INFINITY_TINY_D32, configs.BSQ_D32REG)}[a.model]
  tiny = a.model == "tiny"  # a CPU smoke test of this script: fp32, XLA attention
  dt = jnp.float32 if tiny else jnp.bfloat16
  t0 = time.perf_counter()
  rngs = nnx.Rngs(0)
  model = Infinity(cfg, rngs=rngs, dtype=dt, param_dtype=dt,
                   attn_impl="xla" if tiny else a.attn_impl)
  vae = nnx.eval_shape(lambda: BSQVAE(vcfg, rngs=nnx.Rngs(0)))  # no decode: config only
  jax.block_until_ready(nnx.state(model))
  build_s = time.perf_counter() - t0
  sch = schedules.get_schedule(1.0, "1M")
  settings = InfinitySampling(cfg=a.cfg, tau=1.0, top_k=900, top_p=0.97)
  rng = np.random.default_rng(0)
  texts = [rng.standard_normal((1, a.text_len, cfg.text_channels)).astype(np.float32)
           for _ in range(2)]
  lens = np.array([a.text_len])

  def plan_of(name):
    if name == "noattn":
      return dataclasses.replace(dense_plan(sch, cfg.depth), scales=tuple(
          (Segment(0, cfg.depth, NoAttention()),) for _ in range(sch.num_scales)))
    if name == "dense":
      return dense_plan(sch, cfg.depth)
    granularity = "block" if name == "sparvar_blocks" else "token"
    return sparvar_plan(sch, cfg.depth, SparVARConfig(cs4a_granularity=granularity),
                        kernels=a.kernels)

  def options_of(name):
    return LoopOptions(skip_last_scales=2 if name.endswith("skip2") else 0,
                       drop_uncond_last_scales=2 if name.endswith("drop2") else 0)

  out = {"impl": "sparvar_jax", "model": a.model, "attn_impl": "xla" if tiny else a.attn_impl,
         "kernels": a.kernels, "build_s": build_s, "variants": {}}
  for name in names:
    adapter = InfinityAdapter(model, vae, sch, settings, text_len=a.text_len, cache_dtype=dt)
    loop = ScaleLoop(adapter, 1, plan_of(name), options_of(name))
    traced = []
    inner = adapter.transformer

    def counting(m, si, *rest, inner=inner, traced=traced):
      traced.append(si)
      return inner(m, si, *rest)

    adapter.transformer = counting

    def once(i, sync_each_scale=False, loop=loop):
      t = time.perf_counter()
      res = loop(texts[i % 2], lens, keys=row_keys(i, [0]), decode=False,
                 sync_each_scale=sync_each_scale)
      jax.block_until_ready(res.latent)
      return time.perf_counter() - t, res

    first_s, _ = once(0)
    n_traced = len(traced)
    once(1)  # another prompt and seed: nothing may be traced again
    retraced = len(traced) - n_traced
    _, per = once(2, sync_each_scale=True)
    totals = [once(3 + i)[0] for i in range(a.repeats)]
    stats = jax.devices()[0].memory_stats() or {}
    out["variants"][name] = {
        "first_call_s": first_s, "steps_traced_first_image": n_traced,
        "steps_traced_again_new_image": retraced,
        "median_ms_no_decode": statistics.median(totals) * 1e3,
        "min_max_ms_no_decode": [min(totals) * 1e3, max(totals) * 1e3],
        "per_scale_ms": [round(x * 1e3, 3) for x in per.scale_seconds],
        "peak_gib_so_far_incl_autotune": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
        "plan": loop.plan.describe()["scales"][-1],
    }
    print(json.dumps({name: out["variants"][name]}), file=sys.stderr, flush=True)
  v = out["variants"]
  if "noattn" in v:
    base = v["noattn"]["per_scale_ms"]
    for name, rec in v.items():
      if name != "noattn":
        rec["attention_ms_per_scale"] = [round(x - b, 3) for x, b in
                                         zip(rec["per_scale_ms"], base)]
    if "dense" in v:
      d = sum(v["dense"]["attention_ms_per_scale"][10:13])
      out["attention_ms_scales_10_12"] = {"dense": d}
      for name in ("sparvar", "sparvar_blocks"):
        if name in v:
          s = sum(v[name]["attention_ms_per_scale"][10:13])
          out["attention_ms_scales_10_12"][name] = s
          out["attention_ms_scales_10_12"][f"ratio_{name}"] = d / s if s > 0 else None
  if "dense" in v:
    out["median_ms_no_decode"] = v["dense"]["median_ms_no_decode"]  # gpu_check's ratio
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  out.update(weights_gib=weights / 2**30, jax=jax.__version__, device=str(jax.devices()[0]))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
