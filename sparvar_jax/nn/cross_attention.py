"""Infinity's cross-attention to text (`CrossAttention`, infinity/models/basic.py).

Letters: B batch, L query tokens, T text tokens (padded), C width, K text width,
H heads, c head dim.

Torch keys: `mat_q.{weight,bias}` (a Linear; for the text pooling a learned query
`mat_q` [1, H, c]), `mat_kv.weight` [2C, K] (no bias), `v_bias` [C], `zero_k_bias`
(zero buffer, dropped), `proj.{weight,bias}`. Ours: `mat_q/{kernel,bias}` (or `mat_q`
[H, c]), `mat_kv/kernel` [K, 2C], `v_bias`, `proj/{kernel,bias}`.

The official code packs the prompts of a batch (flash-attn varlen); here text is padded
to a fixed length T and padded keys are masked out. Softmax scale 1/sqrt(c), no cosine
attention. `bf16_round=True` reproduces the official float32 numerics: q and kv are
rounded to bfloat16 before attention and the attention output is rounded to bfloat16
(flash-attn runs in bf16 even in a float32 model).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparvar_jax.nn.attention import attention


def _round_bf16(x: jax.Array) -> jax.Array:
  """Rounds float32 values to the nearest bfloat16 (ties to even), staying float32.

  Done on the bits: XLA may drop an f32 -> bf16 -> f32 convert pair as excess precision
  (`xla_allow_excess_precision`), which would silently skip the official rounding.
  """
  if x.dtype != jnp.float32:
    return x.astype(jnp.bfloat16).astype(x.dtype)
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  b = b + jnp.uint32(0x7FFF) + ((b >> 16) & jnp.uint32(1))
  return jax.lax.bitcast_convert_type(b & jnp.uint32(0xFFFF0000), jnp.float32)


class CrossAttention(nnx.Module):
  """q_BLC (or the learned pooling query) attends to text k/v [B, T, H, c]."""

  def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, *, rngs: nnx.Rngs,
               for_attn_pool: bool = False, bf16_round: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32, attn_impl: str = "xla"):
    if embed_dim % num_heads:
      raise ValueError(f"{embed_dim=} is not divisible by {num_heads=}")
    self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
    self.for_attn_pool, self.bf16_round = for_attn_pool, bf16_round
    self.dtype, self.attn_impl = dtype, attn_impl
    self.scale = 1.0 / math.sqrt(self.head_dim)
    init = nnx.initializers.normal(0.02)
    if for_attn_pool:
      self.mat_q = nnx.Param(init(rngs.params(), (num_heads, self.head_dim), param_dtype))
    else:
      self.mat_q = nnx.Linear(embed_dim, embed_dim, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=init, rngs=rngs)
    self.mat_kv = nnx.Linear(kv_dim, 2 * embed_dim, use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    self.v_bias = nnx.Param(jnp.zeros((embed_dim,), param_dtype))
    self.proj = nnx.Linear(embed_dim, embed_dim, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=init, rngs=rngs)

  def kv(self, text_BTK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Text -> (k, v) [B, T, H, c] in `dtype` (bf16-rounded when bf16_round)."""
    B, T, _ = text_BTK.shape
    v_bias = self.v_bias[...]
    bias_2C = jnp.concatenate([jnp.zeros_like(v_bias), v_bias]).astype(self.dtype)
    kv = (self.mat_kv(text_BTK.astype(self.dtype)) + bias_2C).reshape(
        B, T, 2, self.num_heads, self.head_dim)
    if self.bf16_round:
      kv = _round_bf16(kv)
    return kv[:, :, 0], kv[:, :, 1]

  def __call__(self, q_BLC: jax.Array | None, k_BTHc: jax.Array, v_BTHc: jax.Array,
               mask_BT: jax.Array) -> jax.Array:
    """-> [B, L, C] in `dtype` (L = 1 for the pooling). mask_BT: True = real token."""
    B = k_BTHc.shape[0]
    if self.for_attn_pool:
      q = jnp.broadcast_to(self.mat_q[...].astype(self.dtype)[None, None],
                           (B, 1, self.num_heads, self.head_dim))
    else:
      L = q_BLC.shape[1]
      q = self.mat_q(q_BLC.astype(self.dtype)).reshape(B, L, self.num_heads, self.head_dim)
    if self.bf16_round:
      q = _round_bf16(q)
    o_BLHc = attention(q, k_BTHc, v_BTHc, mask=mask_BT[:, None, None, :], scale=self.scale,
                       impl=self.attn_impl)
    if self.bf16_round:
      o_BLHc = _round_bf16(o_BLHc)
    return self.proj(o_BLHc.reshape(B, o_BLHc.shape[1], -1))
