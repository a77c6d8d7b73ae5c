"""Attention plans: which attention each range of layers runs at each scale.

A plan is static and hashable: per scale a tuple of `Segment(start, stop, attend)`, where
`attend` is the layer-attention kind the model's scan over layers [start, stop) calls for
every layer (`DENSE`, or a `LayerAttention` of SparVAR). The model runs one `lax.scan` per
segment, so the kernel choice is static inside each scan. `dense_plan` reproduces plain
generation; `sparvar_plan` builds SparVAR's policy from a `SparVARConfig`.

Kinds (the `attend.kind`):
- dense: softmax over every cached key (the model's attention implementation).
- dense_colsum: the decision scale's CS4A layers: dense output, and the per-group column
  sums pick each group's keys (`CS4AState`, produced by the segment).
- cs4a: later scales' CS4A layers: the upsampled output cache plus attention over the
  lists built from the decision (the segment consumes the state).
- csla: cross-scale local windows and attention sinks as a static block mask.

Kernels (`AttnPlan.kernels`): "auto" runs the Pallas kernels on a GPU and the pure-jnp
references elsewhere; "reference" always the references; "interpret" the Pallas (Triton)
kernels in interpret mode (CPU tests of the kernel path).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from pallas_kernels import (BlockSparseConfig, ColsumConfig, GatherConfig,
                            block_sparse_attention, dense_colsum_attention, gather_attention)
from pallas_kernels import _compat
from sparvar_jax.nn.attention import DENSE, attention_xla
from sparvar_jax.schedules import Schedule
from sparvar_jax.sparse import cs4a, csla
from sparvar_jax.sparse.config import PlanError, ResolvedSparVAR, SparVARConfig

KERNELS = ("auto", "reference", "interpret")

def _tile(size: int, preferred: int = 64) -> int:
  """The largest power of two <= preferred (and >= 16) dividing `size` (a Triton tile)."""
  t = preferred
  while t > 16 and size % t:
    t //= 2
  if size % t:
    raise PlanError(f"SparVAR's group_size and block_size must be multiples of 16 for the "
                    f"Pallas kernels, got {size}.")
  return t


@dataclasses.dataclass(frozen=True)
class LayerAttention:
  """SparVAR's attention for the layers of one segment at scale `scale` (static).

  Called as `attend(q, k_buf, v_buf, kv_len, state, scale=, impl=, mask=, layer=)` ->
  (o, state_out) by SelfAttention; k_buf / v_buf are the layer's KV-cache buffers, valid up
  to kv_len."""
  kind: str
  scale: int
  sparvar: ResolvedSparVAR
  kernels: str = "auto"

  @property
  def consumes_state(self) -> bool:
    return self.kind == "cs4a"

  @property
  def produces_state(self) -> bool:
    return self.kind == "dense_colsum"

  def _mode(self, q) -> str:
    if self.kernels == "auto":
      return "pallas" if _compat.on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) else \
          "reference"
    return self.kernels

  def __call__(self, q, k_buf, v_buf, kv_len: int, state=None, *, scale: float, impl: str,
               mask=None, layer=None):
    del impl, layer
    if mask is not None:
      raise ValueError(f"{self.kind} attention takes no mask (KV-cached scale steps only)")
    mode = self._mode(q)
    fn = {"dense_colsum": self._decide, "cs4a": self._listed, "csla": self._csla}[self.kind]
    return fn(mode, q, k_buf, v_buf, kv_len, state, scale)

  def _decide(self, mode, q, k_buf, v_buf, kv_len, state, scale):
    del state
    sv = self.sparvar
    gs = sv.query_group
    k, v = k_buf[:, :kv_len], v_buf[:, :kv_len]
    if mode == "reference":
      o, colsum = cs4a.dense_colsum_reference(q, k, v, group_size=gs, scale=scale)
    else:
      tile = _tile(gs)
      o, colsum = dense_colsum_attention(
          q, k, v, group_size=gs, scale=scale, interpret=mode == "interpret",
          config=ColsumConfig(block_q=tile, dense=BlockSparseConfig(tile, 64, 4, 2)))
    if sv.block_mode:
      bs = sv.config.block_size
      idx = cs4a.topk_indices(cs4a.pool_blocks(colsum, bs), sv.budget_blocks)
    else:
      idx = cs4a.topk_indices(colsum, sv.budget)
    o_cache = None
    if sv.config.output_cache:
      if sv.block_mode:
        table = cs4a.block_table(idx, -(-kv_len // bs))
        o_sparse = self._blocks(mode, q, k_buf, v_buf, kv_len, table, sv.budget_blocks, None,
                                scale)
      else:
        o_sparse = self._gather(mode, q, k_buf, v_buf, kv_len, idx, None, scale)
      o_cache = (o.astype(jnp.float32) - o_sparse.astype(jnp.float32)).astype(q.dtype)
    return o, cs4a.CS4AState(idx, o_cache)

  def _listed(self, mode, q, k_buf, v_buf, kv_len, state, scale):
    sv = self.sparvar
    residual = None
    if state.o_cache_BlHc is not None:
      residual = cs4a.upsample_cache(state.o_cache_BlHc, sv.grids[sv.decision],
                                     sv.grids[self.scale]).astype(q.dtype)
    if sv.block_mode:
      source, static = sv.static_blocks(self.scale)
      table = cs4a.block_table(state.indices_BHGK, static.shape[1], source, static)
      bound = sv.budget_blocks + int(static.sum(-1).max())
      return self._blocks(mode, q, k_buf, v_buf, kv_len, table, bound, residual, scale), None
    idx = cs4a.assemble_lists(state.indices_BHGK, sv.lists(self.scale))
    return self._gather(mode, q, k_buf, v_buf, kv_len, idx, residual, scale), None

  def _gather(self, mode, q, k_buf, v_buf, kv_len, idx, residual, scale):
    gs = self.sparvar.config.group_size
    if mode == "reference":
      return cs4a.listed_attention_reference(q, k_buf[:, :kv_len], v_buf[:, :kv_len], idx,
                                             residual, group_size=gs, scale=scale)
    return gather_attention(q, k_buf, v_buf, idx, None, residual, group_size=gs, scale=scale,
                            config=GatherConfig(block_q=_tile(gs)),
                            interpret=mode == "interpret")

  def _blocks(self, mode, q, k_buf, v_buf, kv_len, table, max_blocks, residual, scale):
    """Block mode: each query block attends to the key blocks of its table row."""
    bs = self.sparvar.config.block_size
    if mode == "reference":
      mult = cs4a.block_table_tokens(table, kv_len, bs)
      return cs4a.group_mask_attention_reference(q, k_buf[:, :kv_len], v_buf[:, :kv_len],
                                                 mult, residual, group_size=bs, scale=scale)
    mask = cs4a.mask_from_table(table, q_len=q.shape[1], kv_len=kv_len, block=bs,
                                max_blocks=max_blocks + 1)
    config = None if bs % 128 == 0 else BlockSparseConfig(_tile(bs, 128), _tile(bs, 64))
    o = block_sparse_attention(q, k_buf, v_buf, mask, scale=scale, config=config,
                               interpret=mode == "interpret")
    if residual is not None:
      o = (o.astype(jnp.float32) + residual.astype(jnp.float32)).astype(q.dtype)
    return o

  def _csla(self, mode, q, k_buf, v_buf, kv_len, state, scale):
    del state
    sv = self.sparvar
    exact = sv.config.csla_granularity == "exact"
    if mode == "reference":
      keep = csla.cached_token_mask(sv.grids, self.scale, sv.config.sink_scales, sv.windows,
                                    sv.config.block_size, exact)
      return attention_xla(q, k_buf[:, :kv_len], v_buf[:, :kv_len], mask=keep,
                           scale=scale), None
    mask = sv.csla_mask(self.scale)
    if mask.kv_len != kv_len:
      raise ValueError(f"CSLA mask of scale {self.scale} is for {mask.kv_len} keys, the cache "
                       f"holds {kv_len}")
    rule = sv.csla_rule(self.scale) if exact else None
    b = sv.config.block_size
    # The kernels' default tiles (128 x 64, 64 x 64 exact) must divide the mask's blocks.
    config = None if b % 128 == 0 else BlockSparseConfig(_tile(b, 64 if exact else 128),
                                                        _tile(b, 64))
    return block_sparse_attention(q, k_buf, v_buf, mask, rule, scale=scale, config=config,
                                  interpret=mode == "interpret"), None


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int
  stop: int
  attend: Any  # DENSE or a LayerAttention

  @property
  def kind(self) -> str:
    return self.attend.kind


@dataclasses.dataclass(frozen=True)
class AttnPlan:
  """Per scale, the segments the model runs (static, hashable; goes into report.json)."""
  schedule: Schedule
  depth: int
  scales: tuple[tuple[Segment, ...], ...]
  sparvar: ResolvedSparVAR | None = None
  kernels: str = "auto"

  @property
  def name(self) -> str:
    return "dense" if self.sparvar is None else "sparvar"

  def segments(self, si: int) -> tuple[Segment, ...]:
    return self.scales[si]

  def produces_state(self, si: int) -> bool:
    return any(s.attend.produces_state for s in self.scales[si])

  def describe(self) -> dict[str, Any]:
    return {
        "attention": self.name,
        "kernels": self.kernels,
        "scales": [[{"layers": [s.start, s.stop], "kind": s.kind} for s in segs]
                   for segs in self.scales],
        "sparvar": None if self.sparvar is None else self.sparvar.describe(),
    }


def _check(schedule: Schedule, depth: int, kernels: str):
  if depth < 1:
    raise PlanError(f"depth must be >= 1, got {depth}")
  if kernels not in KERNELS:
    raise PlanError(f"kernels must be one of {KERNELS}, got {kernels!r}")


def dense_plan(schedule: Schedule, depth: int) -> AttnPlan:
  """Every layer of every scale dense: plain generation."""
  _check(schedule, depth, "auto")
  seg = (Segment(0, depth, DENSE),)
  return AttnPlan(schedule, depth, (seg,) * schedule.num_scales)


def sparvar_plan(schedule: Schedule, depth: int, config: SparVARConfig = SparVARConfig(),
                 kernels: str = "auto") -> AttnPlan:
  """SparVAR: dense before the decision scale; from it on CS4A in layers 0..bound_layer
  (dense + column sums at the decision scale, lists after it) and CSLA above."""
  _check(schedule, depth, kernels)
  sv = config.resolve(schedule, depth)
  scales = []
  for si in range(schedule.num_scales):
    if si < sv.decision:
      scales.append((Segment(0, depth, DENSE),))
      continue
    segs = []
    if sv.cs4a_end > 0:
      kind = "dense_colsum" if si == sv.decision else "cs4a"
      segs.append(Segment(0, sv.cs4a_end, LayerAttention(kind, si, sv, kernels)))
    if sv.cs4a_end < depth:
      attend = LayerAttention("csla", si, sv, kernels) if config.use_csla else DENSE
      segs.append(Segment(sv.cs4a_end, depth, attend))
    scales.append(tuple(segs))
  return AttnPlan(schedule, depth, tuple(scales), sv, kernels)
