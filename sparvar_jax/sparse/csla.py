"""CSLA (cross-scale local sparse attention) masks, static, computed in numpy from the schedule.

SparVAR's rule (the authors' `SparseFlexAttn`; see the algorithm notes 1.3): a query (y, x)
of query scale qi (grid Hq x Wq) sees
  * every key of scales 0 .. sink_scales-1 (the attention sinks), and
  * for each key scale j in sink_scales .. qi with window w_j >= 0: keys (ky, kx) with
    |round(y / Hq * Hj) - ky| <= w_j // 2 and |round(x / Wq * Wj) - kx| <= w_j // 2
    (float32, round half to even); scales with w_j < 0 are not seen outside the sink.
Keys are the KV-cache layout: scales concatenated, raster order inside each scale.
The authors' code knows only square scales (Hq = Wq); each axis is projected on its own,
which is the same rule there and extends it to Infinity's non-square templates.
`schedule` arguments take square sides (ints) or (h, w) grids.

`csla_token_mask` states the rule literally (dense, for tests and the reference);
`csla_rule` turns it into the kernel's per-token box tables (projection is monotone in y and
x, so the queries that see a key form an interval per axis).
"""

from __future__ import annotations

import functools

import numpy as np

from pallas_kernels.block_mask import BlockMask, TokenBoxRule

# Infinity 1024x1024 (pn=1M, 1:1): 13 scales.
SCHEDULE_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
SINK_SCALES = 5
WIN_SIZE = (-1,) * 8 + (1, 1, 3, 5, 7)


def grids(schedule) -> tuple[tuple[int, int], ...]:
  """(h, w) per scale from square sides or (h, w) pairs."""
  return tuple((int(s), int(s)) if np.isscalar(s) else (int(s[0]), int(s[1]))
               for s in schedule)


def _bounds(schedule):
  return np.concatenate([[0], np.cumsum([h * w for h, w in grids(schedule)])]).astype(np.int64)


def _check(schedule, query_scale, win_size):
  if not 0 <= query_scale < len(schedule):
    raise ValueError(f"query_scale={query_scale} outside the schedule's {len(schedule)} scales.")
  if len(win_size) < query_scale + 1:
    raise ValueError(f"win_size has {len(win_size)} entries; scale {query_scale} needs "
                     f"{query_scale + 1} (one per key scale).")


def _project(hq: int, hj: int) -> np.ndarray:
  """Nearest coordinate of scale side hj for each query coordinate of side hq: float32
  round(c / hq * hj), half to even, as the authors compute it in torch (no +0.5 centring,
  so the last query row can project one past the grid and see no key of that scale)."""
  c = np.arange(hq, dtype=np.float32)
  return np.round((c / np.float32(hq)) * np.float32(hj)).astype(np.int64)


def csla_token_mask(query_scale: int, schedule=SCHEDULE_1024, sink_scales: int = SINK_SCALES,
                    win_size=WIN_SIZE) -> np.ndarray:
  """bool [Hq*Wq, cum_tokens(query_scale + 1)]: the literal CSLA rule."""
  _check(schedule, query_scale, win_size)
  hw = grids(schedule)
  cum = _bounds(hw)
  hq, wq = hw[query_scale]
  qy, qx = np.divmod(np.arange(hq * wq), wq)
  m = np.zeros((hq * wq, int(cum[query_scale + 1])), bool)
  m[:, :cum[min(sink_scales, query_scale + 1)]] = True
  for j in range(sink_scales, query_scale + 1):
    if win_size[j] < 0:
      continue
    (hj, wj), r = hw[j], win_size[j] // 2
    ky, kx = np.divmod(np.arange(hj * wj), wj)
    cy = _project(hq, hj)[qy]
    cx = _project(wq, wj)[qx]
    m[:, cum[j]:cum[j + 1]] = ((np.abs(cy[:, None] - ky[None]) <= r)
                               & (np.abs(cx[:, None] - kx[None]) <= r))
  return m


def csla_rule(query_scale: int, schedule=SCHEDULE_1024, sink_scales: int = SINK_SCALES,
              win_size=WIN_SIZE) -> TokenBoxRule:
  """Per-token tables of the CSLA rule: query (y, x) and per-key query box (numpy int32)."""
  _check(schedule, query_scale, win_size)
  hw = grids(schedule)
  cum = _bounds(hw)
  hq, wq = hw[query_scale]
  qy, qx = np.divmod(np.arange(hq * wq), wq)
  lk = int(cum[query_scale + 1])
  box = np.tile(np.array([[1], [0], [1], [0]], np.int64), (1, lk))  # empty: never visible
  sink_end = int(cum[min(sink_scales, query_scale + 1)])
  box[:, :sink_end] = np.array([[0], [hq - 1], [0], [wq - 1]])
  for j in range(sink_scales, query_scale + 1):
    if win_size[j] < 0:
      continue
    (hj, wj), r = hw[j], win_size[j] // 2

    def interval(nq, nj):  # queries whose projection lies within r of each key coordinate
      proj = _project(nq, nj)  # non-decreasing in the query coordinate
      c = np.arange(nj)
      lo = np.searchsorted(proj, c - r, side="left")       # first query with proj >= c - r
      hi = np.searchsorted(proj, c + r, side="right") - 1  # last query with proj <= c + r
      return lo, hi

    ylo, yhi = interval(hq, hj)
    xlo, xhi = interval(wq, wj)
    ky, kx = np.divmod(np.arange(hj * wj), wj)
    box[:, cum[j]:cum[j + 1]] = np.stack([ylo[ky], yhi[ky], xlo[kx], xhi[kx]])
  return TokenBoxRule(np.stack([qy, qx]).astype(np.int32), box.astype(np.int32))


def csla_block_mask(query_scale: int, block_q: int = 128, block_kv: int = 128,
                    schedule=SCHEDULE_1024, sink_scales: int = SINK_SCALES,
                    win_size=WIN_SIZE) -> BlockMask:
  """Static CSLA block mask (full / partial split), shared by heads and batch.

  Used with `rule=None` it is SparVAR's block-granular kernel (any-pooled blocks computed
  whole); with `rule=csla_rule(...)` the kernel applies the exact token rule in partial blocks.
  """
  rule = csla_rule(query_scale, schedule, sink_scales, win_size)
  return BlockMask.from_rule(rule, block_q=block_q, block_kv=block_kv)


@functools.lru_cache(maxsize=64)
def cached_rule(grids, query_scale: int, sink_scales: int, win_size) -> TokenBoxRule:
  """`csla_rule` kept per (schedule, setting): plans ask for it at every trace."""
  return csla_rule(query_scale, grids, sink_scales, win_size)


@functools.lru_cache(maxsize=64)
def cached_block_mask(grids, query_scale: int, sink_scales: int, win_size,
                      block: int) -> BlockMask:
  return BlockMask.from_rule(cached_rule(grids, query_scale, sink_scales, win_size),
                             block_q=block, block_kv=block)


@functools.lru_cache(maxsize=16)
def cached_token_mask(grids, query_scale: int, sink_scales: int, win_size, block: int,
                      exact: bool) -> np.ndarray:
  """bool [l, kv_len]: what the kernel attends: the rule (exact) or every token of the
  visited blocks (block-granular, the authors' FlexAttention semantics)."""
  rule = cached_rule(grids, query_scale, sink_scales, win_size)
  if exact:
    return rule.token_mask()
  mask = cached_block_mask(grids, query_scale, sink_scales, win_size, block)
  blocks = mask.block_types()[0, 0] > 0
  keep = np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)
  out = np.ascontiguousarray(keep[:rule.q_len, :rule.kv_len])
  out.setflags(write=False)
  return out


# ------------------------------------------------------------------- 2D query tiles (finer)


def csla_tile_plan(query_scale: int, tile: int = 8, multiple_of: int = 64,
                   schedule=SCHEDULE_1024, sink_scales: int = SINK_SCALES, win_size=WIN_SIZE):
  """CSLA over 2D query tiles with gathered keys (static, numpy).

  Queries are grouped into tile x tile spatial patches of the query scale (`q_perm`); each
  patch gathers the union of its queries' CSLA keys, token by token (`indices`, ascending,
  `counts`, padded to a multiple of `multiple_of`). With the rule applied inside the kernel
  this is exact CSLA while computing only ~4-5% of the last scale's (query, key) pairs
  (128x128 raster blocks: 16.5%). Returns a dict for `gather_attention(..., group_size=
  tile*tile, q_perm=..., rule=...)`; `pairs` is the computed (query, key) pair count.
  """
  rule = csla_rule(query_scale, schedule, sink_scales, win_size)
  hq, wq = grids(schedule)[query_scale]
  if hq % tile or wq % tile:
    raise ValueError(f"scale {query_scale} is {hq}x{wq}, not a multiple of tile={tile}; use a "
                     "tile that divides both sides (or the block-sparse kernel).")
  grid = np.arange(hq * wq).reshape(hq // tile, tile, wq // tile, tile)
  q_perm = grid.transpose(0, 2, 1, 3).reshape(-1).astype(np.int32)
  tm = rule.token_mask()[q_perm].reshape(-1, tile * tile, rule.kv_len).any(axis=1)
  counts = tm.sum(-1).astype(np.int32)
  slots = int(-(-counts.max() // multiple_of) * multiple_of)
  order = np.argsort(~tm, axis=-1, kind="stable")[:, :slots].astype(np.int32)
  # Early scales have fewer keys than one padded list (scale 4: 121 keys, 128 slots).
  order = np.pad(order, ((0, 0), (0, slots - order.shape[1])))
  valid = np.arange(slots) < counts[:, None]
  indices = np.where(valid, order, 0).astype(np.int32)
  return dict(q_perm=q_perm, indices=indices[None, None], counts=counts[None, None],
              group_size=tile * tile, rule=rule, pairs=int(counts.sum()) * tile * tile)


def csla_attention(q, k, v, query_scale: int, *, variant: str = "tiles", exact: bool = True,
                   schedule=SCHEDULE_1024, sink_scales: int = SINK_SCALES, win_size=WIN_SIZE,
                   interpret: bool = False):
  """CSLA attention of one query scale: q [B, Hq*Wq, H, D], k, v [B, >= cum_tokens, H, D].

  variant "tiles": 8x8 query patches with gathered keys (fastest measured on the H100:
  6.9x cuDNN exact at the last scale); "blocks": the block-sparse kernel on 128x128 blocks
  (the paper's granularity; with exact=False this is SparVAR's FlexAttention kernel).
  exact=True applies the token rule; exact=False computes whole visited blocks / tile unions.
  The plan and masks are numpy constants computed at trace time.
  """
  import jax.numpy as jnp  # local: keep the numpy-only helpers importable without tracing

  from pallas_kernels import BlockSparseConfig, block_sparse_attention, gather_attention
  rule = csla_rule(query_scale, schedule, sink_scales, win_size)
  if variant == "tiles":
    plan = csla_tile_plan(query_scale, 8, 64, schedule, sink_scales, win_size)
    kv = rule.kv_len
    return gather_attention(q, k[:, :kv], v[:, :kv], plan["indices"], plan["counts"],
                            group_size=plan["group_size"], q_perm=jnp.asarray(plan["q_perm"]),
                            rule=rule if exact else None, interpret=interpret)
  if variant == "blocks":
    mask = BlockMask.from_rule(rule, block_q=128, block_kv=128)
    cfg = BlockSparseConfig(64, 64, 4, 2) if exact else BlockSparseConfig(128, 64, 4, 2)
    return block_sparse_attention(q, k, v, mask, rule if exact else None, config=cfg,
                                  interpret=interpret)
  raise ValueError(f"variant={variant!r}; use 'tiles' or 'blocks'.")
