"""Dense attention that also returns per-query-group column sums (CS4A's decision step).

Letters: B batch, Q queries, K keys, H heads, D head dim, G query groups, S selected slots.

colsum[b, h, g, k] = sum over the queries q of group g (group_size consecutive queries) of
softmax_k(q . k * scale), exactly normalised. Two passes: (1) dense attention returning the
output and the log-sum-exp (our Pallas kernel, or cuDNN where its log-sum-exp is returned);
(2) a kernel per key tile that recomputes the scores and sums exp(s - lse) over each group's
queries: on an H100 the Mosaic GPU kernel of `colsum_mgpu.py` (wgmma, keys as the matmul rows),
elsewhere the Triton kernel below (also CPU interpret mode). `topk_key_indices` turns column
sums into the gather kernel's index lists.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, colsum_mgpu
from pallas_kernels.block_mask import BlockMask
from pallas_kernels.block_sparse import (LOG2E, BlockSparseConfig, _check_qkv,
                                         _check_triton_tiles, _pad_axis, block_sparse_attention)
from pallas_kernels.block_sparse_mgpu import block_sparse_attention_mgpu
from pallas_kernels.colsum_mgpu import ColsumMosaicConfig

COLSUM_BACKENDS = ("auto", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class ColsumConfig:
  """Tiles of the Triton column-sum pass (block_q divides the group size), the dense pass
  config and the Hopper column-sum kernel's tiles."""
  block_q: int = 64
  block_kv: int = 128
  num_warps: int = 4  # H100, 16 heads, scale 10: 4 warps 0.459 ms vs 8 warps 0.489 (cuDNN dense)
  num_stages: int = 2
  dense: BlockSparseConfig = BlockSparseConfig()
  mosaic: ColsumMosaicConfig | None = None  # None: ColsumMosaicConfig.for_group(group_size)

  def mosaic_for(self, group_size: int) -> ColsumMosaicConfig:
    return self.mosaic or ColsumMosaicConfig.for_group(group_size)

  def __post_init__(self):
    _check_triton_tiles(self)


def _colsum_kernel(q_ref, k_ref, lse_ref, cs_ref, *, qk_scale, group_size, block_q, num_groups):
  # One key tile per program, all groups streamed past it: the tile is loaded once and each
  # program has enough work (a grid over groups too would launch ~10k tiny programs).
  k = k_ref[...]

  def group(g, carry):
    def chunk(c, acc):
      start = pl.multiple_of(g * group_size + c * block_q, block_q)
      q = q_ref[pl.ds(start, block_q), :]
      lse2 = lse_ref[pl.ds(start, block_q)]
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      return acc + jnp.exp2(s * qk_scale - lse2[:, None])

    # Summing over queries crosses warps; accumulating the tiles elementwise and reducing
    # once per group keeps that shuffle out of the inner loop.
    acc = lax.fori_loop(0, group_size // block_q, chunk,
                        jnp.zeros((block_q, k.shape[0]), jnp.float32))
    cs_ref[g, :] = jnp.sum(acc, axis=0)
    return carry

  lax.fori_loop(0, num_groups, group, 0)


def choose_backend(q, group_size: int, config: ColsumConfig = ColsumConfig(),
                   backend: str = "auto", interpret: bool = False) -> str:
  """"triton" or "mosaic" for a column-sum call; refuses a Mosaic request it cannot run."""
  if backend not in COLSUM_BACKENDS:
    raise ValueError(f"backend={backend!r}; use one of {COLSUM_BACKENDS}.")
  if backend == "triton":
    return "triton"
  why = ("interpret mode runs the Triton kernel only" if interpret
         else colsum_mgpu.supports(q, group_size, config.mosaic_for(group_size)))
  if backend == "mosaic" and why is not None:
    raise ValueError(f"backend='mosaic' cannot run this call: {why}. Use backend='triton' or "
                     "'auto'.")
  if backend == "mosaic" or (why is None and _compat.on_hopper()):
    return "mosaic"
  return "triton"


def column_sums(q, k, lse, *, group_size: int, scale: float | None = None,
                config: ColsumConfig = ColsumConfig(), backend: str = "auto",
                interpret: bool = False):
  """Column sums [B, H, G, Lk] f32 from q [B, Lq, H, D], k [B, Lk, H, D], lse [B, H, Lq] (natural log).

  backend: "auto" (the Hopper kernel on an sm_90 GPU when `colsum_mgpu.supports` the call,
  else Triton), "triton" or "mosaic"."""
  if choose_backend(q, group_size, config, backend, interpret) == "mosaic":
    return colsum_mgpu.column_sums_mgpu(q, k, lse, group_size=group_size, scale=scale,
                                        config=config.mosaic_for(group_size))
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  if group_size % config.block_q:
    raise ValueError(f"group_size={group_size} must be a multiple of config.block_q="
                     f"{config.block_q}.")
  ng = -(-lq // group_size)
  lq_pad, lk_pad = ng * group_size, -(-lk // config.block_kv) * config.block_kv
  # Padding queries get lse = +inf so they add exp2(-inf) = 0.
  lse2 = _pad_axis(lse.astype(jnp.float32) * LOG2E, 2, lq_pad, value=jnp.inf)
  sq = _compat.SQUEEZED
  kernel = functools.partial(_colsum_kernel, qk_scale=scale * LOG2E, group_size=group_size,
                             block_q=config.block_q, num_groups=ng)
  with _compat.quiet_triton_deprecation():
    cs = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, h, ng, lk_pad), jnp.float32),
        grid=(lk_pad // config.block_kv, b, h),
        in_specs=[pl.BlockSpec((sq, lq_pad, sq, d), lambda kb, bi, hi: (bi, 0, hi, 0)),
                  pl.BlockSpec((sq, config.block_kv, sq, d), lambda kb, bi, hi: (bi, kb, hi, 0)),
                  pl.BlockSpec((sq, sq, lq_pad), lambda kb, bi, hi: (bi, hi, 0))],
        out_specs=pl.BlockSpec((sq, sq, ng, config.block_kv), lambda kb, bi, hi: (bi, hi, 0, kb)),
        compiler_params=_compat.triton_params(config.num_warps, config.num_stages),
        interpret=interpret, name="attention_column_sums",
    )(_pad_axis(q, 1, lq_pad), _pad_axis(k, 1, lk_pad), lse2)
  return cs[..., :lk]


def dense_impl_for(q, dense_impl: str = "auto", interpret: bool = False) -> str:
  """The dense pass of `dense_colsum_attention`: "auto" takes cuDNN on a GPU for bf16/fp16
  (the fastest measured with the column sums on an H100, scale 10: dense + column sums
  0.435 / 0.716 ms at 16 / 28 heads with cuDNN's dense pass, 0.454 / 0.732 with our Mosaic
  kernel's, same column-sum pass), else our Triton kernel (any dtype; interpret mode on
  CPU)."""
  if dense_impl != "auto":
    return dense_impl
  if not interpret and _compat.on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "pallas"


def dense_attention_with_lse(q, k, v, *, scale: float | None = None, dense_impl: str = "auto",
                             config: BlockSparseConfig = BlockSparseConfig(),
                             interpret: bool = False):
  """The dense pass of `dense_colsum_attention`: output [B, Lq, H, D] (q.dtype) and
  log-sum-exp [B, H, Lq] f32 (natural log) from the `dense_impl_for` kernel; config tiles
  the Triton ("pallas") kernel."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  _check_qkv(q, k, v, lk)
  scale = d ** -0.5 if scale is None else scale
  dense_impl = dense_impl_for(q, dense_impl, interpret)
  if dense_impl == "pallas":
    mask = BlockMask.dense(q_len=lq, kv_len=lk, block_q=config.block_q,
                           block_kv=max(config.block_kv, 128))
    return block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True, config=config,
                                  backend="triton", interpret=interpret)
  if dense_impl == "mosaic":
    return block_sparse_attention_mgpu(q, k, v, scale=scale, return_lse=True)
  if dense_impl == "cudnn":
    out, lse_bqh = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn",
                                                return_residual=True)
    return out, jnp.transpose(lse_bqh.astype(jnp.float32), (0, 2, 1))
  raise ValueError(f"dense_impl={dense_impl!r}; use 'auto', 'pallas', 'mosaic' or 'cudnn'.")


@functools.partial(jax.jit, static_argnames=("group_size", "scale", "dense_impl", "config",
                                             "colsum_backend", "interpret"))
def dense_colsum_attention(q, k, v, *, group_size: int, scale: float | None = None,
                           dense_impl: str = "auto", config: ColsumConfig = ColsumConfig(),
                           colsum_backend: str = "auto", interpret: bool = False):
  """Dense attention output [B, Lq, H, D] (q.dtype) and column sums [B, H, G, Lk] f32.

  dense_impl: "auto" (see `dense_impl_for`), "pallas" (our block-sparse kernel with every
  block, f32 log-sum-exp), "mosaic" (our Hopper kernel, bf16/fp16 on an H100) or "cudnn"
  (jax.nn.dot_product_attention with return_residual; GPU only). colsum_backend: the
  column-sum pass (see `column_sums`).
  """
  out, lse = dense_attention_with_lse(q, k, v, scale=scale, dense_impl=dense_impl,
                                      config=config.dense, interpret=interpret)
  return out, column_sums(q, k, lse, group_size=group_size, scale=scale, config=config,
                          backend=colsum_backend, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("group_size", "scale"))
def dense_colsum_attention_reference(q, k, v, *, group_size: int, scale: float | None = None):
  """Pure-JAX f32 reference: (out [B, Lq, H, D] f32, colsum [B, H, G, Lk] f32)."""
  b, lq, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=lax.Precision.HIGHEST) * scale
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=lax.Precision.HIGHEST)
  ng = -(-lq // group_size)
  p = _pad_axis(p, 2, ng * group_size)
  return out, p.reshape(b, h, ng, group_size, -1).sum(axis=3)


def key_budget(fraction: float, kv_len: int, multiple_of: int = 64) -> int:
  """SparVAR's budget: round(fraction * kv_len / multiple_of) * multiple_of, in [multiple_of, kv_len]."""
  n = int(round(fraction * kv_len / multiple_of)) * multiple_of
  return int(min(max(n, multiple_of), kv_len))


@functools.partial(jax.jit, static_argnames=("budget",))
def topk_key_indices(colsum_BHGK, budget: int):
  """Top-`budget` keys per group: indices int32 [B, H, G, budget] (ascending), counts [B, H, G].

  The counts are always full (= budget). Under jit they are traced, so pass counts=None to
  `gather_attention`: only lists known to be full can take its Hopper path."""
  lk = colsum_BHGK.shape[-1]
  if not 0 < budget <= lk:
    raise ValueError(f"budget={budget} must lie in [1, Lk={lk}].")
  _, idx = lax.top_k(colsum_BHGK, budget)
  # Ascending order keeps the gathered rows close together in memory.
  idx = jnp.sort(idx.astype(jnp.int32), axis=-1)
  return idx, jnp.full(colsum_BHGK.shape[:3], budget, jnp.int32)

