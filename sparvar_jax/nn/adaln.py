"""Adaptive LayerNorm pieces shared by VAR and Infinity.

Letters: B batch, L tokens, C width, D condition width, n number of modulation chunks.

- `AdaLin`: `Sequential(SiLU, Linear(D, n*C))` of the official code, output [B, n, C].
  Its parameters are `kernel` [D, n*C] and `bias` [n*C] (torch `ada_lin.1.{weight,bias}`).
- `modulate`: LN(x) * (1 + scale) + shift in fp32.
- `AdaLNBeforeHead`: VAR/Infinity `head_nm` (chunk order scale, shift).

Block chunk order (VAR `AdaLNSelfAttn`, Infinity `CrossAttnBlock`): gamma1, gamma2, scale1,
scale2, shift1, shift2; `unbind_chunks` splits [B, 6, C] into six [B, 1, C].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparvar_jax.nn.norm import layer_norm


class AdaLin(nnx.Linear):
  """SiLU then Linear(D, n*C): cond_BD -> gss_BnC (compute dtype `dtype`)."""

  def __init__(self, cond_dim: int, embed_dim: int, n: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    super().__init__(cond_dim, n * embed_dim, dtype=dtype, param_dtype=param_dtype,
                     kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.n = n
    self.embed_dim = embed_dim

  def __call__(self, cond_BD: jax.Array) -> jax.Array:
    y = super().__call__(jax.nn.silu(cond_BD.astype(jnp.float32)).astype(self.dtype))
    return y.reshape(cond_BD.shape[0], self.n, self.embed_dim)


def unbind_chunks(gss_BnC: jax.Array) -> tuple[jax.Array, ...]:
  """[B, n, C] -> n arrays [B, 1, C] (torch `.view(-1, 1, n, C).unbind(2)`)."""
  return tuple(gss_BnC[:, i:i + 1, :] for i in range(gss_BnC.shape[1]))


def modulate(x_BLC: jax.Array, scale_B1C: jax.Array, shift_B1C: jax.Array,
             eps: float = 1e-6) -> jax.Array:
  """LN(x) * (1 + scale) + shift, all in fp32 -> fp32 [B, L, C]."""
  return (layer_norm(x_BLC, eps) * (scale_B1C.astype(jnp.float32) + 1.0)
          + shift_B1C.astype(jnp.float32))


class AdaLNBeforeHead(nnx.Module):
  """`head_nm`: LN(x) * (1 + scale) + shift with (scale, shift) = AdaLin(cond); fp32 out."""

  def __init__(self, embed_dim: int, cond_dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.ada_lin = AdaLin(cond_dim, embed_dim, 2, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

  def __call__(self, x_BLC: jax.Array, cond_BD: jax.Array) -> jax.Array:
    scale_B1C, shift_B1C = unbind_chunks(self.ada_lin(cond_BD))
    return modulate(x_BLC, scale_B1C, shift_B1C, self.eps)
