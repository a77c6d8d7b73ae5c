"""Generation on several devices: a `jax.sharding.Mesh` with a `batch` axis (data parallel)
and, optionally, a `model` axis (Infinity's weights split by attention heads and FFN units).

Data parallel: the parameters are replicated; every array the scale loop carries (the
condition, the KV cache, the latent, the next input, the keys, SparVAR's state) is split
along its row axis over `batch`, and the per-scale steps are the same jitted functions as
on one device: `jit` partitions them from the placement of their operands, and the loop
pins each step's outputs to the same row split (`constrain`), so no step drifts to a
replicated layout that would compute every row on every device. Rows never interact (no
reduction runs across rows), so a row's values do not depend on how many devices share
the batch.

Row axes: axis 0 unless the pytree dataclass holding the array names another in its
`SHARD_AXES` ({field: (row axis, head axis or None)}); the head axis is split over
`model` when the mesh has one (the KV cache and the text keys/values are [N, B, S, H, c]).

Model parallel (`infinity_param_specs`): Megatron's split of each block: the q|k|v and
FFN-in kernels by output columns, the attention and FFN-out projections by input rows (an
all-reduce after each), the per-head biases and scales with their heads. XLA inserts the
collectives.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH, MODEL = "batch", "model"


def make_mesh(devices: Sequence[Any] | None = None, model_parallel: int = 1) -> Mesh:
  """A (batch, model) mesh over `devices` (default: this process's local devices);
  model_parallel devices share each row group's weights."""
  devices = list(jax.local_devices() if devices is None else devices)
  n = len(devices)
  if model_parallel < 1 or n % model_parallel:
    raise ValueError(f"model_parallel must divide the {n} devices, got {model_parallel}")
  return Mesh(np.array(devices, dtype=object).reshape(n // model_parallel, model_parallel),
              (BATCH, MODEL))


def batch_size_of(mesh: Mesh) -> int:
  """Devices along the batch axis: a batch must hold a multiple of this many rows."""
  return int(mesh.shape[BATCH])


def _leaf_spec(x, row_axis: int, head_axis: int | None, mesh: Mesh) -> P:
  ndim = len(x.shape)
  if ndim == 0:
    return P()
  spec = [None] * ndim
  spec[row_axis] = BATCH
  m = mesh.shape.get(MODEL, 1)
  if head_axis is not None and m > 1 and x.shape[head_axis] % m == 0:
    spec[head_axis] = MODEL
  return P(*spec)


def row_specs(tree: Any, mesh: Mesh) -> Any:
  """PartitionSpecs splitting every array of `tree` along its row axis (module docstring)."""
  def visit(node):
    if node is None:
      return None
    axes = getattr(type(node), "SHARD_AXES", None)
    if axes is not None and dataclasses.is_dataclass(node):
      fields = {}
      for f in dataclasses.fields(node):
        row, head = axes.get(f.name, (0, None))
        v = getattr(node, f.name)
        fields[f.name] = None if v is None else _leaf_spec(v, row, head, mesh)
      return type(node)(**fields)
    if isinstance(node, (tuple, list)):
      return type(node)(visit(v) for v in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return _leaf_spec(node, 0, None, mesh)
  return visit(tree)


def _shardings(tree, mesh: Mesh):
  specs = row_specs(tree, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def put_rows(tree: Any, mesh: Mesh) -> Any:
  """device_put of host or device arrays, split along their row axes."""
  return jax.device_put(tree, _shardings(tree, mesh))


def constrain_rows(tree: Any, mesh: Mesh) -> Any:
  """Inside a jitted function: pins `tree`'s arrays to the row split."""
  return jax.lax.with_sharding_constraint(tree, _shardings(tree, mesh))


def place_params(state: Any, mesh: Mesh, specs: Any = None) -> Any:
  """Parameters onto the mesh: `specs` (a PartitionSpec tree, e.g. `infinity_param_specs`)
  or replicated. Arrays already placed on this mesh are left where they are, so several
  loops over one model share one copy of its weights."""
  def put(x, spec):
    sh = getattr(x, "sharding", None)
    if spec is None and isinstance(sh, NamedSharding) and sh.mesh == mesh:
      return x
    return jax.device_put(x, NamedSharding(mesh, P() if spec is None else spec))
  if specs is None:
    return jax.tree.map(lambda x: put(x, None), state)
  return jax.tree.map(put, state, specs)


# (path pattern, spec) for the stacked blocks of Infinity ([N, ...]: N layers first). The
# q|k|v kernel's columns are laid out (3, H, c), so its contiguous split is head-aligned
# only after XLA moves the pieces (an all-to-all per layer); the other splits fall on
# heads or FFN units directly.
_INFINITY_TP_RULES = (
    (r"blocks/sa/mat_qkv/kernel", P(None, None, MODEL)),  # [N, C, 3C]
    (r"blocks/sa/(q_bias|v_bias)", P(None, MODEL)),  # [N, C] = heads x c
    (r"blocks/sa/scale_mul_H", P(None, MODEL)),  # [N, H]
    (r"blocks/sa/proj/kernel", P(None, MODEL, None)),  # [N, C in, C]
    (r"blocks/ca/mat_q/kernel", P(None, None, MODEL)),  # [N, C, C]
    (r"blocks/ca/mat_q/bias", P(None, MODEL)),
    (r"blocks/ca/mat_kv/kernel", P(None, None, MODEL)),  # [N, C, 2C], (2, H, c) columns
    (r"blocks/ca/v_bias", P(None, MODEL)),
    (r"blocks/ca/proj/kernel", P(None, MODEL, None)),
    (r"blocks/ffn/fc1/kernel", P(None, None, MODEL)),  # [N, C, F]
    (r"blocks/ffn/fc1/bias", P(None, MODEL)),
    (r"blocks/ffn/fc2/kernel", P(None, MODEL, None)),  # [N, F, C]
)


def _path_str(path) -> str:
  parts = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    if name != "value":
      parts.append(str(name))
  return "/".join(parts)


def infinity_param_specs(state: Any, model_parallel: int) -> Any:
  """PartitionSpecs for an Infinity parameter state (`nnx.state(model)`) split over
  `model_parallel` devices (`_INFINITY_TP_RULES`; everything else replicated). ValueError
  naming the parameter if the count does not divide an axis it splits (the released
  models' 16 / 28 heads and FFN widths: 2, 4 or 8 for the 2B; 2, 4, 7 for the 8B)."""
  def spec(path, x):
    name = _path_str(path)
    for pattern, s in _INFINITY_TP_RULES:
      if re.fullmatch(pattern, name):
        axis = list(s).index(MODEL)
        if x.shape[axis] % model_parallel:
          raise ValueError(f"--model_parallel {model_parallel} does not divide {name} "
                           f"{tuple(x.shape)} along axis {axis}")
        return s
    return P()
  return jax.tree_util.tree_map_with_path(spec, state)
