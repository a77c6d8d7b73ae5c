"""CS4A (cross-scale self-similar sparse attention): the decision scale and the later scales.

Letters: B batch rows (2B under CFG), H heads, c head dim, l queries of a scale, S keys in
the cache, G query groups, K selected keys per group, L layers of the CS4A segment.

The authors' algorithm (their research code, as the golden fixture records it):
- Decision scale s: dense attention with per-group column sums; each group of `group_size`
  consecutive raster queries keeps the `budget` keys with the largest column sums (absolute
  KV positions, per batch row and head), and the output cache O_dense - O_sparse over those
  keys. The layer's output is the exact dense one.
- Later scale k: each query group g takes the list of the group `group_map(k)[g]` of the
  previous scale, plus a contiguous band of the current scale's keys around the group's
  local windows (`current_band`); the output is bilinear(O_cache, scale s -> k) plus
  attention over the list, normalised over the listed keys only. Lists chain through the
  scales, so scale k's list is the decision list of an ancestor group followed by the bands
  of scales s+1..k (`LaterScaleLists` precomputes the static part).
- `mapping="kv_shift"` is the authors' second, unevaluated mapping: each decision key of
  scale j moves to scale j + (k - s) with its 2-D position rescaled, the tokens of scales
  0 .. k-s-1 are prepended as sinks, and the list keeps its length (no band).

Static parts are numpy, computed once per (schedule, setting) at trace time; the decision
lists and the output cache are data (`CS4AState`), computed once per image.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparvar_jax.resize import resize_hw

Grids = tuple[tuple[int, int], ...]


def num_groups(length: int, group_size: int) -> int:
  return -(-length // group_size)


def _cum(grids: Grids) -> np.ndarray:
  return np.concatenate([[0], np.cumsum([h * w for h, w in grids])]).astype(np.int64)


@functools.lru_cache(maxsize=None)
def group_map(target_groups: int, source_groups: int) -> np.ndarray:
  """Nearest-centre source group of each target group: round((g + 0.5) / Gt * Gs - 0.5)
  in float32, half to even, clipped to [0, Gs) (the authors' `map_inds_counts_across_scales`)."""
  g = np.arange(target_groups, dtype=np.float32)
  src = np.round((g + np.float32(0.5)) / np.float32(target_groups) * np.float32(source_groups)
                 - np.float32(0.5))
  out = np.clip(src, 0, source_groups - 1).astype(np.int32)
  out.setflags(write=False)
  return out


@functools.lru_cache(maxsize=None)
def current_band(grids: Grids, k: int, window: int, group_size: int,
                 multiple: int) -> np.ndarray:
  """The current-scale keys each query group of scale k adds: int32 [G_k, n], absolute.

  Every query's window x window neighbourhood (clamped at the borders) on its own scale;
  per group the union U_g. The band is the contiguous range of n positions starting at
  min(U_g), shifted left where it would pass the scale's last key, with one n for all
  groups: the largest span max(U_g) - min(U_g) + 1 rounded up to `multiple`. Where the
  groups are whole raster rows (the 1024x1024 schedule) the union is contiguous, its span
  is its size and this is the authors' band exactly; elsewhere the span keeps every window
  key inside the band.
  """
  if window < 1:
    raise ValueError(f"CS4A band window must be >= 1, got {window}")
  h, w = grids[k]
  cum = _cum(grids)
  r = (window - 1) // 2
  d = np.arange(-r, window - r)
  ys, xs = np.divmod(np.arange(h * w), w)
  ny = np.clip(ys[:, None] + d[None, :], 0, h - 1)  # [l, window]
  nx = np.clip(xs[:, None] + d[None, :], 0, w - 1)
  pos = ny[:, :, None] * w + nx[:, None, :]  # [l, window, window], positions within scale
  ng = num_groups(h * w, group_size)
  lo = np.array([pos[g * group_size:(g + 1) * group_size].min() for g in range(ng)])
  hi = np.array([pos[g * group_size:(g + 1) * group_size].max() for g in range(ng)])
  n = int(-(-(hi - lo + 1).max() // multiple) * multiple)
  n = min(n, h * w)
  start = np.minimum(lo, h * w - n)
  band = cum[k] + start[:, None] + np.arange(n)[None, :]
  band = band.astype(np.int32)
  band.setflags(write=False)
  return band


@functools.lru_cache(maxsize=None)
def _shift_table(grids: Grids, decision: int, k: int) -> np.ndarray:
  """kv_shift mapping: new absolute position of every key of scales 0..decision (int32).

  A key of scale j at (u, v) moves to scale j' = j + (k - decision) at
  (u * h_j' // h_j, v * w_j' // w_j) (the authors' 2-D `map_sparse_kv_inds`)."""
  cum = _cum(grids)
  out = np.zeros(int(cum[decision + 1]), np.int64)
  for j in range(decision + 1):
    jp = j + (k - decision)
    (hj, wj), (hp, wp) = grids[j], grids[jp]
    u, v = np.divmod(np.arange(hj * wj), wj)
    up, vp = (u * hp) // hj, (v * wp) // wj
    out[cum[j]:cum[j + 1]] = cum[jp] + np.minimum(up * wp + vp, hp * wp - 1)
  out = out.astype(np.int32)
  out.setflags(write=False)
  return out


@dataclasses.dataclass(frozen=True)
class LaterScaleLists:
  """The static part of scale k's key lists under the query-group mapping.

  source_G [G_k]: the decision-scale group whose list each group inherits (the group maps
  of scales decision+1..k composed); static_GN [G_k, N]: the bands of scales decision+1..k
  along each group's ancestry, in scale order (empty for mapping="kv_shift")."""
  source_G: np.ndarray
  static_GN: np.ndarray
  shift: np.ndarray | None  # kv_shift: position table over the decision scale's keys
  sinks: int  # kv_shift: tokens of the first scales prepended to each list


@functools.lru_cache(maxsize=None)
def later_scale_lists(grids: Grids, decision: int, k: int, bands: tuple[int, ...],
                      group_size: int, multiple: int, mapping: str) -> LaterScaleLists:
  """bands: the band window of scales decision+1 .., one per scale."""
  if not decision < k < len(grids):
    raise ValueError(f"scale {k} is not after the decision scale {decision}")
  lengths = [h * w for h, w in grids]
  groups = [num_groups(n, group_size) for n in lengths]
  src = np.arange(groups[k])
  parts = []
  for j in range(k, decision, -1):  # walk the ancestry down to the decision scale
    if mapping == "group":
      parts.append(current_band(grids, j, bands[j - decision - 1], group_size, multiple)[src])
    src = group_map(groups[j], groups[j - 1])[src]
  if mapping == "group":
    static = np.concatenate(parts[::-1], axis=1)
    return LaterScaleLists(src.astype(np.int32), static.astype(np.int32), None, 0)
  if mapping == "kv_shift":
    sinks = int(_cum(grids)[k - decision])
    return LaterScaleLists(src.astype(np.int32), np.zeros((groups[k], 0), np.int32),
                           _shift_table(grids, decision, k), sinks)
  raise ValueError(f"unknown CS4A mapping {mapping!r}; use 'group' or 'kv_shift'")


# ------------------------------------------------------------------------- state (data)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CS4AState:
  """What the decision scale leaves for the later scales, per CS4A layer (leading axis L
  when stacked over the segment's layers).

  indices_BHGK int32 [B, H, G_s, K]: each group's selected keys, absolute positions, in
  decreasing column-sum order; o_cache_BlHc [B, l_s, H, c]: O_dense - O_sparse at the
  decision scale (None without the output cache)."""
  indices_BHGK: jax.Array
  o_cache_BlHc: jax.Array | None
  SHARD_AXES = {"indices_BHGK": (1, None), "o_cache_BlHc": (1, None)}  # layer-stacked rows

  def rows(self, start: int, stop: int) -> "CS4AState":
    """Batch rows [start, stop) of a layer-stacked state (axis 1)."""
    oc = None if self.o_cache_BlHc is None else self.o_cache_BlHc[:, start:stop]
    return CS4AState(self.indices_BHGK[:, start:stop], oc)


def assemble_lists(indices_BHGK: jax.Array, lists: LaterScaleLists) -> jax.Array:
  """Scale k's lists int32 [B, H, G_k, N] from the decision lists and the static part."""
  budget = indices_BHGK.shape[-1]
  idx = jnp.take(indices_BHGK, jnp.asarray(lists.source_G), axis=2)
  if lists.shift is not None:
    idx = jnp.take(jnp.asarray(lists.shift), idx, axis=0)
    if lists.sinks:
      sinks = jnp.broadcast_to(jnp.arange(lists.sinks, dtype=jnp.int32),
                               idx.shape[:3] + (lists.sinks,))
      idx = jnp.concatenate([sinks, idx], axis=-1)[..., :budget]
    return idx.astype(jnp.int32)
  static = jnp.broadcast_to(jnp.asarray(lists.static_GN), idx.shape[:2] + lists.static_GN.shape)
  return jnp.concatenate([idx.astype(jnp.int32), static], axis=-1)


def upsample_cache(o_cache_BlHc: jax.Array, src_hw: tuple[int, int],
                   dst_hw: tuple[int, int]) -> jax.Array:
  """Bilinear (align_corners=False, no antialias) resize of the output cache from the
  decision grid to scale k's grid, each (row, head) plane of c channels on its own."""
  B, l, H, c = o_cache_BlHc.shape
  x = o_cache_BlHc.astype(jnp.float32).reshape(B, src_hw[0], src_hw[1], H * c)
  y = resize_hw(x, dst_hw, "bilinear")
  return y.reshape(B, dst_hw[0] * dst_hw[1], H, c)


# -------------------------------------------------------------- references (pure jnp)


def _group_of_query(length: int, group_size: int) -> np.ndarray:
  return (np.arange(length) // group_size).astype(np.int32)


def dense_colsum_reference(q, k, v, *, group_size: int, scale: float):
  """Dense attention and per-group column sums in float32 (XLA).

  q [B, l, H, c]; k, v [B, S, H, c] (every key valid) -> (o [B, l, H, c] in q's dtype,
  colsum [B, H, G, S] f32: the softmax probabilities summed over each group's queries)."""
  logits = jnp.einsum("BLHc,BSHc->BHLS", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("BHLS,BSHc->BLHc", probs.astype(v.dtype), v,
                 preferred_element_type=jnp.float32).astype(q.dtype)
  G = num_groups(q.shape[1], group_size)
  onehot = jax.nn.one_hot(_group_of_query(q.shape[1], group_size), G, dtype=jnp.float32)
  colsum = jnp.einsum("BHLS,LG->BHGS", probs, onehot, precision=jax.lax.Precision.HIGHEST)
  return o, colsum


def listed_attention_reference(q, k, v, indices_BHGK, residual=None, *, group_size: int,
                               scale: float):
  """Each query group attends to its listed keys only (a repeated key counts twice), plus
  the residual: float32 XLA, o [B, l, H, c] in q's dtype. k, v [B, S, H, c], indices in
  [0, S)."""
  S = k.shape[1]
  bi, hi, gi, _ = jnp.indices(indices_BHGK.shape, sparse=True)
  mult_BHGS = jnp.zeros(indices_BHGK.shape[:3] + (S,), jnp.float32).at[
      bi, hi, gi, indices_BHGK].add(1.0)
  return group_mask_attention_reference(q, k, v, mult_BHGS, residual, group_size=group_size,
                                        scale=scale)


def group_mask_attention_reference(q, k, v, mult_BHGS, residual=None, *, group_size: int,
                                   scale: float):
  """Each query group attends to the keys its row of `mult_BHGS` weights (0: not seen, 2:
  counted twice), plus the residual: float32 XLA, o in q's dtype."""
  l = q.shape[1]
  mult = jnp.take(mult_BHGS.astype(jnp.float32), jnp.asarray(_group_of_query(l, group_size)),
                  axis=2)
  logits = jnp.einsum("BLHc,BSHc->BHLS", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mult > 0, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = mult * jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("BHLS,BSHc->BLHc", p, v.astype(jnp.float32), preferred_element_type=jnp.float32)
  if residual is not None:
    o = o + residual.astype(jnp.float32)
  return o.astype(q.dtype)


# ------------------------------------------------------- block granularity (our variant)
# Query groups are the block-sparse kernel's query blocks and keys are chosen as whole key
# blocks: the top blocks of the block-pooled column sums at the decision scale, plus the
# blocks that hold each group's current-scale band later. Lists are built from a per-group
# block table, so a block chosen twice (a decision block that also holds band keys) is
# visited once.


def pool_blocks(colsum_BHGS: jax.Array, block: int) -> jax.Array:
  """Column sums summed per key block: [B, H, G, ceil(S / block)]."""
  S = colsum_BHGS.shape[-1]
  nk = -(-S // block)
  x = jnp.pad(colsum_BHGS, [(0, 0)] * 3 + [(0, nk * block - S)])
  return x.reshape(x.shape[:3] + (nk, block)).sum(-1)


@functools.lru_cache(maxsize=None)
def static_block_table(grids: Grids, decision: int, k: int, bands: tuple[int, ...],
                       block: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """(source group [G_k], bool [G_k, nKb_k]: the key blocks holding each group's bands of
  scales decision+1..k) for query groups of `block` queries."""
  lists = later_scale_lists(grids, decision, k, bands, block, multiple, "group")
  nk = -(-int(_cum(grids)[k + 1]) // block)
  table = np.zeros((lists.static_GN.shape[0], nk), bool)
  rows = np.repeat(np.arange(table.shape[0]), lists.static_GN.shape[1])
  table[rows, lists.static_GN.reshape(-1) // block] = True
  table.setflags(write=False)
  return lists.source_G, table


def block_table(blocks_BHGK: jax.Array, num_kv_blocks: int, source_G=None,
                static_GK: np.ndarray | None = None) -> jax.Array:
  """bool [B, H, G, nKb]: the decision blocks (of the source group) | the static blocks."""
  if source_G is not None:
    blocks_BHGK = jnp.take(blocks_BHGK, jnp.asarray(source_G), axis=2)
  table = jnp.any(jax.nn.one_hot(blocks_BHGK, num_kv_blocks, dtype=jnp.bool_), axis=-2)
  if static_GK is not None:
    table = table | jnp.asarray(static_GK)[None, None]
  return table


def mask_from_table(table_BHQK: jax.Array, *, q_len: int, kv_len: int, block: int,
                    max_blocks: int):
  """A traced `BlockMask` (block-granular, every visited block computed whole) from a
  per-query-block table; at most `max_blocks` per row (a static bound). The last key block
  goes to the partial list when kv_len is not a block multiple, so its padding is masked."""
  from pallas_kernels import BlockMask  # pylint: disable=g-import-not-at-top
  nk = table_BHQK.shape[-1]
  tail = kv_len % block != 0
  full = table_BHQK.at[..., nk - 1].set(False) if tail else table_BHQK
  width = min(max_blocks, nk)
  # selected blocks first, ascending (a stable sort on "not selected")
  order = jnp.argsort(~full, axis=-1, stable=True)[..., :width].astype(jnp.int32)
  full_num = full.sum(-1).astype(jnp.int32)
  if tail:
    part_num = table_BHQK[..., nk - 1].astype(jnp.int32)
  else:
    part_num = jnp.zeros(table_BHQK.shape[:3], jnp.int32)
  part_idx = jnp.full(table_BHQK.shape[:3] + (1,), nk - 1, jnp.int32)
  return BlockMask(full_num, order, part_num, part_idx, q_len=q_len, kv_len=kv_len,
                   block_q=block, block_kv=block)


def block_table_tokens(table_BHGK: jax.Array, kv_len: int, block: int) -> jax.Array:
  """The table per key token: [B, H, G, kv_len] float (1 where the token's block is in)."""
  return jnp.repeat(table_BHGK, block, axis=-1)[..., :kv_len].astype(jnp.float32)


def topk_indices(colsum_BHGS: jax.Array, budget: int) -> jax.Array:
  """The `budget` keys of largest column sum per group, int32 [B, H, G, budget], in
  decreasing order (torch.topk's order; ties may be ordered differently)."""
  return jax.lax.top_k(colsum_BHGS, budget)[1].astype(jnp.int32)
