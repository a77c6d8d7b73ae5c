"""Preallocated KV cache for per-scale inference over stacked layers.

k, v: [N, B, S_pad, H, c] (N layers). A scale step writes its keys/values at a static
offset with `dynamic_update_slice` (in place under donation / inside a scan carry) and
reads back the prefix [0, offset + l) it attends to; S_pad may exceed the schedule's
length (padding to a kernel block size) and the padding is never read.
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

  @classmethod
  def zeros(cls, num_layers: int, batch: int, length: int, num_heads: int, head_dim: int,
            dtype=jnp.float32, pad_to: int = 1) -> "KVCache":
    s_pad = -(-length // pad_to) * pad_to
    shape = (num_layers, batch, s_pad, num_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def write_read(self, layer, offset: int, k_BlHc: jax.Array, v_BlHc: jax.Array):
    """Writes layer `layer` (int or traced) at [offset, offset+l); returns
    (cache, k_BSHc, v_BSHc) with S = offset + l (static)."""
    end = offset + k_BlHc.shape[1]
    if end > self.max_len:
      raise ValueError(f"KV cache of length {self.max_len} cannot hold tokens up to {end}")
    idx = (layer, 0, offset, 0, 0)
    k = jax.lax.dynamic_update_slice(self.k, k_BlHc.astype(self.k.dtype)[None], idx)
    v = jax.lax.dynamic_update_slice(self.v, v_BlHc.astype(self.v.dtype)[None], idx)
    k_BSHc = jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)[:, :end]
    v_BSHc = jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)[:, :end]
    return KVCache(k, v), k_BSHc, v_BSHc
