"""Stacked layers: N identical modules with a leading layer axis, run with `lax.scan`.

Compile time then does not grow with depth: the layer body is traced once. Parameters
of a stacked module have shape [N, ...] (e.g. `blocks/attn/mat_qkv/kernel` [N, C, 3C]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from sparvar_jax.nn.attention import DENSE

M = TypeVar("M", bound=nnx.Module)


def stack_modules(make: Callable[[nnx.Rngs], M], n: int, rngs: nnx.Rngs) -> M:
  """Builds `make(rngs)` n times with independent keys, stacked along axis 0."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(r: nnx.Rngs) -> M:
    return make(r)

  return create(rngs)


def num_layers(stacked: nnx.Module) -> int:
  leaves = jax.tree.leaves(nnx.state(stacked, nnx.Param))
  return leaves[0].shape[0]


def scan_layers(stacked: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
                carry: Any, xs: Any = None) -> tuple[Any, Any]:
  """lax.scan over layers: `body(layer, carry, x_i) -> (carry, y_i)`.

  `layer` is the i-th module (a fresh view of the i-th parameter slice); `xs` are extra
  per-layer inputs with a leading axis N (or None). The layer index is available as
  `jnp.arange(N)` passed in xs where the body needs it (e.g. to address a KV cache).
  """
  graphdef, state = nnx.split(stacked)

  def step(c, inp):
    st, x = inp
    return body(nnx.merge(graphdef, st), c, x)

  return jax.lax.scan(step, carry, (state, xs))


def scan_layer_range(stacked: nnx.Module, start: int, stop: int,
                     body: Callable[[nnx.Module, Any, jax.Array, Any], tuple[Any, Any]],
                     carry: Any, xs: Any = None) -> tuple[Any, Any]:
  """lax.scan over layers [start, stop): `body(layer, carry, i, x_i) -> (carry, y_i)`.

  The i-th parameters are read from the whole stack by index (a dynamic slice inside the
  loop), so running a model as several layer ranges, each with its own attention kind,
  slices no copy of the weights. `i` is the absolute layer index (traced); `xs` have a
  leading axis of stop - start.
  """
  if not 0 <= start < stop:
    raise ValueError(f"empty or negative layer range [{start}, {stop})")
  graphdef, state = nnx.split(stacked)

  def step(c, inp):
    i, x = inp
    st = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), state)
    return body(nnx.merge(graphdef, st), c, i, x)

  return jax.lax.scan(step, carry, (jnp.arange(start, stop, dtype=jnp.int32), xs))


class AllLayers:
  """The one segment of a model run without an attention plan: every layer, dense."""

  def __init__(self, depth: int):
    self.start, self.stop, self.attend = 0, depth, DENSE


def run_segments(stacked: nnx.Module, depth: int, segments, call_block, x, cache, sparse):
  """The layers as an attention plan's segments, one lax.scan each -> (x, cache, sparse).

  segments: `.start`, `.stop`, `.attend` each (None: every layer dense).
  `call_block(layer, x, cache, i, attend, layer_state) -> (x, cache, layer_out)` runs one
  layer. A segment whose attention consumes sparse state scans over `sparse` (leading axis
  = its layers); one that produces it returns the new state, stacked over its layers.
  """
  for seg in segments or (AllLayers(depth),):
    def body(blk, carry, i, st, attend=seg.attend):
      x, cache = carry
      x, cache, out = call_block(blk, x, cache, i, attend, st)
      return (x, cache), out

    xs = sparse if seg.attend.consumes_state else None
    (x, cache), ys = scan_layer_range(stacked, seg.start, seg.stop, body, (x, cache), xs)
    if seg.attend.produces_state:
      sparse = ys
  return x, cache, sparse
