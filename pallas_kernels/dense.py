"""Dense attention for the rest of the model: one switch over the implementations we have.

"auto": cuDNN on a GPU, XLA elsewhere.
"cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; 577-591 TFLOP/s at
  4096 x 10521 on the H100, the default).
"pallas": our block-sparse kernel with every block visited (any Lk; Triton lowering; ~400).
"mosaic": our Hopper kernel (block_sparse_mgpu.py, Pallas Mosaic GPU; bf16/fp16, D 64/128;
  611-621 TFLOP/s in the same runs, 1.00-1.09x cuDNN over scales 10-12; opt-in).
"xla": `jax.nn.dot_product_attention(implementation="xla")` (portable fallback, CPU tests).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.block_mask import BlockMask
from pallas_kernels.block_sparse import BlockSparseConfig, block_sparse_attention

IMPLEMENTATIONS = ("auto", "cudnn", "mosaic", "pallas", "xla")


@functools.partial(jax.jit, static_argnames=("implementation", "scale", "config", "interpret"))
def dense_attention(q, k, v, *, implementation: str = "auto", scale: float | None = None,
                    config: BlockSparseConfig = BlockSparseConfig(), interpret: bool = False):
  """q [B, Lq, H, D], k, v [B, Lk, H, D] -> [B, Lq, H, D] in q.dtype (no mask)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation == "auto":
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
  if implementation in ("cudnn", "xla"):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  if implementation == "pallas":
    mask = BlockMask.dense(q_len=q.shape[1], kv_len=k.shape[1], block_q=config.block_q,
                           block_kv=max(config.block_kv, 128))
    return block_sparse_attention(q, k, v, mask, scale=scale, config=config, interpret=interpret,
                                  backend="triton")
  if implementation == "mosaic":
    from pallas_kernels.block_sparse_mgpu import block_sparse_attention_mgpu
    return block_sparse_attention_mgpu(q, k, v, scale=scale)
  raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}.")
