"""Diagnostics: how far each sparse layer's attention output is from dense attention on the
same queries, keys and values (the fidelity tool's per-layer error).

`probe_plan(plan, name)` wraps every SparVAR layer attention of a plan; each call records
||o_sparse - o_dense|| / ||o_dense|| for its (scale, layer) through a host callback, and
`take(name)` returns and clears what was recorded. The probes compute a dense reference per
layer: for measuring, not for speed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparvar_jax.nn.attention import attention_xla
from sparvar_jax.sparse.plan import AttnPlan, LayerAttention, Segment

_RECORDS: dict[str, dict[tuple[int, int], list[float]]] = collections.defaultdict(
    lambda: collections.defaultdict(list))


def _record(name: str, scale: int, layer, err) -> None:
  _RECORDS[name][(scale, int(np.asarray(layer)))].append(float(np.asarray(err)))


@dataclasses.dataclass(frozen=True)
class ProbedAttention:
  """A layer attention that also reports its relative error against dense attention."""
  inner: LayerAttention
  name: str

  @property
  def kind(self) -> str:
    return self.inner.kind

  @property
  def consumes_state(self) -> bool:
    return self.inner.consumes_state

  @property
  def produces_state(self) -> bool:
    return self.inner.produces_state

  def __call__(self, q, k_buf, v_buf, kv_len: int, state=None, *, scale: float, impl: str,
               mask=None, layer=None):
    o, out = self.inner(q, k_buf, v_buf, kv_len, state, scale=scale, impl=impl, mask=mask,
                        layer=layer)
    ref = attention_xla(q.astype(jnp.float32), k_buf[:, :kv_len].astype(jnp.float32),
                        v_buf[:, :kv_len].astype(jnp.float32), scale=scale)
    err = jnp.linalg.norm(o.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
    jax.debug.callback(functools.partial(_record, self.name, self.inner.scale),
                       jnp.asarray(-1 if layer is None else layer), err)
    return o, out


def probe_plan(plan: AttnPlan, name: str) -> AttnPlan:
  """The same plan with every SparVAR layer attention probed under `name`."""
  def wrap(seg: Segment) -> Segment:
    if isinstance(seg.attend, LayerAttention):
      return Segment(seg.start, seg.stop, ProbedAttention(seg.attend, name))
    return seg
  return dataclasses.replace(plan, scales=tuple(tuple(wrap(s) for s in segs)
                                                for segs in plan.scales))


def take(name: str) -> dict[int, dict[int, float]]:
  """{scale: {layer: mean relative error}} recorded under `name` since the last take."""
  got = _RECORDS.pop(name, {})
  out: dict[int, dict[int, Any]] = collections.defaultdict(dict)
  for (scale, layer), errs in sorted(got.items()):
    out[scale][layer] = float(np.mean(errs))
  return dict(out)
