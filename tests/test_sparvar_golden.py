"""SparVAR against the authors' own code (shared/golden/sparvar_tiny): a depth-12 Infinity
of the 2B family (width 128, one head of 128) on the 13-scale 1024x1024 schedule, the
shipped SparVAR setting (our defaults), CFG 3, greedy.

What the fixture allows (its README and meta.json): the official cross-attention rounds q/kv
to bf16 even in float32, so teacher-forced logits agree to ~1e-2; the selected keys agree as
sets except where a column sum sits at the selection boundary; free-running bits agree
until the first near-tie. The static parts (group maps, bands, assembled lists, CSLA block
masks) are exact.
"""

import json
import os

import numpy as np
import pytest

from convert.infinity import convert_trees
from sparvar_jax import configs, schedules
from sparvar_jax.checkpoint import load_into
from sparvar_jax.families.infinity import InfinitySampling, infinity_generator
from sparvar_jax.models.infinity import abstract_infinity
from sparvar_jax.sparse import cs4a
from sparvar_jax.sparse.plan import SparVARConfig, dense_plan, sparvar_plan
from tests.conftest import golden_dir

# The fixture allows ~1e-2 (the official bf16 rounding of cross-attention amplifies float32
# noise); the authors' own code moves these logits by up to 8.3e-4 under 1e-6 relative input
# noise (meta.json noise_self_disagreement), and we agree with it to ~1e-4: hold that level.
TOL = 1e-3
_CACHE = {}


def fixture():
  if not _CACHE:
    d = golden_dir("sparvar_tiny")
    meta = json.load(open(os.path.join(d, "meta.json")))
    g = dict(np.load(os.path.join(d, "golden.npz")))
    vae_pth = os.path.join(golden_dir("infinity_tiny_d32"), "vae_tiny.pth")
    trees, cfgs, _ = convert_trees(os.path.join(d, "infinity_tiny.pth"), vae_pth)
    cfg = configs.config_from_dict(cfgs["infinity"])
    model = abstract_infinity(cfg, bf16_cross_attn=True)
    load_into(model, trees["infinity"])
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparvar_jax.vae.bsq import BSQVAE  # pylint: disable=g-import-not-at-top
    vae = nnx.eval_shape(lambda: BSQVAE(configs.config_from_dict(cfgs["vae"]),
                                        rngs=nnx.Rngs(0)))
    lens = [int(x) for x in g["text_lens"]]
    feats = np.zeros((2, max(lens), cfg.text_channels), np.float32)
    feats[0, :lens[0]] = g["text_features_prompt0"]
    feats[1, :lens[1]] = g["text_features_prompt1"]
    sch = schedules.get_schedule(1.0, "1M")
    assert [list(hw) for hw in sch.scales] == [s[1:] for s in meta["generation"]["scale_schedule"]]
    forced = [g["forced_bits_BLd"][:, a:b] for a, b in zip(sch.offsets[:-1], sch.offsets[1:])]
    _CACHE.update(meta=meta, g=g, cfg=cfg, model=model, vae=vae, feats=feats, lens=lens,
                  sch=sch, forced=forced)
  return _CACHE


def _gen(plan=None):
  f = fixture()
  st = f["meta"]["generation"]["settings"]
  return infinity_generator(f["model"], f["vae"], f["sch"], 2,
                            InfinitySampling(cfg=st["cfg"], tau=st["tau"], top_k=1, top_p=0.0),
                            text_len=16, plan=plan)


def _sparvar_plan():
  f = fixture()
  return sparvar_plan(f["sch"], f["cfg"].depth, SparVARConfig(), kernels="reference")


def test_plan_is_the_authors_dispatch():
  f = fixture()
  plan = _sparvar_plan()
  d = plan.describe()
  assert d["sparvar"]["decision_scale"] == 10 and d["sparvar"]["cs4a_layers"] == [0, 11]
  assert d["sparvar"]["csla_layers"] == [11, 12]
  assert d["sparvar"]["keys_per_group"] == {"10": {"keys": 784, "of": 4121},
                                           "11": {"keys": 1344, "of": 6425},
                                           "12": {"keys": 2128, "of": 10521}}
  for si in range(13):
    kinds = [(s.start, s.stop, s.kind) for s in plan.segments(si)]
    if si < 10:
      assert kinds == [(0, 12, "dense")]
    else:
      assert kinds == [(0, 11, "dense_colsum" if si == 10 else "cs4a"), (11, 12, "csla")]
  # the fixture's recorded counts
  g = f["g"]
  assert (g["cs4a_counts_scale10_LBHG"] == 784).all()
  assert (g["cs4a_counts_scale11_LBHG"] == 1344).all()
  assert (g["cs4a_counts_scale12_LBHG"] == 2128).all()


def test_static_maps_bands_lists_and_masks_are_exact():
  f = fixture()
  g, sv = f["g"], _sparvar_plan().sparvar
  grids = sv.grids
  np.testing.assert_array_equal(cs4a.group_map(12, 9), g["cs4a_group_map_scale11_G"])
  np.testing.assert_array_equal(cs4a.group_map(22, 12), g["cs4a_group_map_scale12_G"])
  np.testing.assert_array_equal(cs4a.current_band(grids, 11, 7, 192, 112),
                                g["cs4a_local_band_scale11_GK"])
  np.testing.assert_array_equal(cs4a.current_band(grids, 12, 9, 192, 112),
                                g["cs4a_local_band_scale12_GK"])
  # the lists of scales 11 and 12, assembled from the authors' own decision lists
  inds10 = g["cs4a_inds_scale10_LBHGK"].astype(np.int32)  # [L, B, H, G, K]
  for k in (11, 12):
    got = np.stack([np.asarray(cs4a.assemble_lists(inds10[l], sv.lists(k)))
                    for l in range(inds10.shape[0])])
    np.testing.assert_array_equal(got, g[f"cs4a_inds_scale{k}_LBHGK"], err_msg=f"scale {k}")
  for k in (10, 11, 12):
    blocks = sv.csla_mask(k).block_types()[0, 0] > 0
    np.testing.assert_array_equal(blocks, g[f"csla_block_mask_qscale{k}_QbKb"] > 0,
                                  err_msg=f"CSLA scale {k}")


@pytest.fixture(scope="module")
def forced_runs():
  f = fixture()
  sparse = _gen(_sparvar_plan())(f["feats"], f["lens"], forced=f["forced"], return_logits=True,
                                 decode=False, return_state=True)
  return sparse


def test_teacher_forced_logits_match_the_authors(forced_runs):
  f = fixture()
  g, sch = f["g"], f["sch"]
  errs = []
  for si, lg in enumerate(forced_runs.logits_per_scale):
    a, b = sch.offsets[si], sch.offsets[si + 1]
    want = g["tf_sparvar_logits_BLd2"][:, a:b]
    errs.append(float(np.abs(lg - want).max()))
  assert max(errs) <= TOL, errs
  # SparVAR moves the logits far more than the tolerance from scale 10 on, so the check
  # tells SparVAR from dense: the dense logits must be farther from ours than ours from the
  # authors' SparVAR at every sparse scale.
  for si in (10, 11, 12):
    a, b = sch.offsets[si], sch.offsets[si + 1]
    dense_gap = np.abs(g["tf_dense_logits_BLd2"][:, a:b] - g["tf_sparvar_logits_BLd2"][:, a:b])
    assert dense_gap.max() > 10 * errs[si], (si, dense_gap.max(), errs[si])


def test_selected_keys_match_the_authors_as_sets(forced_runs):
  f = fixture()
  g = f["g"]
  ours = forced_runs.sparse_state.indices_BHGK  # [L, B, H, G, K]
  want = g["cs4a_inds_scale10_LBHGK"].astype(np.int64)
  assert ours.shape == want.shape, (ours.shape, want.shape)
  kth, nxt = g["cs4a_colsum_kth_value_LBHG"], g["cs4a_colsum_next_value_LBHG"]
  gap = (kth - nxt) / kth
  colsum0 = g["cs4a_colsum_layer0_BHGN"]
  differing = 0
  for idx in np.ndindex(*ours.shape[:4]):
    a, b = set(ours[idx].tolist()), set(want[idx].tolist())
    if a == b:
      continue
    differing += 1
    # only a near-tie at the boundary may swap keys
    assert gap[idx] < 1e-3, (idx, gap[idx])
    if idx[0] == 0:
      swapped = np.array(sorted(a ^ b))
      near = np.abs(colsum0[idx[1:]][swapped] - kth[idx]) / kth[idx]
      assert (near < 1e-3).all(), (idx, near)
  assert differing <= 4, differing  # of 396 groups


def test_free_running_bits_match_until_the_first_near_tie():
  f = fixture()
  g, sch = f["g"], f["sch"]
  res = _gen(_sparvar_plan())(f["feats"], f["lens"], decode=False)
  margin = g["gen_sparvar_margin_BLd"]
  bits = g["gen_sparvar_bits_BLd"]
  checked = 0
  for si, got in enumerate(res.tokens_per_scale):
    a, b = sch.offsets[si], sch.offsets[si + 1]
    sure = np.abs(margin[:, a:b]) > 2 * TOL
    np.testing.assert_array_equal(got[sure], bits[:, a:b][sure], err_msg=f"scale {si}")
    checked += int(sure.sum())
    if not np.array_equal(got, bits[:, a:b]):
      break  # a near-tie flipped: everything after legitimately diverges
  assert checked > 0


def test_dense_plan_differs_only_from_the_decision_scale_on():
  """Our dense and SparVAR runs are the same computation before scale 10."""
  f = fixture()
  sp = _gen(_sparvar_plan())(f["feats"], f["lens"], forced=f["forced"], return_logits=True,
                             decode=False, max_scales=11)
  de = _gen(dense_plan(f["sch"], f["cfg"].depth))(f["feats"], f["lens"], forced=f["forced"],
                                                  return_logits=True, decode=False,
                                                  max_scales=11)
  for si in range(10):
    np.testing.assert_array_equal(sp.logits_per_scale[si], de.logits_per_scale[si])
  assert np.abs(sp.logits_per_scale[10] - de.logits_per_scale[10]).max() > 1e-3
