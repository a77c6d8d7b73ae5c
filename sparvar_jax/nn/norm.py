"""Normalisation without learned affine parameters, always computed in float32.

VAR and Infinity use `nn.LayerNorm(C, eps, elementwise_affine=False)` before every
AdaLN modulation and before the head; the statistics are taken in fp32 whatever the
compute dtype, as PyTorch autocast does for layer_norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis, no affine. x [..., C] any float -> fp32 [..., C]."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)  # biased, as torch
  return xc * jax.lax.rsqrt(var + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch `F.normalize(x, dim=-1)`: x / max(||x||, eps), stats in fp32; returns fp32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
