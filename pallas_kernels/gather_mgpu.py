"""Token-gather attention on Hopper: the selected K/V rows copied per group, then the Mosaic
flash kernel over each group, the residual added in its epilogue. Plus the row copy's reference.

Letters: B batch, Q queries, K key tokens, H heads, D head dim, G query groups, S selected slots.

Why a copy: the Mosaic kernel streams K/V with TMA, and Hopper's TMA moves boxes, not lists of
rows (Blackwell's gather4 does), so it cannot read the selected keys where they lie. The
Triton gather kernel (`gather.py`) reads them with per-thread loads but runs at the Triton
flash ceiling (~405 TFLOP/s on the H100, the Mosaic kernel ~616). Copying each group's
rows once (2 x B x G x S x H x D elements, at memory bandwidth) and then running the faster
kernel pays when a group's rows are reused by enough queries: every 128-query tile of the
group re-reads the copy from L2. With the copy done by XLA's gather and the residual as a
separate add it measured slower on an H100 (0.398 vs 0.374 ms, 1024-query groups); here the
copy is a Pallas kernel (~2.8 TB/s) and the residual is fused into the Mosaic kernel's store: a tie
with the Triton kernel at 1024-query groups, 1.15x faster at 2048 (AUTO_MIN_GROUP).

Full lists only (every slot valid: `counts` None, as `topk_key_indices` makes them): the
kernel masks keys past S in the last block, not per-group counts. `gather_attention`
(backend "auto") picks this path on sm_90 for full lists without q_perm / rule when the groups
are large enough (`AUTO_MIN_GROUP`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.block_sparse import _check_qkv, _pad_axis
from pallas_kernels.block_sparse_mgpu import MosaicConfig, block_sparse_attention_mgpu

# Groups of fewer queries re-read their copy too few times to pay for it. Measured on an
# H100, scale 12, 20% of keys, both in one run (WORKSPACE.md "Kernels"), ms copy+Mosaic /
# Triton: 2048-query groups 0.294 / 0.337 (16 h), 0.501 / 0.579 (28 h); 1024: 0.342 / 0.338,
# 0.594 / 0.584 (a tie: the copy, ~0.10 / 0.18 ms at memory bandwidth, eats the faster
# matmul); 512: 0.449 / 0.358.
AUTO_MIN_GROUP = 2048
# The copy's slot axis is padded to the Mosaic kernel's key block, so it needs no second pad.
_SLOT_ALIGN = 128


@dataclasses.dataclass(frozen=True)
class RowGatherConfig:
  """Rows copied per program (a divisor of 128) and Triton launch params."""
  rows: int = 64
  num_warps: int = 4

  def __post_init__(self):
    if self.rows not in (16, 32, 64, 128):
      raise ValueError(f"rows={self.rows} must be 16, 32, 64 or 128 (divides the slot "
                       f"padding of {_SLOT_ALIGN}).")
    if self.num_warps not in (1, 2, 4, 8):
      raise ValueError(f"num_warps={self.num_warps} must be 1, 2, 4 or 8.")


def _rows_kernel(idx_ref, k_ref, v_ref, kg_ref, vg_ref, *, kv_len):
  ids = jnp.clip(idx_ref[...], 0, kv_len - 1)
  kg_ref[...] = k_ref[ids, :]
  vg_ref[...] = v_ref[ids, :]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gather_kv_rows(k, v, indices, *, config: RowGatherConfig = RowGatherConfig(),
                   interpret: bool = False):
  """kg[b * G + g, s, h] = k[b, indices[b, h, g, s], h] (same for v).

  k, v [B, K, H, D]; indices int32 [Bm, Hm, G, S] (Bm in {1, B}, Hm in {1, H}), S a
  multiple of config.rows; indices are clamped into [0, K) (padding slots may hold anything).
  Returns kg, vg [B * G, S, H, D]: one contiguous K/V per (batch, group), in the layout the
  Mosaic kernel streams.
  """
  b, lk, h, d = k.shape
  if v.shape != k.shape or v.dtype != k.dtype:
    raise ValueError(f"k and v must match; got {k.shape} {k.dtype} and {v.shape} {v.dtype}.")
  bm, hm, ng, slots = indices.shape
  if bm not in (1, b) or hm not in (1, h) or slots % config.rows:
    raise ValueError(f"indices must be [Bm, Hm, G, S] with Bm in (1, {b}), Hm in (1, {h}) and "
                     f"S a multiple of {config.rows}; got {indices.shape}.")
  sq = _compat.SQUEEZED
  sel_b = (lambda bg: lax.div(bg, ng)) if bm > 1 else (lambda bg: 0)
  sel_h = (lambda hi: hi) if hm > 1 else (lambda hi: 0)
  idx_spec = pl.BlockSpec((sq, sq, sq, config.rows),
                          lambda si, hi, bg: (sel_b(bg), sel_h(hi), lax.rem(bg, ng), si))
  kv_spec = pl.BlockSpec((sq, lk, sq, d), lambda si, hi, bg: (lax.div(bg, ng), 0, hi, 0))
  out_spec = pl.BlockSpec((sq, config.rows, sq, d), lambda si, hi, bg: (bg, si, hi, 0))
  out_shape = jax.ShapeDtypeStruct((b * ng, slots, h, d), k.dtype)
  with _compat.quiet_triton_deprecation():
    return pl.pallas_call(
        functools.partial(_rows_kernel, kv_len=lk), out_shape=(out_shape, out_shape),
        grid=(slots // config.rows, h, b * ng), in_specs=[idx_spec, kv_spec, kv_spec],
        out_specs=(out_spec, out_spec),
        compiler_params=_compat.triton_params(config.num_warps, 1),
        interpret=interpret, name="gather_kv_rows")(jnp.asarray(indices, jnp.int32), k, v)


def gather_kv_rows_reference(k, v, indices):
  """Pure-JAX reference of `gather_kv_rows`."""
  b, lk, h, d = k.shape
  bm, hm, ng, slots = indices.shape
  idx = jnp.broadcast_to(jnp.clip(jnp.asarray(indices, jnp.int32), 0, lk - 1), (b, h, ng, slots))
  idx_BGSH = idx.transpose(0, 2, 3, 1)
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, None, None, :]
  return tuple(x[bi, idx_BGSH, hi].reshape(b * ng, slots, h, d) for x in (k, v))


def pad_slots(indices):
  """indices [Bm, Hm, G, S] int32 with the slot axis padded (with 0) to a multiple of the
  Mosaic kernel's key block: the copy's layout, which the kernel then reads without a pad
  (kv_len=S masks the padding rows)."""
  slots = indices.shape[-1]
  return _pad_axis(jnp.asarray(indices, jnp.int32), 3, -(-slots // _SLOT_ALIGN) * _SLOT_ALIGN)


def _split_groups(x, ng: int, group_size: int):
  b, lq, h, d = x.shape
  return _pad_axis(x, 1, ng * group_size).reshape(b * ng, group_size, h, d)


@functools.partial(jax.jit, static_argnames=("group_size", "scale", "config", "rows_config",
                                             "attention", "interpret"))
def gather_attention_mgpu(q, k, v, indices, residual=None, *, group_size: int,
                          scale: float | None = None, config: MosaicConfig = MosaicConfig(),
                          rows_config: RowGatherConfig = RowGatherConfig(), attention=None,
                          interpret: bool = False):
  """Full-list token-gather attention on Hopper (see the module docstring).

  q [B, Lq, H, D] bf16/fp16, k, v [B, K, H, D]; indices int32 [Bm, Hm, G, S] with
  G = ceil(Lq / group_size), every slot valid; residual [B, Lq, H, D] or None, added to the
  normalised output. group_size must be a multiple of 128 (the kernel's query tile).
  attention, interpret: CPU tests pass the Mosaic kernel's reference (same signature) and run
  the row copy in interpret mode, so everything but the Mosaic kernel runs on CPU; the
  reference of the whole is `gather.gather_attention_reference`. Extra memory: the copy,
  2 x B x G x S' x H x D elements with S' = S rounded up to 128.
  """
  b, lq, h, d = q.shape
  _check_qkv(q, k, v, k.shape[1])
  if residual is not None and residual.shape != q.shape:
    raise ValueError(f"residual must have q's shape {q.shape}; got {residual.shape}.")
  ng = -(-lq // group_size)
  if indices.ndim != 4 or indices.shape[2] != ng:
    raise ValueError(f"indices must be [Bm, Hm, G={ng}, S] (Lq={lq}, group_size={group_size}); "
                     f"got {indices.shape}.")
  if group_size % 128:
    raise ValueError(f"group_size={group_size} must be a multiple of 128 (the Mosaic kernel's "
                     "query tile); use backend='triton'.")
  slots = indices.shape[-1]
  kg, vg = gather_kv_rows(k, v, pad_slots(indices), config=rows_config, interpret=interpret)
  qg = _split_groups(q, ng, group_size)
  rg = None if residual is None else _split_groups(residual, ng, group_size)
  if attention is None:
    out = block_sparse_attention_mgpu(qg, kg, vg, None, kv_len=slots, scale=scale, residual=rg,
                                      config=config)
  else:
    out = attention(qg, kg, vg, None, kv_len=slots, scale=scale, residual=rg)
  return out.reshape(b, ng * group_size, h, d)[:, :lq].astype(q.dtype)

