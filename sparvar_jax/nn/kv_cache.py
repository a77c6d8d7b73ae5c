"""Preallocated KV cache for per-scale inference over stacked layers.

k, v: [N, B, S_pad, H, c] (N layers). A scale step writes its keys/values at a static
offset with `dynamic_update_slice` (in place under donation / inside a scan carry); the
attention then reads layer `layer` with the valid length offset + l (`layer_view`): kernels
that take a key length read the buffer in place, the XLA path slices the prefix. S_pad may
exceed the schedule's length (padding to a kernel block size); the padding is never read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: jax.Array  # [N, B, S_pad, H, c]
  v: jax.Array  # [N, B, S_pad, H, c]
  SHARD_AXES = {"k": (1, 3), "v": (1, 3)}  # (rows, heads): sparvar_jax/sharding.py

  @classmethod
  def zeros(cls, num_layers: int, batch: int, length: int, num_heads: int, head_dim: int,
            dtype=jnp.float32, pad_to: int = 1) -> "KVCache":
    s_pad = -(-length // pad_to) * pad_to
    shape = (num_layers, batch, s_pad, num_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def write(self, layer, offset: int, k_BlHc: jax.Array, v_BlHc: jax.Array) -> "KVCache":
    """Writes layer `layer` (int or traced) at [offset, offset + l) (offset static)."""
    end = offset + k_BlHc.shape[1]
    if end > self.max_len:
      raise ValueError(f"KV cache of length {self.max_len} cannot hold tokens up to {end}")
    if k_BlHc.shape[0] != self.batch:
      raise ValueError(f"KV cache holds {self.batch} rows, the step writes {k_BlHc.shape[0]}")
    idx = (layer, 0, offset, 0, 0)
    k = jax.lax.dynamic_update_slice(self.k, k_BlHc.astype(self.k.dtype)[None], idx)
    v = jax.lax.dynamic_update_slice(self.v, v_BlHc.astype(self.v.dtype)[None], idx)
    return KVCache(k, v)

  def layer_view(self, layer) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s whole buffers k, v [B, S_pad, H, c]; rows past the valid length are
    stale or zero and must not be attended."""
    return (jax.lax.dynamic_index_in_dim(self.k, layer, 0, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.v, layer, 0, keepdims=False))

  def write_read(self, layer, offset: int, k_BlHc: jax.Array, v_BlHc: jax.Array):
    """`write`, then the prefix [0, offset + l) of the layer: (cache, k_BSHc, v_BSHc)."""
    end = offset + k_BlHc.shape[1]
    cache = self.write(layer, offset, k_BlHc, v_BlHc)
    k_BSHc, v_BSHc = cache.layer_view(layer)
    return cache, k_BSHc[:, :end], v_BSHc[:, :end]

  def rows(self, start: int, stop: int) -> "KVCache":
    """The cache of batch rows [start, stop) (e.g. the conditional half once CFG stops)."""
    return KVCache(self.k[:, start:stop], self.v[:, start:stop])
