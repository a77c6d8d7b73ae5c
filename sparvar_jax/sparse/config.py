"""SparVAR's policy settings (`SparVARConfig`) and their resolution for one schedule.

Pure data and arithmetic (no JAX), so the CLI can check every setting against the schedule
and the model's depth before it loads anything; `sparvar_jax/sparse/plan.py` turns the
resolved setting into an attention plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparvar_jax.schedules import Schedule

MAPPINGS = ("group", "kv_shift")
CSLA_GRANULARITIES = ("block", "exact")
CS4A_GRANULARITIES = ("token", "block")


def key_budget(fraction: float, kv_len: int, multiple: int) -> int:
  """The authors' key count: multiple * round(fraction * kv_len / multiple) (Python's
  round, half to even), kept within [multiple, kv_len]."""
  multiple = min(multiple, kv_len)
  return int(min(max(int(round(fraction * kv_len / multiple)) * multiple, multiple), kv_len))


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
  cs4a_granularity: "token" (the authors': each group of `group_size` queries keeps single
    keys, run by the token-gather kernel) or "block" (our variant: groups are the
    block-sparse kernel's query blocks of `block_size` and keep whole key blocks, the top
    ones of the block-pooled column sums, run by the block-sparse kernel).
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
  cs4a_granularity: str = "token"
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
    if self.cs4a_granularity not in CS4A_GRANULARITIES:
      raise PlanError(f"cs4a_granularity must be one of {CS4A_GRANULARITIES}, got "
                      f"{self.cs4a_granularity!r}")
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
    budget = key_budget(self.top_keys, schedule.offsets[d + 1], self.key_multiple)
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

  def lists(self, k: int):
    """Scale k's static list layout (`cs4a.LaterScaleLists`)."""
    from sparvar_jax.sparse import cs4a  # pylint: disable=g-import-not-at-top
    c = self.config
    return cs4a.later_scale_lists(self.grids, self.decision, k, self.bands, c.group_size,
                                  c.key_multiple, c.mapping)

  @property
  def block_mode(self) -> bool:
    return self.config.cs4a_granularity == "block"

  @property
  def query_group(self) -> int:
    """Queries per CS4A group: group_size, or the block size in block mode."""
    return self.config.block_size if self.block_mode else self.config.group_size

  @property
  def budget_blocks(self) -> int:
    """Key blocks per group at the decision scale (block mode)."""
    return max(1, int(round(self.budget / self.config.block_size)))

  def static_blocks(self, k: int):
    """Block mode: (source group [G_k], bool [G_k, nKb]) of scale k's static bands."""
    from sparvar_jax.sparse import cs4a  # pylint: disable=g-import-not-at-top
    c = self.config
    return cs4a.static_block_table(self.grids, self.decision, k, self.bands, c.block_size,
                                   c.key_multiple)

  def keys_per_group(self, k: int) -> int:
    """Selected keys per group (block mode: the most any group visits, in tokens)."""
    if self.block_mode:
      extra = 0 if k == self.decision else int(self.static_blocks(k)[1].sum(-1).max())
      return (self.budget_blocks + extra) * self.config.block_size
    if k == self.decision:
      return self.budget
    lists = self.lists(k)
    if lists.shift is not None:
      return self.budget
    return self.budget + lists.static_GN.shape[1]

  def csla_mask(self, k: int):
    """CSLA's static block mask of query scale k (`pallas_kernels.BlockMask`)."""
    from sparvar_jax.sparse import csla  # pylint: disable=g-import-not-at-top
    return csla.cached_block_mask(self.grids, k, self.config.sink_scales, self.windows,
                                  self.config.block_size)

  def csla_rule(self, k: int):
    from sparvar_jax.sparse import csla  # pylint: disable=g-import-not-at-top
    return csla.cached_rule(self.grids, k, self.config.sink_scales, self.windows)

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
