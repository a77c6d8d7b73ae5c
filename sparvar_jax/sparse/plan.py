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
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (BlockSparseConfig, ColsumConfig, GatherConfig,
                            block_sparse_attention, dense_colsum_attention, gather_attention,
                            key_budget)
from pallas_kernels import _compat
from sparvar_jax.nn.attention import DENSE, attention_xla
from sparvar_jax.schedules import Schedule
from sparvar_jax.sparse import cs4a, csla

KINDS = ("dense", "dense_colsum", "cs4a", "csla")
KERNELS = ("auto", "reference", "interpret")
MAPPINGS = ("group", "kv_shift")
CSLA_GRANULARITIES = ("block", "exact")

# The authors' CSLA windows for the last five key scales of the 1024x1024 schedule; the
# rule aligns them to the last scale of any schedule (earlier key scales: -1, dropped).
_CSLA_TAIL = (1, 1, 3, 5, 7)


class PlanError(ValueError):
  """A SparVAR setting that does not fit the schedule or the model; says which and why."""


@dataclasses.dataclass(frozen=True)
class SparVARConfig:
  """SparVAR's policy. Defaults are the authors' for Infinity at 1024x1024 (pn 1M).

  decision_scale: the scale whose dense attention picks the keys (None: the third-last
    scale, 10 of 13). Scales before it run dense; CSLA and CS4A act from it on.
  top_keys: fraction of the decision scale's keys each query group keeps.
  bound_layer: CS4A in layers 0..bound_layer, CSLA in the layers above.
  sink_scales: CSLA's attention sinks: every key of scales 0..sink_scales-1.
  csla_windows: CSLA window side per KEY scale (-1: that scale is not seen outside the
    sink). None: -1 .. -1, 1, 1, 3, 5, 7 aligned to the last scale.
  cs4a_bands: the current-scale band window of each scale after the decision scale.
    None: 7, 9, 11, ... (the authors' 7x7 and 9x9 at scales 11 and 12).
  group_size: queries per CS4A group (consecutive in raster order).
  key_multiple: key budgets and bands are rounded to multiples of this (the authors' 112,
    their CUDA kernel's key tile).
  block_size: CSLA's block side (block-granular mask, FlexAttention's 128).
  mapping: "group" (the authors' active mapping: a group inherits the list of its nearest
    group at the previous scale and adds a band of the current scale) or "kv_shift" (keys
    move to the scale (k - decision) later, rescaled; the authors' unevaluated variant).
  output_cache: add the decision scale's O_dense - O_sparse, upsampled (the paper's
    residual cache).
  csla_granularity: "block" (whole 128x128 blocks with a visible token, as the authors run
    it) or "exact" (the token rule inside the blocks).
  use_cs4a / use_csla: ablations; a disabled part runs dense.
  """

  decision_scale: int | None = None
  top_keys: float = 0.2
  bound_layer: int = 10
  sink_scales: int = 5
  csla_windows: tuple[int, ...] | None = None
  cs4a_bands: tuple[int, ...] | None = None
  group_size: int = 192
  key_multiple: int = 112
  block_size: int = 128
  mapping: str = "group"
  output_cache: bool = True
  csla_granularity: str = "block"
  use_cs4a: bool = True
  use_csla: bool = True

  def __post_init__(self):
    if not 0.0 < self.top_keys <= 1.0:
      raise PlanError(f"top_keys must be in (0, 1] (a fraction of the keys), got {self.top_keys}")
    for name in ("group_size", "key_multiple", "block_size"):
      if getattr(self, name) < 1:
        raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.bound_layer < -1:
      raise PlanError(f"bound_layer must be >= -1 (-1: no CS4A layer), got {self.bound_layer}")
    if self.sink_scales < 0:
      raise PlanError(f"sink_scales must be >= 0, got {self.sink_scales}")
    if self.mapping not in MAPPINGS:
      raise PlanError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
    if self.csla_granularity not in CSLA_GRANULARITIES:
      raise PlanError(f"csla_granularity must be one of {CSLA_GRANULARITIES}, got "
                      f"{self.csla_granularity!r}")
    for name in ("csla_windows", "cs4a_bands"):
      v = getattr(self, name)
      if v is not None:
        object.__setattr__(self, name, tuple(int(x) for x in v))
    if self.csla_windows is not None and any(w < -1 for w in self.csla_windows):
      raise PlanError(f"csla_windows entries must be -1 (scale unseen) or >= 0, got "
                      f"{self.csla_windows}")
    if self.cs4a_bands is not None and any(w < 1 for w in self.cs4a_bands):
      raise PlanError(f"cs4a_bands entries must be >= 1, got {self.cs4a_bands}")

  def resolve(self, schedule: Schedule, depth: int) -> "ResolvedSparVAR":
    """The concrete setting for one schedule and model depth; refuses what does not fit."""
    n = schedule.num_scales
    d = n - 3 if self.decision_scale is None else self.decision_scale
    if not 1 <= d <= n - 2:
      raise PlanError(
          f"decision_scale={d} does not fit a schedule of {n} scales: it must be in "
          f"[1, {n - 2}] so that at least one scale follows it"
          + ("" if self.decision_scale is not None else " (the default is the third-last "
             "scale; this schedule is too short for SparVAR)") + ".")
    windows = self.csla_windows
    if windows is None:
      windows = ((-1,) * max(n - len(_CSLA_TAIL), 0) + _CSLA_TAIL)[-n:]
    if len(windows) != n:
      raise PlanError(f"csla_windows has {len(windows)} entries but the schedule has {n} "
                      "scales: give one window per key scale.")
    bands = self.cs4a_bands
    later = n - 1 - d
    if bands is None:
      bands = tuple(7 + 2 * i for i in range(later))
    if len(bands) < later:
      raise PlanError(f"cs4a_bands has {len(bands)} entries but {later} scales follow the "
                      f"decision scale {d}: give one band window per later scale.")
    if self.sink_scales > d:
      raise PlanError(f"sink_scales={self.sink_scales} exceeds the decision scale {d}: the "
                      "sinks must be scales before the sparse ones.")
    grids = tuple(schedule.scales)
    kv_len = schedule.offsets[d + 1]
    budget = key_budget(self.top_keys, kv_len, min(self.key_multiple, kv_len))
    return ResolvedSparVAR(config=self, grids=grids, depth=depth, decision=d,
                           windows=tuple(windows), bands=tuple(bands[:later]), budget=budget)


@dataclasses.dataclass(frozen=True)
class ResolvedSparVAR:
  """A SparVARConfig made concrete for one schedule and depth (hashable, static)."""
  config: SparVARConfig
  grids: tuple[tuple[int, int], ...]
  depth: int
  decision: int
  windows: tuple[int, ...]
  bands: tuple[int, ...]
  budget: int  # keys per group at the decision scale

  @property
  def cs4a_end(self) -> int:
    """CS4A runs in layers [0, cs4a_end)."""
    return min(self.config.bound_layer + 1, self.depth) if self.config.use_cs4a else 0

  def lists(self, k: int) -> cs4a.LaterScaleLists:
    c = self.config
    return cs4a.later_scale_lists(self.grids, self.decision, k, self.bands, c.group_size,
                                  c.key_multiple, c.mapping)

  def keys_per_group(self, k: int) -> int:
    if k == self.decision:
      return self.budget
    lists = self.lists(k)
    if lists.shift is not None:
      return self.budget
    return self.budget + lists.static_GN.shape[1]

  def csla_mask(self, k: int):
    return _csla_mask(self.grids, k, self.config.sink_scales, self.windows,
                      self.config.block_size)

  def csla_rule(self, k: int):
    return _csla_rule(self.grids, k, self.config.sink_scales, self.windows)

  def describe(self) -> dict[str, Any]:
    c = self.config
    out = dict(dataclasses.asdict(c))
    out.update(decision_scale=self.decision, csla_windows=list(self.windows),
               cs4a_bands=list(self.bands), cs4a_layers=[0, self.cs4a_end],
               csla_layers=[self.cs4a_end, self.depth] if c.use_csla else [],
               keys_per_group={}, csla_block_density={})
    for k in range(self.decision, len(self.grids)):
      total = sum(h * w for h, w in self.grids[:k + 1])
      if self.cs4a_end > 0:
        out["keys_per_group"][str(k)] = {"keys": self.keys_per_group(k), "of": total}
      if c.use_csla and self.cs4a_end < self.depth:
        out["csla_block_density"][str(k)] = round(float(self.csla_mask(k).density()), 4)
    return out


@functools.lru_cache(maxsize=64)
def _csla_rule(grids, k, sink_scales, windows):
  return csla.csla_rule(k, grids, sink_scales, windows)


@functools.lru_cache(maxsize=64)
def _csla_mask(grids, k, sink_scales, windows, block):
  rule = _csla_rule(grids, k, sink_scales, windows)
  from pallas_kernels import BlockMask  # pylint: disable=g-import-not-at-top
  return BlockMask.from_rule(rule, block_q=block, block_kv=block)


@functools.lru_cache(maxsize=16)
def _csla_keep(grids, k, sink_scales, windows, block, exact):
  """The token mask the kernel's semantics give, bool [l, kv_len] (references)."""
  rule = _csla_rule(grids, k, sink_scales, windows)
  if exact:
    return rule.token_mask()
  blocks = np.asarray(_csla_mask(grids, k, sink_scales, windows, block).block_types()[0, 0]) > 0
  keep = np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)
  out = keep[:rule.q_len, :rule.kv_len]
  out.setflags(write=False)
  return out


def _tile(size: int, preferred: int = 64) -> int:
  """The largest power of two <= preferred (and >= 16) dividing `size`."""
  t = preferred
  while t > 16 and size % t:
    t //= 2
  if size % t:
    raise PlanError(f"group_size={size} must be a multiple of 16 for the Pallas kernels.")
  return t


@dataclasses.dataclass(frozen=True)
class LayerAttention:
  """SparVAR's attention for the layers of one segment at scale `scale` (static).

  Called as `attend(q, k_buf, v_buf, kv_len, state, scale=, impl=, mask=)` -> (o, state_out)
  by SelfAttention; k_buf / v_buf are the layer's KV-cache buffers, valid up to kv_len."""
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
               mask=None):
    del impl
    if mask is not None:
      raise ValueError(f"{self.kind} attention takes no mask (KV-cached scale steps only)")
    mode = self._mode(q)
    fn = {"dense_colsum": self._decide, "cs4a": self._listed, "csla": self._csla}[self.kind]
    return fn(mode, q, k_buf, v_buf, kv_len, state, scale)

  def _decide(self, mode, q, k_buf, v_buf, kv_len, state, scale):
    del state
    sv, gs = self.sparvar, self.sparvar.config.group_size
    k, v = k_buf[:, :kv_len], v_buf[:, :kv_len]
    if mode == "reference":
      o, colsum = cs4a.dense_colsum_reference(q, k, v, group_size=gs, scale=scale)
    else:
      tile = _tile(gs)
      o, colsum = dense_colsum_attention(
          q, k, v, group_size=gs, scale=scale, interpret=mode == "interpret",
          config=ColsumConfig(block_q=tile, dense=BlockSparseConfig(tile, 64, 4, 2)))
    idx = cs4a.topk_indices(colsum, sv.budget)
    o_cache = None
    if sv.config.output_cache:
      o_sparse = self._gather(mode, q, k_buf, v_buf, kv_len, idx, None, scale)
      o_cache = (o.astype(jnp.float32) - o_sparse.astype(jnp.float32)).astype(q.dtype)
    return o, cs4a.CS4AState(idx, o_cache)

  def _listed(self, mode, q, k_buf, v_buf, kv_len, state, scale):
    sv = self.sparvar
    idx = cs4a.assemble_lists(state.indices_BHGK, sv.lists(self.scale))
    residual = None
    if state.o_cache_BlHc is not None:
      residual = cs4a.upsample_cache(state.o_cache_BlHc, sv.grids[sv.decision],
                                     sv.grids[self.scale]).astype(q.dtype)
    return self._gather(mode, q, k_buf, v_buf, kv_len, idx, residual, scale), None

  def _gather(self, mode, q, k_buf, v_buf, kv_len, idx, residual, scale):
    gs = self.sparvar.config.group_size
    if mode == "reference":
      return cs4a.listed_attention_reference(q, k_buf[:, :kv_len], v_buf[:, :kv_len], idx,
                                             residual, group_size=gs, scale=scale)
    return gather_attention(q, k_buf, v_buf, idx, None, residual, group_size=gs, scale=scale,
                            config=GatherConfig(block_q=_tile(gs)),
                            interpret=mode == "interpret")

  def _csla(self, mode, q, k_buf, v_buf, kv_len, state, scale):
    del state
    sv = self.sparvar
    exact = sv.config.csla_granularity == "exact"
    if mode == "reference":
      keep = _csla_keep(sv.grids, self.scale, sv.config.sink_scales, sv.windows,
                        sv.config.block_size, exact)
      return attention_xla(q, k_buf[:, :kv_len], v_buf[:, :kv_len], mask=keep,
                           scale=scale), None
    mask = sv.csla_mask(self.scale)
    if mask.kv_len != kv_len:
      raise ValueError(f"CSLA mask of scale {self.scale} is for {mask.kv_len} keys, the cache "
                       f"holds {kv_len}")
    rule = sv.csla_rule(self.scale) if exact else None
    return block_sparse_attention(q, k_buf, v_buf, mask, rule, scale=scale,
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
