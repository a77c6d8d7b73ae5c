"""SparVAR in the generation loop on tiny random models (CPU): the static pieces against
naive numpy, the plan's refusals, every kind against its pure-jnp reference (the Pallas
kernels in interpret mode), the "all keys" limit against dense, the residual path, and the
skip / drop-uncond options. The authors' own numbers are in test_sparvar_golden.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sparvar_jax import configs, schedules
from sparvar_jax.families.infinity import InfinitySampling, infinity_generator
from sparvar_jax.families.var import VARSampling, var_generator
from sparvar_jax.generate import LoopOptions, row_keys
from sparvar_jax.models.infinity import Infinity
from sparvar_jax.models.var import VAR
from sparvar_jax.sparse import cs4a, csla
from sparvar_jax.sparse.config import PlanError, SparVARConfig
from sparvar_jax.sparse.plan import dense_plan, sparvar_plan
from sparvar_jax.vae.bsq import BSQVAE
from sparvar_jax.vae.var_vqvae import VQVAE

SQUARE = ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8))
WIDE = ((1, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 8))
TINY_INF = configs.InfinityConfig(depth=3, embed_dim=64, num_heads=2, d_vae=32, block_chunks=1,
                                  text_channels=64, head_dim_pool=32)
# A SparVAR setting that fits the 6-scale schedules: decision scale 3, CS4A in layers 0-1,
# CSLA in layer 2, 16-query groups, 16-token blocks.
SMALL = SparVARConfig(decision_scale=3, top_keys=0.5, bound_layer=1, sink_scales=2,
                      csla_windows=(-1, -1, 1, 1, 3, 5), cs4a_bands=(3, 5), group_size=16,
                      key_multiple=16, block_size=16)
ALL_KEYS = dataclasses.replace(SMALL, top_keys=1.0, csla_windows=(99,) * 6, cs4a_bands=(99, 99))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ------------------------------------------------------------------ static pieces (numpy)


def _naive_csla(grids, qi, sinks, windows):
  """The CSLA rule, one (query, key) pair at a time, float32 projections."""
  cum = np.cumsum([0] + [h * w for h, w in grids])
  hq, wq = grids[qi]
  out = np.zeros((hq * wq, cum[qi + 1]), bool)
  for q in range(hq * wq):
    y, x = divmod(q, wq)
    for j in range(qi + 1):
      hj, wj = grids[j]
      for t in range(hj * wj):
        ky, kx = divmod(t, wj)
        if j < sinks:
          out[q, cum[j] + t] = True
        elif windows[j] >= 0:
          cy = np.round(np.float32(np.float32(y) / np.float32(hq)) * np.float32(hj))
          cx = np.round(np.float32(np.float32(x) / np.float32(wq)) * np.float32(wj))
          r = windows[j] // 2
          out[q, cum[j] + t] = abs(cy - ky) <= r and abs(cx - kx) <= r
  return out


@pytest.mark.parametrize("grids", [SQUARE, WIDE, tuple((w, h) for h, w in WIDE)],
                         ids=["square", "wide", "tall"])
def test_csla_token_mask_is_the_literal_rule(grids):
  for qi in (3, 4, 5):
    want = _naive_csla(grids, qi, 2, SMALL.csla_windows)
    np.testing.assert_array_equal(csla.csla_token_mask(qi, grids, 2, SMALL.csla_windows), want)
    np.testing.assert_array_equal(csla.csla_rule(qi, grids, 2, SMALL.csla_windows).token_mask(),
                                  want)


@pytest.mark.parametrize("h_div_w", [1.0, 0.75, 2.0, 0.333])
def test_csla_rule_on_infinity_templates(h_div_w):
  """The box tables equal the literal rule on real templates, square and non-square."""
  grids = schedules.get_schedule(h_div_w, "0.25M").scales
  windows = (-1,) * 5 + (1, 1, 3, 5, 7)
  for qi in (8, 9):
    np.testing.assert_array_equal(csla.csla_rule(qi, grids, 5, windows).token_mask(),
                                  csla.csla_token_mask(qi, grids, 5, windows))


def test_csla_block_density_at_the_last_1m_scale():
  # raster order, 128-token blocks: the paper's 83.5% block sparsity
  assert csla.csla_block_mask(12).density() == pytest.approx(0.164, abs=5e-4)


def test_group_map_and_bands_against_naive_numpy():
  for gt, gs in ((12, 9), (22, 12), (5, 3), (3, 5), (1, 4)):
    want = [min(max(int(np.round(np.float32((g + 0.5) / gt * gs - 0.5))), 0), gs - 1)
            for g in range(gt)]
    np.testing.assert_array_equal(cs4a.group_map(gt, gs), want)
  for grids in (SQUARE, WIDE):
    cum = np.cumsum([0] + [h * w for h, w in grids])
    for k, win in ((4, 3), (5, 5)):
      h, w = grids[k]
      band = cs4a.current_band(grids, k, win, 16, 16)
      r = (win - 1) // 2
      for g in range(band.shape[0]):
        keys = set()
        for q in range(16 * g, min(16 * (g + 1), h * w)):
          y, x = divmod(q, w)
          for dy in range(-r, win - r):
            for dx in range(-r, win - r):
              keys.add(int(cum[k] + min(max(y + dy, 0), h - 1) * w + min(max(x + dx, 0), w - 1)))
        assert keys <= set(band[g].tolist()), (grids, k, g)  # every window key is in the band
        assert np.all(np.diff(band[g]) == 1)  # contiguous
        assert cum[k] <= band[g][0] and band[g][-1] < cum[k + 1]  # inside the current scale


def test_assembled_lists_and_kv_shift_against_naive():
  rng = np.random.default_rng(0)
  grids, decision = SQUARE, 3
  cum = np.cumsum([0] + [h * w for h, w in grids])
  inds = rng.integers(0, cum[decision + 1], (2, 2, 1, 16)).astype(np.int32)  # G_3 = 1
  for k in (4, 5):
    lists = cs4a.later_scale_lists(grids, decision, k, (3, 5), 16, 16, "group")
    got = np.asarray(cs4a.assemble_lists(jnp.asarray(inds), lists))
    for g in range(got.shape[2]):
      g4 = cs4a.group_map(cs4a.num_groups(64, 16), cs4a.num_groups(36, 16))[g] if k == 5 else g
      want = list(inds[0, 1, 0]) + list(cs4a.current_band(grids, 4, 3, 16, 16)[g4])
      if k == 5:
        want += list(cs4a.current_band(grids, 5, 5, 16, 16)[g])
      np.testing.assert_array_equal(got[0, 1, g], want)
    shifted = cs4a.later_scale_lists(grids, decision, k, (3, 5), 16, 16, "kv_shift")
    got = np.asarray(cs4a.assemble_lists(jnp.asarray(inds), shifted))
    assert got.shape[-1] == 16
    sinks = int(cum[k - decision])
    for t, p in enumerate(inds[1, 0, 0][:16 - sinks]):
      j = int(np.searchsorted(cum, p, side="right") - 1)
      (hj, wj), (hp, wp) = grids[j], grids[j + k - decision]
      u, v = divmod(int(p - cum[j]), wj)
      assert got[1, 0, 0, sinks + t] == cum[j + k - decision] + min((u * hp // hj) * wp
                                                                    + v * wp // wj, hp * wp - 1)
    np.testing.assert_array_equal(got[1, 0, 0, :sinks], np.arange(sinks))


def test_block_tables_and_masks_against_naive():
  """Block mode: the static band blocks are the blocks holding the bands; the traced mask
  lists every table block once, the last (partial) key block in the partial list."""
  grids = WIDE
  lists = cs4a.later_scale_lists(grids, 3, 5, (3, 5), 16, 16, "group")
  source, table = cs4a.static_block_table(grids, 3, 5, (3, 5), 16, 16)
  np.testing.assert_array_equal(source, lists.source_G)
  for g in range(table.shape[0]):
    assert set(np.nonzero(table[g])[0]) == set((lists.static_GN[g] // 16).tolist())
  rng = np.random.default_rng(4)
  kv_len = 75  # five blocks of 16, the last partial
  t = rng.random((2, 1, 3, 5)) < 0.5
  m = cs4a.mask_from_table(jnp.asarray(t), q_len=40, kv_len=kv_len, block=16, max_blocks=5)
  types = m.block_types()
  np.testing.assert_array_equal(types > 0, t)
  assert (types[..., :4][t[..., :4]] == 2).all() and (types[..., 4][t[..., 4]] == 1).all()
  blocks = jnp.asarray(rng.integers(0, 5, (2, 1, 2, 2)), jnp.int32)
  got = np.asarray(cs4a.block_table(blocks, 5))
  for idx in np.ndindex(2, 1, 2):
    assert set(np.nonzero(got[idx])[0]) == set(np.asarray(blocks[idx]).tolist())


def test_topk_and_column_sums_against_numpy():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 2, 16)), jnp.float32) for _ in range(3))
  o, cs = cs4a.dense_colsum_reference(q, k, v, group_size=16, scale=0.25)
  p = jax.nn.softmax(np.einsum("blhc,bshc->bhls", q, k) * 0.25, axis=-1)
  want = np.stack([np.asarray(p)[:, :, g * 16:(g + 1) * 16].sum(2) for g in range(3)], 2)
  np.testing.assert_allclose(cs, want, rtol=1e-5, atol=1e-6)
  idx = np.asarray(cs4a.topk_indices(cs, 7))
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(np.argsort(-want, -1)[..., :7], -1))


def test_upsampled_output_cache_is_torch_bilinear():
  x = np.random.default_rng(2).standard_normal((2, 5 * 7, 3, 4)).astype(np.float32)
  got = np.asarray(cs4a.upsample_cache(jnp.asarray(x), (5, 7), (8, 11)))
  t = torch.from_numpy(x).reshape(2, 5, 7, 12).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(t, size=(8, 11), mode="bilinear",
                                         align_corners=False).permute(0, 2, 3, 1)
  np.testing.assert_allclose(got, want.reshape(2, 88, 3, 4).numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the plan


def test_plan_refuses_settings_that_do_not_fit():
  sch = schedules.custom_schedule(SQUARE)
  with pytest.raises(PlanError, match="decision_scale=5"):
    sparvar_plan(sch, 3, dataclasses.replace(SMALL, decision_scale=5))
  with pytest.raises(PlanError, match="csla_windows has 3 entries"):
    sparvar_plan(sch, 3, dataclasses.replace(SMALL, csla_windows=(1, 1, 1)))
  with pytest.raises(PlanError, match="cs4a_bands has 1 entries"):
    sparvar_plan(sch, 3, dataclasses.replace(SMALL, cs4a_bands=(3,)))
  with pytest.raises(PlanError, match="sink_scales=4 exceeds"):
    sparvar_plan(sch, 3, dataclasses.replace(SMALL, sink_scales=4))
  with pytest.raises(PlanError, match="too short"):
    sparvar_plan(schedules.custom_schedule(SQUARE[:2]), 3, SparVARConfig())
  with pytest.raises(PlanError, match="top_keys"):
    SparVARConfig(top_keys=0.0)
  with pytest.raises(PlanError, match="mapping"):
    SparVARConfig(mapping="nearest")
  # defaults on other schedules: 0.06M (7 scales) leaves the decision scale before the sinks
  with pytest.raises(PlanError, match="sink_scales=5 exceeds the decision scale 4"):
    sparvar_plan(schedules.get_schedule(1.0, "0.06M"), 32)


def test_default_rule_on_other_schedules():
  """The authors' setting generalises by rule: VAR-d36 at 512 px and every Infinity
  template at 1M resolve, with the decision scale third-last and windows aligned to the end."""
  d36 = configs.var_config(36, resolution=512)
  plan = sparvar_plan(schedules.square_schedule(d36.patch_nums), d36.depth)
  sv = plan.sparvar
  assert sv.decision == 7 and sv.windows[-5:] == (1, 1, 3, 5, 7) and sv.bands == (7, 9)
  assert [s.kind for s in plan.segments(8)] == ["cs4a", "csla"]
  for t in schedules.H_DIV_W_TEMPLATES:
    sch = schedules.get_schedule(t, "1M")
    sv = sparvar_plan(sch, 32).sparvar
    assert sv.decision == 10 and sv.budget % 112 == 0
    for k in (10, 11, 12):  # the static pieces build on non-square grids
      sv.csla_mask(k)
      if k > 10:
        assert sv.lists(k).static_GN.shape[0] == cs4a.num_groups(sch.lengths[k], 192)


# ------------------------------------------------------------------- generation (tiny)


@pytest.fixture(scope="module")
def tiny():
  model = Infinity(TINY_INF, rngs=nnx.Rngs(0))
  vae = nnx.eval_shape(lambda: BSQVAE(configs.BSQ_DEMO, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(3)
  feats = rng.standard_normal((2, 7, TINY_INF.text_channels)).astype(np.float32)
  return model, vae, feats, [4, 7]


def _run(tiny, grids, plan_fn, *, forced=None, options=LoopOptions(), cfg=3.0, **kw):
  model, vae, feats, lens = tiny
  sch = schedules.custom_schedule(grids)
  gen = infinity_generator(model, vae, sch, 2, InfinitySampling(cfg=cfg, top_k=1),
                           text_len=8, plan=plan_fn(sch), options=options)
  return gen(feats, lens, forced=forced, return_logits=True, decode=False, **kw)


@pytest.mark.parametrize("grids,granularity", [(SQUARE, "token"), (WIDE, "token"),
                                               (WIDE, "block")],
                         ids=["square", "wide", "wide-blocks"])
def test_interpret_kernels_equal_the_reference_plan(tiny, grids, granularity):
  """The whole plan with the Pallas kernels (interpret mode) against the pure-jnp one."""
  cfg = dataclasses.replace(SMALL, cs4a_granularity=granularity)
  ref = _run(tiny, grids, lambda s: sparvar_plan(s, 3, cfg, kernels="reference"),
             return_state=True)
  forced = ref.tokens_per_scale
  ker = _run(tiny, grids, lambda s: sparvar_plan(s, 3, cfg, kernels="interpret"),
             forced=forced, return_state=True)
  for si in range(6):
    assert rel(ker.logits_per_scale[si], ref.logits_per_scale[si]) < 1e-5, si
  np.testing.assert_array_equal(np.sort(ker.sparse_state.indices_BHGK, -1),
                                np.sort(ref.sparse_state.indices_BHGK, -1))
  dense = _run(tiny, grids, lambda s: dense_plan(s, 3), forced=forced)
  for si in range(3):  # before the decision scale: the same computation
    np.testing.assert_array_equal(ref.logits_per_scale[si], dense.logits_per_scale[si])
  assert rel(ref.logits_per_scale[5], dense.logits_per_scale[5]) > 1e-3  # sparse is sparse


@pytest.mark.parametrize("csla_granularity,cs4a_granularity", [("block", "token"),
                                                             ("exact", "block")])
def test_all_keys_budget_equals_dense(tiny, csla_granularity, cs4a_granularity):
  cfg = dataclasses.replace(ALL_KEYS, csla_granularity=csla_granularity,
                            cs4a_granularity=cs4a_granularity)
  dense = _run(tiny, SQUARE, lambda s: dense_plan(s, 3))
  sparse = _run(tiny, SQUARE, lambda s: sparvar_plan(s, 3, cfg, kernels="reference"),
                forced=dense.tokens_per_scale)
  for si in range(6):
    assert rel(sparse.logits_per_scale[si], dense.logits_per_scale[si]) < 1e-5, si


def test_output_cache_is_the_residual_of_the_decision_scale(tiny):
  """With the cache, a later scale's output is the upsampled O_dense - O_sparse plus the
  sparse attention: the cache must be O_dense - O_sparse at the decision scale (zero with
  every key selected), and turning it off changes the later scales only."""
  with_cache = _run(tiny, SQUARE, lambda s: sparvar_plan(s, 3, SMALL, kernels="reference"),
                    return_state=True)
  forced = with_cache.tokens_per_scale
  oc = with_cache.sparse_state.o_cache_BlHc  # [L, B, l, H, c]
  assert oc.shape == (2, 4, 16, 2, 32) and np.abs(oc).max() > 1e-3
  no_cache = _run(tiny, SQUARE, lambda s: sparvar_plan(
      s, 3, dataclasses.replace(SMALL, output_cache=False), kernels="reference"), forced=forced,
                  return_state=True)
  assert no_cache.sparse_state.o_cache_BlHc is None
  for si in range(4):
    np.testing.assert_array_equal(no_cache.logits_per_scale[si], with_cache.logits_per_scale[si])
  assert rel(no_cache.logits_per_scale[5], with_cache.logits_per_scale[5]) > 1e-4
  full = _run(tiny, SQUARE, lambda s: sparvar_plan(s, 3, ALL_KEYS, kernels="reference"),
              forced=forced, return_state=True)
  assert np.abs(full.sparse_state.o_cache_BlHc).max() < 1e-5


def test_skip_last_scales(tiny):
  base = _run(tiny, SQUARE, lambda s: sparvar_plan(s, 3, SMALL, kernels="reference"))
  skip = _run(tiny, SQUARE, lambda s: sparvar_plan(s, 3, SMALL, kernels="reference"),
              options=LoopOptions(skip_last_scales=2))
  assert len(skip.tokens_per_scale) == 4 and skip.latent.shape == base.latent.shape
  for si in range(4):
    np.testing.assert_array_equal(skip.tokens_per_scale[si], base.tokens_per_scale[si])
  assert not np.array_equal(skip.latent, base.latent)


def test_drop_uncond_is_guidance_off_on_those_scales(tiny):
  """Dropping the unconditional rows on the last scale gives the conditional logits there,
  i.e. what cfg = 1 on that scale gives with the rows kept; earlier scales are unchanged."""
  plan = lambda s: sparvar_plan(s, 3, SMALL, kernels="reference")
  base = _run(tiny, SQUARE, plan)
  forced = base.tokens_per_scale
  drop = _run(tiny, SQUARE, plan, forced=forced, options=LoopOptions(drop_uncond_last_scales=1))
  cfg1 = _run(tiny, SQUARE, plan, forced=forced, cfg=[3.0] * 5 + [1.0])
  for si in range(5):
    np.testing.assert_array_equal(drop.logits_per_scale[si], base.logits_per_scale[si])
  assert rel(drop.logits_per_scale[5], cfg1.logits_per_scale[5]) < 1e-5
  assert rel(drop.logits_per_scale[5], base.logits_per_scale[5]) > 1e-3
  with pytest.raises(ValueError, match="drop_uncond_last_scales must be in"):
    _run(tiny, SQUARE, plan, options=LoopOptions(drop_uncond_last_scales=6))


def test_a_new_image_compiles_nothing(tiny):
  """The decision lists are traced operands: a second image with a new prompt and seed
  traces (hence compiles) no step again."""
  model, vae, feats, lens = tiny
  sch = schedules.custom_schedule(SQUARE)
  gen = infinity_generator(model, vae, sch, 2, InfinitySampling(), text_len=8,
                           plan=sparvar_plan(sch, 3, SMALL, kernels="reference"))
  traced = []
  inner = gen.adapter.transformer

  def counting(model, si, *a):
    traced.append(si)
    return inner(model, si, *a)

  gen.adapter.transformer = counting
  gen(feats, lens, seed=0, decode=False)
  assert traced == list(range(6))
  gen(feats[::-1].copy(), lens[::-1], seed=5, decode=False)
  assert traced == list(range(6))


def test_var_with_sparvar_and_per_image_keys():
  """VAR runs the same plans; image i's draws depend on its key only, not on its batch."""
  pns = (1, 2, 3, 4, 6, 8)
  var = VAR(dataclasses.replace(configs.VAR_TINY, depth=3, patch_nums=pns), rngs=nnx.Rngs(0))
  vae = VQVAE(configs.VQVAEConfig(vocab_size=512, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                  patch_nums=pns), rngs=nnx.Rngs(1))
  sch = schedules.square_schedule(pns)
  plan = sparvar_plan(sch, 3, dataclasses.replace(SMALL, csla_windows=(-1, -1, 1, 1, 3, 5)),
                      kernels="reference")
  s = VARSampling(cfg=1.5, top_k=50, top_p=0.9)
  two = var_generator(var, vae, 2, s, plan=plan)([3, 7], keys=row_keys(11, [0, 1]))
  one = var_generator(var, vae, 1, s, plan=plan)([7], keys=row_keys(11, [1]))
  for si in range(len(pns)):
    np.testing.assert_array_equal(two.tokens_per_scale[si][1], one.tokens_per_scale[si][0])
  np.testing.assert_allclose(two.image_BHW3[1], one.image_BHW3[0], atol=1e-5)
  assert two.plan.describe()["sparvar"]["decision_scale"] == 3
