"""Dense attention behind one function with an implementation switch.

Letters: B batch, L query tokens, S key tokens, H heads, c head dim.
Layout is BLHc (cuDNN's BTNH), so projections reshape without transposes.

Implementations (`impl`):
- 'xla':   einsum logits in fp32, fp32 softmax, probabilities cast to v's dtype for the
           second einsum (fp32 accumulation). Runs everywhere; the CPU parity path.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, GPU, bf16/fp16 only.
- 'mosaic': our Hopper flash kernel (Pallas Mosaic GPU) for unmasked calls, cuDNN for masked
           ones; H100/H200, bf16/fp16, head dim 64/128.
- further implementations (the Pallas kernels) register with `register_attention_impl`;
  they take the same arguments and return the same shape and dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

AttnFn = Callable[..., jax.Array]
_IMPLS: dict[str, AttnFn] = {}


def register_attention_impl(name: str, fn: AttnFn) -> None:
  """Adds `fn(q_BLHc, k_BSHc, v_BSHc, *, mask, scale) -> o_BLHc` as `impl=name`."""
  _IMPLS[name] = fn


def attention_impls() -> tuple[str, ...]:
  return tuple(sorted(_IMPLS))


def attention(q_BLHc: jax.Array, k_BSHc: jax.Array, v_BSHc: jax.Array, *,
              mask: jax.Array | np.ndarray | None = None, scale: float = 1.0,
              impl: str = "xla") -> jax.Array:
  """Softmax(scale * q k^T [masked]) v -> o_BLHc in q's dtype.

  mask: bool, True = attend, broadcastable to [B, H, L, S] (e.g. [L, S]); None = dense.
  """
  if q_BLHc.ndim != 4 or k_BSHc.shape != v_BSHc.shape or q_BLHc.shape[0] != k_BSHc.shape[0] \
      or q_BLHc.shape[2:] != k_BSHc.shape[2:]:
    raise ValueError(f"attention expects q [B,L,H,c], k = v [B,S,H,c]; got {q_BLHc.shape=}, "
                     f"{k_BSHc.shape=}, {v_BSHc.shape=}")
  if impl not in _IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; available: {attention_impls()}")
  return _IMPLS[impl](q_BLHc, k_BSHc, v_BSHc, mask=mask, scale=scale)


def attention_xla(q_BLHc, k_BSHc, v_BSHc, *, mask=None, scale=1.0):
  """Reference: fp32 logits and softmax statistics."""
  logits_BHLS = jnp.einsum("BLHc,BSHc->BHLS", q_BLHc, k_BSHc,
                           preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits_BHLS = jnp.where(jnp.asarray(mask, bool), logits_BHLS, -jnp.inf)
  probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1)
  o_BLHc = jnp.einsum("BHLS,BSHc->BLHc", probs_BHLS.astype(v_BSHc.dtype), v_BSHc,
                      preferred_element_type=jnp.float32)
  return o_BLHc.astype(q_BLHc.dtype)


def attention_cudnn(q_BLHc, k_BSHc, v_BSHc, *, mask=None, scale=1.0):
  """cuDNN fused attention (GPU, bf16/fp16 inputs)."""
  if q_BLHc.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attn_impl='cudnn' needs bf16/fp16 inputs, got {q_BLHc.dtype}; use "
                     "dtype=jnp.bfloat16 or attn_impl='xla'.")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    # cuDNN takes the mask as a bias whose query and key axes must be full length
    # (a [B, 1, 1, S] padding mask is refused); batch and head axes may broadcast.
    L, S = q_BLHc.shape[1], k_BSHc.shape[1]
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (L, S))
  return jax.nn.dot_product_attention(q_BLHc, k_BSHc.astype(q_BLHc.dtype),
                                      v_BSHc.astype(q_BLHc.dtype), mask=mask, scale=scale,
                                      implementation="cudnn")


def attention_mosaic(q_BLHc, k_BSHc, v_BSHc, *, mask=None, scale=1.0):
  """Our Hopper kernel (pallas_kernels/block_sparse_mgpu.py) where it applies — unmasked
  attention (the KV-cached scale steps), bf16/fp16, head dim 64 or 128 — and cuDNN for the
  rest (cross-attention's text padding mask, VAR's teacher-forced block-causal mask, other
  head dims). Needs an sm_90 GPU (H100/H200)."""
  from pallas_kernels import block_sparse_mgpu
  if mask is not None or block_sparse_mgpu.supports(q_BLHc, None):
    return attention_cudnn(q_BLHc, k_BSHc, v_BSHc, mask=mask, scale=scale)
  return block_sparse_mgpu.block_sparse_attention_mgpu(
      q_BLHc, k_BSHc.astype(q_BLHc.dtype), v_BSHc.astype(q_BLHc.dtype), scale=scale)


register_attention_impl("xla", attention_xla)
register_attention_impl("cudnn", attention_cudnn)
register_attention_impl("mosaic", attention_mosaic)


class DenseAttention:
  """Plain attention over the valid keys: the default for every layer of every scale.

  Called by `SelfAttention` as `attend(q, k_buf, v_buf, kv_len, state, scale=, impl=,
  mask=, layer=)` -> (o_BLHc, state_out), the interface every layer-attention kind of an
  attention plan has (sparvar_jax/sparse/plan.py): k_buf/v_buf may hold rows past kv_len
  (the padded KV cache) that must not be attended. `consumes_state` / `produces_state` say
  whether the layer reads or writes per-layer sparse state (SparVAR's decision indices).
  """

  kind = "dense"
  consumes_state = False
  produces_state = False

  def __call__(self, q_BLHc, k_BSHc, v_BSHc, kv_len: int, state=None, *, scale: float,
               impl: str, mask=None, layer=None):
    del state, layer
    if k_BSHc.shape[1] != kv_len:
      k_BSHc, v_BSHc = k_BSHc[:, :kv_len], v_BSHc[:, :kv_len]
    return attention(q_BLHc, k_BSHc, v_BSHc, mask=mask, scale=scale, impl=impl), None

  def __eq__(self, other):
    return type(other) is DenseAttention

  def __hash__(self):
    return hash(DenseAttention)

  def __repr__(self):
    return "DenseAttention()"


DENSE = DenseAttention()


def block_causal_mask(patch_nums: tuple[int, ...]) -> np.ndarray:
  """VAR's training mask as bool [L, L]: query at scale i sees keys of scales <= i."""
  lvl_L = np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(patch_nums)])
  return lvl_L[:, None] >= lvl_L[None, :]
