"""Run as `python -m tests.sharded_check` with XLA_FLAGS=--xla_force_host_platform_device_count=4
(tests/test_generate_many.py does): the scale loop on a mesh of 4 CPU devices against one
device, on the random demo Infinity (0.06M). Prints one JSON line of findings; the test
asserts on them.

- data parallel (mesh 4 x 1, batch 4: a row per device) against batch 1 on one device, row
  by row: tokens, latents and images must be the same bits;
- model parallel (mesh 2 x 2, `infinity_param_specs`, batch 2) against batch 1 on one
  device: tokens and images the same bits, logits within float32 rounding of a different
  summation order (the split projections add partial sums across devices);
- where the parameters and the KV cache actually live, and which collectives the
  compiled steps hold (per layer: none for data parallel).
"""

import json
import re
import sys

import jax
import numpy as np
from flax import nnx


def _collectives_in_layer_loop(compiled_text: str) -> dict[str, int]:
  """Collectives inside while-loop bodies (the scan over layers), by kind."""
  counts = {"all-reduce": 0, "all-gather": 0, "all-to-all": 0, "collective-permute": 0}
  for comp in re.split(r"\n(?=\S.*\{\n)", compiled_text):
    head = comp.split("\n", 1)[0]
    if head.startswith("ENTRY"):
      continue
    for kind in counts:
      counts[kind] += len(re.findall(r"\s" + kind + r"(-start)?\(", comp))
  return counts


def main():
  assert len(jax.devices()) == 4, jax.devices()
  from sparvar_jax import configs, runner, sample_infinity, schedules, sharding
  from sparvar_jax.families.infinity import InfinityAdapter, InfinitySampling
  from sparvar_jax.generate import ScaleLoop, row_keys
  from sparvar_jax.models.infinity import Infinity
  from sparvar_jax.vae.bsq import BSQVAE

  runner.setup_jax()  # the persistent compilation cache, as the CLIs
  rngs = nnx.Rngs(0)
  model = Infinity(configs.INFINITY_DEMO, rngs=rngs)
  vae = BSQVAE(configs.BSQ_DEMO, rngs=rngs)
  sch = schedules.get_schedule(1.0, "0.06M")
  prompts = ["a red fox", "two cats on a sofa", "a boat", "the moon over a lake at night"]
  feats, lens = sample_infinity.demo_features(prompts, configs.INFINITY_DEMO.text_channels)
  keys = row_keys(0, range(4))
  settings = InfinitySampling()  # cfg 3, top-k 900, top-p 0.97: sampled, not greedy

  def loop(batch, mesh=None):
    return ScaleLoop(InfinityAdapter(model, vae, sch, settings, text_len=32), batch, mesh=mesh)

  single = loop(1)
  ref = [single(feats[i:i + 1], lens[i:i + 1], keys=keys[i:i + 1], return_logits=True)
         for i in range(4)]
  out = {}

  def same_bits(res, rows):
    return {
        "tokens": all(np.array_equal(res.tokens_per_scale[si][r], ref[i].tokens_per_scale[si][0])
                      for r, i in enumerate(rows) for si in range(sch.num_scales)),
        "latent": all(np.array_equal(res.latent[r], ref[i].latent[0]) for r, i in enumerate(rows)),
        "image": all(np.array_equal(res.image_BHW3[r], ref[i].image_BHW3[0])
                     for r, i in enumerate(rows)),
    }

  # Data parallel: a row per device.
  mesh = sharding.make_mesh()
  dp = loop(4, mesh)
  res = dp(feats, lens, keys=keys)
  out["dp"] = same_bits(res, [0, 1, 2, 3])
  arrays, k = sharding.put_rows((dp.adapter.prepare(4, feats, lens), keys), mesh)
  ctx, x, cache, latent = dp._begin(dp._mstate, dp._vstate, arrays)
  out["dp_cache_spec"] = str(cache.k.sharding.spec)
  out["dp_text_kv_spec"] = str(ctx.ca_k.sharding.spec)
  first = dp._step(0, False, False, 8).lower(dp._mstate, dp._vstate, x, ctx, cache, latent,
                                             None, k, dp.adapter.scalars(0), None)
  out["dp_layer_collectives"] = _collectives_in_layer_loop(first.compile().as_text())

  # Model parallel: weights split over 2 devices, 2 row groups.
  mesh2 = sharding.make_mesh(model_parallel=2)
  state = nnx.state(model)
  specs = sharding.infinity_param_specs(state, 2)
  nnx.update(model, sharding.place_params(state, mesh2, specs))
  blocks = nnx.state(model)["blocks"]
  out["mp_param_specs"] = {
      name: str(leaf.get_value().sharding.spec) for name, leaf in (
          ("sa.mat_qkv", blocks["sa"]["mat_qkv"]["kernel"]),
          ("sa.proj", blocks["sa"]["proj"]["kernel"]),
          ("ffn.fc1", blocks["ffn"]["fc1"]["kernel"]),
          ("ffn.fc2", blocks["ffn"]["fc2"]["kernel"]),
          ("ada_gss", blocks["ada_gss"]))}
  mp = loop(2, mesh2)
  res = mp(feats[:2], lens[:2], keys=keys[:2], return_logits=True)
  out["mp"] = same_bits(res, [0, 1])
  out["mp_logits_max_abs_diff"] = max(
      float(np.abs(res.logits_per_scale[si][r] - ref[r].logits_per_scale[si][0]).max())
      for r in range(2) for si in range(sch.num_scales))
  out["mp_logits_max_abs"] = max(float(np.abs(ref[r].logits_per_scale[si]).max())
                                 for r in range(2) for si in range(sch.num_scales))
  arrays, k = sharding.put_rows((mp.adapter.prepare(2, feats[:2], lens[:2]), keys[:2]), mesh2)
  ctx, x, cache, latent = mp._begin(mp._mstate, mp._vstate, arrays)
  out["mp_cache_spec"] = str(cache.k.sharding.spec)
  first = mp._step(0, False, False, 4).lower(mp._mstate, mp._vstate, x, ctx, cache, latent,
                                             None, k, mp.adapter.scalars(0), None)
  out["mp_layer_collectives"] = _collectives_in_layer_loop(first.compile().as_text())
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
