"""Feed-forward block: fc1 (C -> hidden) -> GELU(tanh approximation) -> fc2 (hidden -> C).

Torch keys `ffn.fc1.{weight,bias}`, `ffn.fc2.{weight,bias}`; ours `fc1/{kernel,bias}`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class FFN(nnx.Module):
  """x_BLC (any float) -> y_BLC in `dtype`."""

  def __init__(self, embed_dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    init = nnx.initializers.normal(0.02)
    self.fc1 = nnx.Linear(embed_dim, hidden, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=init, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, embed_dim, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=init, rngs=rngs)

  def __call__(self, x_BLC: jax.Array) -> jax.Array:
    # approximate=True is torch's GELU(approximate='tanh').
    return self.fc2(jax.nn.gelu(self.fc1(x_BLC), approximate=True))
