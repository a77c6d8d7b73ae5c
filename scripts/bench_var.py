"""Throughput of our VAR sampler (random weights), for comparison with the official one.

Setting of ../shared/reference/anchors_h100.md: 256x256 (10 scales), batch 8, cfg 4,
top-k 900, top-p 0.95, bf16 blocks, VAE decode included; median of 5 after 2 warm-ups.

  python scripts/bench_var.py --depth 16 --batch 8
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
  ap.add_argument("--depth", type=int, default=16)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--cfg", type=float, default=4.0)
  ap.add_argument("--top_k", type=int, default=900)
  ap.add_argument("--top_p", type=float, default=0.95)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--attn_impl", default="cudnn")
  a = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sparvar_jax import configs  # pylint: disable=g-import-not-at-top
  from sparvar_jax.families.var import VARSampling, var_generator  # pylint: disable=g-import-not-at-top
  from sparvar_jax.models.var import VAR  # pylint: disable=g-import-not-at-top
  from sparvar_jax.vae.var_vqvae import VQVAE  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(a.dtype)
  rngs = nnx.Rngs(0)
  t0 = time.perf_counter()
  var = VAR(configs.var_config(a.depth), rngs=rngs, dtype=dtype, param_dtype=dtype,
            attn_impl=a.attn_impl)
  vae = VQVAE(configs.VQVAEConfig(), rngs=rngs)
  gen = var_generator(var, vae, a.batch, VARSampling(cfg=a.cfg, top_k=a.top_k, top_p=a.top_p),
                     cache_dtype=dtype)
  build_s = time.perf_counter() - t0
  labels = (np.arange(a.batch) * 97) % 1000

  def once(seed):
    t = time.perf_counter()
    res = gen(labels, seed=seed, sync_each_scale=False)
    assert np.isfinite(res.image_BHW3).all()
    return time.perf_counter() - t, res

  t = time.perf_counter()
  once(0)
  first_s = time.perf_counter() - t
  for i in range(1, a.warmup):
    once(i)
  times = [once(100 + i)[0] for i in range(a.repeats)]
  # One synchronised run for the per-scale breakdown.
  res = gen(labels, seed=7, sync_each_scale=True)
  med = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  # The allocator peak includes XLA's autotuning scratch (it tries conv algorithms that
  # ask for tens of GiB); report the live footprint too: weights + KV cache.
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(var)) + jax.tree.leaves(nnx.state(vae)))
  cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      jax.eval_shape(lambda: var.init_cache(2 * a.batch, dtype))))
  print(json.dumps({
      "impl": "sparvar_jax", "attn_impl": a.attn_impl, "depth": a.depth, "batch": a.batch, "dtype": a.dtype,
      "median_s": med, "min_s": min(times), "max_s": max(times),
      "images_per_s": a.batch / med, "first_call_s_incl_compile": first_s, "build_s": build_s,
      "per_scale_ms": [round(x * 1e3, 2) for x in res.scale_seconds],
      "decode_ms": round(res.decode_seconds * 1e3, 2),
      "weights_gib": weights / 2**30, "kv_cache_gib": cache / 2**30,
      "peak_gib_incl_autotune": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
      "jax": jax.__version__, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
  main()
