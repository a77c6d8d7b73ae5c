"""BlockMask / TokenBoxRule construction and validation, and the static CSLA masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (BlockMask, BlockSparseConfig, TokenBoxRule, block_sparse_attention,
                            token_mask_of)
from sparvar_jax.sparse import csla


def test_from_block_types_roundtrip_and_tail_demotion():
  rng = np.random.default_rng(0)
  types = rng.integers(0, 3, size=(2, 3, 4, 5)).astype(np.int8)
  m = BlockMask.from_block_types(types, q_len=60, kv_len=75, block_q=16, block_kv=16)
  got = m.block_types()
  # kv_len=75 is not a multiple of 16: the last key block can only be partial.
  want = types.copy()
  want[..., -1] = np.minimum(want[..., -1], 1)
  np.testing.assert_array_equal(got, want)
  assert m.full_idx_BHQK.dtype == np.int32 and m.full_num_BHQ.shape == (2, 3, 4)
  assert m.density() == pytest.approx((want > 0).mean())
  # Lists are ascending within the valid part.
  for num, idx in ((m.full_num_BHQ, m.full_idx_BHQK), (m.part_num_BHQ, m.part_idx_BHQK)):
    for pos in np.ndindex(num.shape):
      row = idx[pos][:num[pos]]
      assert (np.diff(row) > 0).all()


def test_bool_block_table_is_full_and_exact_multiple_keeps_tail_full():
  m = BlockMask.from_block_types(np.array([[True, False], [True, True]]), q_len=32, kv_len=32,
                                 block_q=16, block_kv=16)
  np.testing.assert_array_equal(m.block_types()[0, 0], [[2, 0], [2, 2]])


def test_from_token_mask_classifies_full_partial_skip():
  tm = np.zeros((20, 40), bool)
  tm[:16, :16] = True           # block (0, 0) full
  tm[3, 20] = True              # block (0, 1) partial
  tm[16:, :16] = True           # block (1, 0): all 4 valid rows true -> full (padding rows ignored)
  tm[16:, 32:40] = True         # block (1, 2): the last key block is partial (kv padding)
  m = BlockMask.from_token_mask(tm, block_q=16, block_kv=16)
  np.testing.assert_array_equal(m.block_types()[0, 0], [[2, 1, 0], [2, 0, 1]])
  assert m.q_len == 20 and m.kv_len == 40


@pytest.mark.parametrize("case", ["index_range", "count_too_large", "duplicate", "full_tail",
                                  "dtype", "shape"])
def test_validation_errors(case):
  m = BlockMask.from_block_types(np.full((2, 3), 2, np.int8), q_len=32, kv_len=40,
                                 block_q=16, block_kv=16).to_numpy()
  fi, fn = m.full_idx_BHQK.copy(), m.full_num_BHQ.copy()
  if case == "index_range":
    fi[0, 0, 0, 0] = 3
    bad = dataclasses.replace(m, full_idx_BHQK=fi)
    msg = "out of range"
  elif case == "count_too_large":
    fn[0, 0, 0] = fi.shape[-1] + 1
    bad = dataclasses.replace(m, full_num_BHQ=fn)
    msg = "counts outside"
  elif case == "duplicate":
    fi[0, 0, 0, 1] = fi[0, 0, 0, 0]
    bad = dataclasses.replace(m, full_idx_BHQK=fi)
    msg = "twice"
  elif case == "full_tail":
    pn = np.zeros_like(m.part_num_BHQ)
    fi2 = np.zeros(fi.shape[:3] + (3,), np.int32)
    fi2[..., :] = [0, 1, 2]
    bad = dataclasses.replace(m, full_idx_BHQK=fi2, full_num_BHQ=np.full_like(fn, 3),
                              part_num_BHQ=pn)
    msg = "last key block as full"
  elif case == "dtype":
    bad = dataclasses.replace(m, full_idx_BHQK=fi.astype(np.int64))
    msg = "int32"
  else:
    bad = dataclasses.replace(m, q_len=64)
    msg = "nQ"
  with pytest.raises(ValueError, match=msg):
    bad.validate()


def test_bad_table_shape_and_values():
  with pytest.raises(ValueError, match="nQ=2, nK=3"):
    BlockMask.from_block_types(np.ones((2, 2), bool), q_len=32, kv_len=40, block_q=16, block_kv=16)
  with pytest.raises(ValueError, match="0 \\(skip\\)"):
    BlockMask.from_block_types(np.full((2, 3), 5), q_len=32, kv_len=40, block_q=16, block_kv=16)


def test_kernel_rejects_mismatched_block_sizes():
  m = BlockMask.dense(q_len=32, kv_len=32, block_q=16, block_kv=16)
  x = jnp.zeros((1, 32, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="must divide the mask's blocks"):
    block_sparse_attention(x, x, x, m, config=BlockSparseConfig(block_q=32, block_kv=16),
                           interpret=True)
  with pytest.raises(ValueError, match="q_len=32"):
    block_sparse_attention(jnp.zeros((1, 31, 1, 16)), x, x, m,
                           config=BlockSparseConfig(16, 16), interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    BlockSparseConfig(block_q=48)


def test_rule_padding_adds_invisible_keys_and_blind_queries():
  rule = TokenBoxRule(np.array([[0, 1], [1, 0]], np.int32), np.array([[0], [1], [0], [1]], np.int32))
  p = rule.padded(4, 3)
  tm = p.token_mask()
  np.testing.assert_array_equal(tm, [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("query_scale", range(13))
def test_csla_rule_equals_literal_mask(query_scale):
  np.testing.assert_array_equal(csla.csla_rule(query_scale).token_mask(),
                                csla.csla_token_mask(query_scale))


def test_csla_mask_matches_the_literal_rule_on_hand_checked_queries():
  m = csla.csla_token_mask(12)
  cum = np.cumsum([0] + [s * s for s in csla.SCHEDULE_1024])
  # Query (y=0, x=0) of 64x64: sinks (121 keys), nearest token of 24x24 and 32x32, 3x3 of 40x40
  # clipped to 2x2 at the corner, 5x5 of 48x48 -> 3x3, 7x7 of 64x64 -> 4x4.
  assert m[0].sum() == 121 + 1 + 1 + 4 + 9 + 16
  assert not m[0, cum[5]:cum[8]].any()  # scales 5..7 dropped
  # Query (32, 32): 40x40 centre round(32/64*40)=20 -> keys (19..21)^2.
  row = m[32 * 64 + 32, cum[10]:cum[11]].reshape(40, 40)
  assert row.sum() == 9 and row[19:22, 19:22].all()


def test_csla_block_sparsity_matches_the_paper():
  # Sparsity of 128x128 blocks from the algorithm notes (83.5% at the last scale in the paper).
  got = [1 - csla.csla_block_mask(s).density() for s in (10, 11, 12)]
  np.testing.assert_allclose(got, [0.790, 0.817, 0.836], atol=1e-3)
  # Finer blocks: 64x64 keeps 12.1% of the last scale's blocks.
  assert csla.csla_block_mask(12, 64, 64).density() == pytest.approx(0.121, abs=1e-3)


def test_csla_errors():
  with pytest.raises(ValueError, match="query_scale=13"):
    csla.csla_token_mask(13)
  with pytest.raises(ValueError, match="win_size has 3 entries"):
    csla.csla_rule(5, win_size=(1, 1, 1))


def _random_box_rule(rng, lq, lk, side=6):
  qyx = rng.integers(0, side, size=(2, lq)).astype(np.int32)
  lo = rng.integers(0, side, size=(2, lk))
  hi = lo + rng.integers(-1, side, size=(2, lk))  # some empty boxes (hi < lo)
  return TokenBoxRule(qyx, np.stack([lo[0], hi[0], lo[1], hi[1]]).astype(np.int32))


@pytest.mark.parametrize("lq,lk,fine", [(60, 75, (16, 16)), (64, 96, (16, 32)), (33, 130, (32, 8))])
def test_refined_mask_attends_the_same_pairs(lq, lk, fine):
  """Exact semantics do not depend on block size: the refined mask applies the same token
  mask (full parents stay whole even where the rule says no), in fewer or equal pairs."""
  rng = np.random.default_rng(lq + lk)
  rule = _random_box_rule(rng, lq, lk)
  types = rng.integers(0, 3, size=(2, 3, -(-lq // 32), -(-lk // 32))).astype(np.int8)
  m = BlockMask.from_block_types(types, q_len=lq, kv_len=lk, block_q=32, block_kv=32)
  r = m.refined(rule, block_q=fine[0], block_kv=fine[1])
  assert (r.block_q, r.block_kv) == fine and r.full_num_BHQ.shape[:2] == (2, 3)
  np.testing.assert_array_equal(np.asarray(token_mask_of(r, rule)),
                                np.asarray(token_mask_of(m, rule)))
  assert r.visited_pairs() <= m.visited_pairs()
  # The rule never reaches full blocks: a refined full parent is full in every sub-block.
  parent = np.repeat(np.repeat(m.block_types(), 32 // fine[0], 2), 32 // fine[1], 3)
  parent = parent[:, :, :r.num_q_blocks, :r.num_kv_blocks]
  assert (r.block_types()[parent == 2] == 2).all() and (r.block_types()[parent == 0] == 0).all()


def test_refined_csla_skips_pairs_and_kernel_output_is_unchanged():
  rule = csla.csla_rule(5, (1, 2, 4, 6, 8, 12), sink_scales=2, win_size=(-1, -1, 1, 1, 3, 5))
  m = BlockMask.from_rule(rule, block_q=32, block_kv=32)
  r = m.refined(rule, block_q=16, block_kv=16)
  assert r.visited_pairs() < 0.9 * m.visited_pairs()
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, n, 2, 16)), jnp.float32)
             for n in (rule.q_len, rule.kv_len, rule.kv_len))
  cfg = BlockSparseConfig(16, 16)
  a = block_sparse_attention(q, k, v, m, rule, config=cfg, interpret=True)
  b = block_sparse_attention(q, k, v, m, rule, config=cfg, interpret=True, refine=False)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_refined_refuses_coarser_blocks_and_other_rule_shapes():
  rng = np.random.default_rng(0)
  m = BlockMask.dense(q_len=40, kv_len=50, block_q=16, block_kv=16)
  with pytest.raises(ValueError, match="must divide"):
    m.refined(_random_box_rule(rng, 40, 50), block_q=32, block_kv=16)
  with pytest.raises(ValueError, match="rule tables"):
    m.refined(_random_box_rule(rng, 41, 50), block_q=16, block_kv=16)


def test_default_exact_tiles_refine_a_128_mask_and_match_the_reference(monkeypatch):
  """config=None in exact mode takes the 64x64 tiles and refines a 128x128 mask to them."""
  from pallas_kernels import block_sparse_attention_reference
  from pallas_kernels.block_sparse import EXACT_CONFIG
  assert (EXACT_CONFIG.block_q, EXACT_CONFIG.block_kv) == (64, 64)
  calls = []
  real = BlockMask.refined
  monkeypatch.setattr(BlockMask, "refined",
                      lambda self, *a, **kw: calls.append(kw) or real(self, *a, **kw))
  rng = np.random.default_rng(7)
  lq, lk = 150, 290
  rule = _random_box_rule(rng, lq, lk)
  m = BlockMask.from_rule(rule, block_q=128, block_kv=128)
  q, k, v = (jnp.asarray(rng.standard_normal((1, n, 2, 16)), jnp.float32) for n in (lq, lk, lk))
  out = block_sparse_attention(q, k, v, m, rule, interpret=True)
  assert calls == [dict(block_q=64, block_kv=64)]
  ref = block_sparse_attention_reference(q, k, v, m, rule)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # A traced mask is used as given (no host refinement under a jit over the mask).
  calls.clear()
  jax.jit(lambda m: block_sparse_attention(q, k, v, m, rule, interpret=True))(m)
  assert calls == []
