"""Block-sparse layout shared by the kernels and the sparse policy (FlexAttention-like).

A `BlockMask` lists, per (batch or 1, head or 1, query block), the key blocks a query block
visits, split into *full* blocks (every token pair is attended) and *partial* blocks (a
token-level rule decides inside the block). Lists are padded; entries past the count are
never read. Block sizes, `q_len` and `kv_len` are static (pytree metadata), the arrays are
data, so a mask can be a jit constant (CSLA, built in numpy from the schedule) or a traced
value.

A `TokenBoxRule` is the token-level rule for partial blocks, kept as small per-token tables
instead of a dense mask: query q sits at (y[q], x[q]) in its scale's grid; key k is visible
to the query rectangle [ylo[k], yhi[k]] x [xlo[k], xhi[k]] of that grid. Any rule of the form
"key visible iff the query lies in a key-dependent axis-aligned box" fits: CSLA's sink
(box = whole grid) and per-scale windows (the box is the set of query positions whose
projection lands within the window; projection is monotone, so the set is an interval),
and keys never visible (empty box, e.g. padding or dropped scales).

Key-length padding: when `kv_len` is not a multiple of `block_kv`, the last key block is
always listed as partial, because its padding keys must be masked even in block-granular
mode. The builders enforce this and `validate` checks it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Per query block: counts and padded lists of key-block indices (int32).

  full_num_BHQ [Bm, Hm, nQ], full_idx_BHQK [Bm, Hm, nQ, F]: blocks computed without a mask.
  part_num_BHQ [Bm, Hm, nQ], part_idx_BHQK [Bm, Hm, nQ, P]: blocks masked token by token
    (by the rule in exact mode; only by `kv_len` in block-granular mode).
  Bm is 1 or the batch size, Hm is 1 or the head count (broadcast over the other).
  """
  full_num_BHQ: jax.Array
  full_idx_BHQK: jax.Array
  part_num_BHQ: jax.Array
  part_idx_BHQK: jax.Array
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int

  @property
  def num_q_blocks(self) -> int:
    return _cdiv(self.q_len, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return _cdiv(self.kv_len, self.block_kv)

  def to_numpy(self) -> "BlockMask":
    return dataclasses.replace(self, **{f: np.asarray(getattr(self, f)) for f in _DATA_FIELDS})

  def block_types(self) -> np.ndarray:
    """int8 [Bm, Hm, nQ, nK]: 0 = skipped, 1 = partial, 2 = full (needs concrete arrays)."""
    m = self.to_numpy()
    out = np.zeros(m.full_num_BHQ.shape + (self.num_kv_blocks,), np.int8)
    for num, idx, val in ((m.part_num_BHQ, m.part_idx_BHQK, 1), (m.full_num_BHQ, m.full_idx_BHQK, 2)):
      valid = np.arange(idx.shape[-1]) < num[..., None]
      b, h, qb, s = np.nonzero(valid)
      out[b, h, qb, idx[b, h, qb, s]] = val
    return out

  def density(self) -> float:
    """Fraction of (query block, key block) pairs visited, averaged over Bm and Hm."""
    m = self.to_numpy()
    vis = m.full_num_BHQ.astype(np.int64) + m.part_num_BHQ
    return float(vis.sum() / (vis.size * self.num_kv_blocks))

  def visited_pairs(self) -> float:
    """Token pairs inside visited blocks, clipped to q_len x kv_len, mean over Bm and Hm."""
    t = self.block_types() > 0
    rows = np.minimum(self.block_q, self.q_len - self.block_q * np.arange(self.num_q_blocks))
    cols = np.minimum(self.block_kv, self.kv_len - self.block_kv * np.arange(self.num_kv_blocks))
    per = (t * rows[:, None] * cols[None, :]).sum(axis=(-2, -1))
    return float(per.mean())

  def validate(self) -> "BlockMask":
    """Checks shapes, counts and index ranges (concrete arrays); returns self or raises."""
    m = self.to_numpy()
    nq, nk = self.num_q_blocks, self.num_kv_blocks
    for name in _DATA_FIELDS:
      a = getattr(m, name)
      if a.dtype != np.int32:
        raise ValueError(f"BlockMask.{name} must be int32, got {a.dtype}; build masks with "
                         "BlockMask.from_block_types or from_token_mask.")
    lead = m.full_num_BHQ.shape
    if len(lead) != 3 or lead[2] != nq:
      raise ValueError(f"BlockMask counts must be [Bm, Hm, nQ] with nQ = ceil(q_len / block_q) = "
                       f"{nq}; got full_num_BHQ.shape={lead}.")
    for num_name, idx_name in (("full_num_BHQ", "full_idx_BHQK"), ("part_num_BHQ", "part_idx_BHQK")):
      num, idx = getattr(m, num_name), getattr(m, idx_name)
      if num.shape != lead or idx.shape[:3] != lead or idx.ndim != 4:
        raise ValueError(f"BlockMask.{num_name} {num.shape} / {idx_name} {idx.shape} do not "
                         f"match the leading shape {lead} (+ a list axis for the indices).")
      if (num < 0).any() or (num > idx.shape[-1]).any():
        raise ValueError(f"BlockMask.{num_name} has counts outside [0, {idx.shape[-1]}] (the "
                         f"list length): min {num.min()}, max {num.max()}.")
      valid = np.arange(idx.shape[-1]) < num[..., None]
      bad = valid & ((idx < 0) | (idx >= nk))
      if bad.any():
        where = tuple(int(w[0]) for w in np.nonzero(bad))
        raise ValueError(f"BlockMask.{idx_name} has a key-block index out of range [0, {nk}) "
                         f"at {where}: {idx[where]}. kv_len={self.kv_len}, "
                         f"block_kv={self.block_kv}.")
    t_full = _scatter_count(m.full_num_BHQ, m.full_idx_BHQK, nk)
    t_part = _scatter_count(m.part_num_BHQ, m.part_idx_BHQK, nk)
    if (t_full > 1).any() or (t_part > 1).any() or ((t_full > 0) & (t_part > 0)).any():
      raise ValueError("BlockMask lists a key block twice for one query block (duplicates, or "
                       "both full and partial); each visited block must appear exactly once.")
    if self.kv_len % self.block_kv and (t_full[..., nk - 1] > 0).any():
      raise ValueError(f"BlockMask lists the last key block as full, but kv_len={self.kv_len} is "
                       f"not a multiple of block_kv={self.block_kv}: its padding keys must be "
                       "masked, so it must be a partial block.")
    return self

  @classmethod
  def from_block_types(cls, types, *, q_len: int, kv_len: int, block_q: int,
                       block_kv: int) -> "BlockMask":
    """From a dense block table (numpy): 0 skip, 1 partial, 2 full; [nQ, nK] or [Bm, Hm, nQ, nK].

    A bool table means visited blocks are full. The last key block is turned partial when
    kv_len is not a block multiple.
    """
    t = np.asarray(types)
    if t.dtype == np.bool_:
      t = t.astype(np.int8) * 2
    if t.ndim == 2:
      t = t[None, None]
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
    if t.ndim != 4 or t.shape[2:] != (nq, nk):
      raise ValueError(f"block table must be [nQ, nK] or [Bm, Hm, nQ, nK] with nQ={nq}, nK={nk} "
                       f"(q_len={q_len}, kv_len={kv_len}, blocks {block_q}x{block_kv}); got "
                       f"shape {np.asarray(types).shape}.")
    if ((t < 0) | (t > 2)).any():
      raise ValueError("block table values must be 0 (skip), 1 (partial) or 2 (full).")
    t = t.astype(np.int8).copy()
    if kv_len % block_kv:
      t[..., nk - 1] = np.minimum(t[..., nk - 1], 1)
    fn, fi = _compress(t == 2)
    pn, pi = _compress(t == 1)
    return cls(fn, fi, pn, pi, q_len=q_len, kv_len=kv_len, block_q=block_q,
               block_kv=block_kv).validate()

  @classmethod
  def from_token_mask(cls, mask, *, block_q: int, block_kv: int) -> "BlockMask":
    """From a dense boolean token mask (numpy) [Lq, Lk] or [Bm, Hm, Lq, Lk].

    Blocks with no true pair are skipped, all-true blocks are full, the rest partial.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 2:
      m = m[None, None]
    if m.ndim != 4:
      raise ValueError(f"token mask must be [Lq, Lk] or [Bm, Hm, Lq, Lk]; got {np.shape(mask)}.")
    lq, lk = m.shape[2:]
    nq, nk = _cdiv(lq, block_q), _cdiv(lk, block_kv)
    # Padding pairs count as attended for "full" (padded queries are discarded) but the key
    # padding is handled by from_block_types, which demotes the last column to partial.
    pad = np.ones(m.shape[:2] + (nq * block_q, nk * block_kv), bool)
    pad[:, :, :lq, :lk] = m
    blk = pad.reshape(m.shape[:2] + (nq, block_q, nk, block_kv))
    anyv = np.zeros(m.shape[:2] + (nq * block_q, nk * block_kv), bool)
    anyv[:, :, :lq, :lk] = m
    anyb = anyv.reshape(blk.shape).any(axis=(3, 5))
    allb = blk.all(axis=(3, 5))
    types = np.where(allb & anyb, 2, np.where(anyb, 1, 0)).astype(np.int8)
    return cls.from_block_types(types, q_len=lq, kv_len=lk, block_q=block_q, block_kv=block_kv)

  @classmethod
  def from_rule(cls, rule: "TokenBoxRule", *, block_q: int, block_kv: int) -> "BlockMask":
    """Static block mask of a token rule (numpy, at trace time)."""
    return cls.from_token_mask(rule.token_mask(), block_q=block_q, block_kv=block_kv)

  def refined(self, rule: "TokenBoxRule", *, block_q: int, block_kv: int) -> "BlockMask":
    """The same exact-mode mask at finer blocks (numpy; concrete arrays).

    Exact semantics attend full blocks whole and partial blocks where `rule` holds, so the
    attended pairs do not depend on the block size: here each visited block is cut into
    block_q x block_kv sub-blocks, and a sub-block of a partial block is skipped, full or
    partial by what the rule says inside it. `token_mask_of(refined, rule)` equals
    `token_mask_of(self, rule)`; the kernel then skips the sub-blocks the rule empties and
    drops the rule where it holds whole (exact CSLA, 128x128 -> 64x64: 26-35% fewer pairs at
    scales 10-12 of the 1024 schedule).
    """
    if self.block_q % block_q or self.block_kv % block_kv:
      raise ValueError(f"refined blocks {block_q}x{block_kv} must divide the mask's "
                       f"{self.block_q}x{self.block_kv}.")
    if (rule.q_len, rule.kv_len) != (self.q_len, self.kv_len):
      raise ValueError(f"rule tables are for {rule.q_len} x {rule.kv_len} tokens, the mask for "
                       f"{self.q_len} x {self.kv_len}.")
    parent = self.block_types()  # [Bm, Hm, nQ, nK]
    nq, nk = _cdiv(self.q_len, block_q), _cdiv(self.kv_len, block_kv)
    rq, rk = self.block_q // block_q, self.block_kv // block_kv
    parent = np.repeat(np.repeat(parent, rq, axis=2), rk, axis=3)[:, :, :nq, :nk]
    by_rule = BlockMask.from_rule(rule, block_q=block_q, block_kv=block_kv).block_types()
    types = np.where(parent == 2, 2, np.where(parent == 1, by_rule, 0)).astype(np.int8)
    return BlockMask.from_block_types(types, q_len=self.q_len, kv_len=self.kv_len,
                                      block_q=block_q, block_kv=block_kv)

  @classmethod
  def dense(cls, *, q_len: int, kv_len: int, block_q: int, block_kv: int) -> "BlockMask":
    """Every block visited (dense attention through the block-sparse kernel)."""
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
    return cls.from_block_types(np.full((nq, nk), 2, np.int8), q_len=q_len, kv_len=kv_len,
                                block_q=block_q, block_kv=block_kv)


_DATA_FIELDS = ("full_num_BHQ", "full_idx_BHQK", "part_num_BHQ", "part_idx_BHQK")
jax.tree_util.register_dataclass(BlockMask, data_fields=list(_DATA_FIELDS),
                                 meta_fields=["q_len", "kv_len", "block_q", "block_kv"])


def _compress(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bool [Bm, Hm, nQ, nK] -> counts [Bm, Hm, nQ] and ascending lists padded with 0."""
  num = sel.sum(-1).astype(np.int32)
  width = max(1, int(num.max()) if num.size else 1)
  # Stable argsort of "not selected" puts selected block ids first, in ascending order.
  order = np.argsort(~sel, axis=-1, kind="stable")[..., :width].astype(np.int32)
  valid = np.arange(width) < num[..., None]
  return num, np.where(valid, order, 0).astype(np.int32)


def _scatter_count(num, idx, nk):
  out = np.zeros(num.shape + (nk + 1,), np.int32)
  valid = np.arange(idx.shape[-1]) < num[..., None]
  tgt = np.where(valid, np.clip(idx, 0, nk - 1), nk)
  b, h, q, s = np.indices(idx.shape)
  np.add.at(out, (b, h, q, tgt), 1)
  return out[..., :nk]


@dataclasses.dataclass(frozen=True)
class TokenBoxRule:
  """Token rule: key k visible to query q iff ylo[k] <= y[q] <= yhi[k] and xlo[k] <= x[q] <= xhi[k].

  q_yx_2Q [2, Lq] int32: (y, x) of each query in its grid (padding queries: -1, see nothing).
  k_box_4K [4, Lk] int32: (ylo, yhi, xlo, xhi) per key (never visible: lo > hi).
  """
  q_yx_2Q: jax.Array
  k_box_4K: jax.Array

  @property
  def q_len(self) -> int:
    return int(self.q_yx_2Q.shape[1])

  @property
  def kv_len(self) -> int:
    return int(self.k_box_4K.shape[1])

  def token_mask(self) -> np.ndarray:
    """bool [Lq, Lk] (numpy)."""
    y, x = np.asarray(self.q_yx_2Q)
    ylo, yhi, xlo, xhi = np.asarray(self.k_box_4K)
    return ((ylo[None] <= y[:, None]) & (y[:, None] <= yhi[None])
            & (xlo[None] <= x[:, None]) & (x[:, None] <= xhi[None]))

  def token_mask_jnp(self) -> jax.Array:
    """bool [Lq, Lk] (traceable)."""
    y, x = self.q_yx_2Q[0], self.q_yx_2Q[1]
    ylo, yhi, xlo, xhi = (self.k_box_4K[i] for i in range(4))
    return ((ylo[None] <= y[:, None]) & (y[:, None] <= yhi[None])
            & (xlo[None] <= x[:, None]) & (x[:, None] <= xhi[None]))

  def padded(self, q_len: int, kv_len: int) -> "TokenBoxRule":
    """Tables padded to longer buffers: padding queries at (-1, -1), padding keys never visible."""
    qy = jnp.pad(jnp.asarray(self.q_yx_2Q, jnp.int32), ((0, 0), (0, q_len - self.q_len)),
                 constant_values=-1)
    kb = jnp.asarray(self.k_box_4K, jnp.int32)
    empty = jnp.broadcast_to(jnp.array([1, 0, 1, 0], jnp.int32)[:, None], (4, kv_len - self.kv_len))
    return TokenBoxRule(qy, jnp.concatenate([kb, empty], axis=1))


jax.tree_util.register_dataclass(TokenBoxRule, data_fields=["q_yx_2Q", "k_box_4K"], meta_fields=[])
