"""Self-attention of VAR/Infinity: one qkv matmul with q/v biases, cosine attention.

Letters: B batch, L tokens, S keys, C width, H heads, c head dim.

Torch keys (`attn.` prefix): `mat_qkv.weight` [3C, C] (no bias), `q_bias` [C], `v_bias` [C],
`zero_k_bias` (a zero buffer, dropped), `scale_mul_1H11` [1, H, 1, 1], `proj.{weight,bias}`.
Ours: `mat_qkv/kernel` [C, 3C], `q_bias`, `v_bias`, `scale_mul_H` [H], `proj/{kernel,bias}`.

Cosine attention (`attn_l2_norm=True` / Infinity `cos_attn=True`):
q = normalize(q) * exp(min(scale_mul, log 100)), k = normalize(k), softmax scale 1.
The steps are separate methods so that Infinity can rotate q, k (RoPE) between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparvar_jax.nn.attention import DENSE
from sparvar_jax.nn.kv_cache import KVCache
from sparvar_jax.nn.norm import l2_normalize

MAX_SCALE_MUL = math.log(100.0)


class SelfAttention(nnx.Module):
  """x_BLC -> y_BLC (compute dtype `dtype`), optional block mask and KV cache."""

  def __init__(self, embed_dim: int, num_heads: int, *, rngs: nnx.Rngs, cos_attn: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, attn_impl: str = "xla"):
    if embed_dim % num_heads:
      raise ValueError(f"{embed_dim=} is not divisible by {num_heads=}")
    self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
    self.cos_attn, self.dtype, self.attn_impl = cos_attn, dtype, attn_impl
    init = nnx.initializers.normal(0.02)
    self.mat_qkv = nnx.Linear(embed_dim, 3 * embed_dim, use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    self.q_bias = nnx.Param(jnp.zeros((embed_dim,), param_dtype))
    self.v_bias = nnx.Param(jnp.zeros((embed_dim,), param_dtype))
    if cos_attn:
      self.scale_mul_H = nnx.Param(jnp.full((num_heads,), math.log(4.0), jnp.float32))
      self.scale = 1.0
    else:
      self.scale = 0.25 / math.sqrt(self.head_dim)
    self.proj = nnx.Linear(embed_dim, embed_dim, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=init, rngs=rngs)

  def qkv(self, x_BLC: jax.Array):
    """-> q, k, v [B, L, H, c] in `dtype` (q, k normalised and q scaled if cos_attn)."""
    B, L, C = x_BLC.shape
    q_bias, v_bias = self.q_bias[...], self.v_bias[...]
    bias_3C = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(self.dtype)
    qkv_BL3Hc = (self.mat_qkv(x_BLC) + bias_3C).reshape(B, L, 3, self.num_heads,
                                                        self.head_dim)
    q, k, v = qkv_BL3Hc[:, :, 0], qkv_BL3Hc[:, :, 1], qkv_BL3Hc[:, :, 2]
    if self.cos_attn:
      scale_mul_H = jnp.exp(jnp.minimum(self.scale_mul_H[...].astype(jnp.float32),
                                        MAX_SCALE_MUL))
      q = l2_normalize(q) * scale_mul_H[:, None]
      k = l2_normalize(k)
    return q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)

  def out(self, o_BLHc: jax.Array) -> jax.Array:
    B, L = o_BLHc.shape[:2]
    return self.proj(o_BLHc.reshape(B, L, self.num_heads * self.head_dim))

  def __call__(self, x_BLC: jax.Array, *, mask=None, cache: KVCache | None = None,
               layer=0, offset: int = 0,
               rope: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
               attend=DENSE, attn_state=None):
    """Returns (y_BLC, cache, attn_out).

    mask: bool broadcastable to [B, H, L, S] or None. With `cache`, this call's k/v are
    written to layer `layer` at static `offset` and q attends to the cached keys
    [0, offset + L) (the official inference: no mask). `rope(q, k) -> (q, k)` is applied
    after normalisation. `attend` is the layer's attention kind under an attention plan
    (default dense); `attn_state` / `attn_out` are its per-layer sparse state in and out.
    """
    q, k, v = self.qkv(x_BLC)
    if rope is not None:
      q, k = rope(q, k)
    kv_len = k.shape[1]
    if cache is not None:
      cache = cache.write(layer, offset, k, v)
      k, v = cache.layer_view(layer)
      kv_len = offset + q.shape[1]
    o_BLHc, attn_out = attend(q, k, v, kv_len, attn_state, scale=self.scale,
                              impl=self.attn_impl, mask=mask, layer=layer)
    return self.out(o_BLHc), cache, attn_out
