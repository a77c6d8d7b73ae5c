"""Token sampling with the official VAR/Infinity semantics, on a JAX RNG.

`top_k_top_p_filter` reproduces `sample_with_top_k_top_p_` (VAR `models/helpers.py`,
reused by Infinity for its 2-way bit logits): top-k keeps every logit >= the k-th
largest; top-p sorts ascending and drops the tokens whose cumulative probability stays
<= 1 - top_p, always keeping the largest. The draw itself uses `jax.random`, so only
greedy decoding (top_k=1) reproduces PyTorch token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate(top_k: int, top_p: float, vocab_size: int | None = None) -> None:
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
  if vocab_size is not None and top_k > vocab_size:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p must be in [0, 1] (0 and 1 keep every token), got {top_p}")


def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Sets removed logits to -inf. top_k/top_p are static; 0 turns each off."""
  logits_BlV = logits_BlV.astype(jnp.float32)
  V = logits_BlV.shape[-1]
  if 0 < top_k < V:
    kth = jax.lax.top_k(logits_BlV, top_k)[0][..., -1:]
    logits_BlV = jnp.where(logits_BlV < kth, -jnp.inf, logits_BlV)
  if top_p > 0:
    order = jnp.argsort(logits_BlV, axis=-1)  # ascending, as the official sort
    sorted_logits = jnp.take_along_axis(logits_BlV, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
    # Scatter the sorted-order decision back to vocabulary order.
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits_BlV = jnp.where(remove, -jnp.inf, logits_BlV)
  return logits_BlV


def sample_top_k_top_p(key: jax.Array, logits_BlV: jax.Array, top_k: int = 0,
                       top_p: float = 0.0) -> jax.Array:
  """Draws one token per position: int32 [B, l]. top_k == 1 is exact argmax."""
  if top_k == 1:
    return jnp.argmax(logits_BlV, axis=-1).astype(jnp.int32)
  filtered = top_k_top_p_filter(logits_BlV, top_k, top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
  """Soft Gumbel-softmax (VAR's `more_smooth` path), fp32."""
  g = jax.random.gumbel(key, logits.shape, dtype=jnp.float32)
  return jax.nn.softmax((logits.astype(jnp.float32) + g) / tau, axis=-1)
