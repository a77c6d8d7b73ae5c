"""Block-sparse and dense flash attention on Hopper (Pallas Mosaic GPU) and its reference.

Letters: B batch, Q query tokens, K key tokens, H heads, D head dim.

The Hopper fast path of `block_sparse_attention` for block-granular masks (every visited
block computed whole, keys past `kv_len` masked). It follows the FlashAttention-3 shape:
one CTA per (128 queries, head, batch) with three warpgroups — two compute warpgroups of 64
query rows each (wgmma from shared memory, online softmax in registers) and one memory
warpgroup that streams the visited K/V blocks with TMA into a ring of `max_concurrent_steps`
slots. The only change for sparsity is that the memory warpgroup reads the block index of
each step from the query block's list, so skipped blocks cost nothing — not even a
predicate. Dense attention is the same kernel walking every block in order.

The two compute warpgroups alternate through a "schedule barrier" so one runs its softmax
while the other keeps the tensor cores busy (FA3's ping-pong); both walk the same list, so
their barrier counts always match.

Exact (token-level) masks stay on the Triton kernel in `block_sparse.py`: Hopper's wgmma
register layout makes per-token rule tables awkward, and the exact CSLA target is met there.

Reference: `block_sparse.block_sparse_attention_reference` (same semantics, dense mask, f32).
Not runnable on CPU (Mosaic GPU interpret mode in jax 0.10 lacks `run_state`); CPU tests lower
the kernel to its Mosaic GPU module instead, which exercises every layout and shape check.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.block_mask import BlockMask

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tiles of the Hopper kernel. A CTA covers 2 * block_q queries (one block_q per compute
  warpgroup), so masks for it use 2 * block_q query blocks and block_kv key blocks."""
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2
  # Launch order: query tiles of one head next to each other (that head's K/V stays in L2)
  # or heads fastest (FA3's order).
  q_tiles_fastest: bool = True

  def __post_init__(self):
    if self.block_q != 64:
      raise ValueError(f"block_q={self.block_q}: a compute warpgroup owns 64 query rows "
                       "(the wgmma M tile); use 64.")
    if self.block_kv not in (64, 128, 256):
      raise ValueError(f"block_kv={self.block_kv} must be 64, 128 or 256.")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2 "
                       "(double buffering at least).")

  @property
  def mask_block_q(self) -> int:
    return _COMPUTE_WGS * self.block_q

  def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
    q = _COMPUTE_WGS * self.block_q * head_dim * itemsize
    kv = 2 * self.max_concurrent_steps * self.block_kv * head_dim * itemsize
    return q + kv + _COMPUTE_WGS * self.block_q * 4


_SMEM_LIMIT = 227 * 1024  # H100 shared memory per CTA


def supports(q, mask: BlockMask | None, config: MosaicConfig = MosaicConfig()) -> str | None:
  """None when the Mosaic kernel can run this call, else the reason it cannot."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (bf16/fp16 only)"
  if q.shape[-1] not in (64, 128):
    return f"head dim {q.shape[-1]} (64 or 128 only)"
  if config.smem_bytes(q.shape[-1]) > _SMEM_LIMIT:
    return f"{config} needs {config.smem_bytes(q.shape[-1])} B of shared memory"
  if mask is not None and (mask.block_q != config.mask_block_q or mask.block_kv != config.block_kv):
    return (f"mask blocks {mask.block_q}x{mask.block_kv} differ from the kernel's "
            f"{config.mask_block_q}x{config.block_kv}")
  return None


def visit_lists(mask: BlockMask):
  """One ascending list per query block: full and partial blocks together (block-granular
  semantics treats them alike), invalid slots last. Returns (num [Bm, Hm, nQ] int32,
  idx [Bm, Hm, nQ, W] int32). numpy in, numpy out (constant masks), else jnp."""
  nk = mask.num_kv_blocks
  arrays = (mask.full_num_BHQ, mask.full_idx_BHQK, mask.part_num_BHQ, mask.part_idx_BHQK)
  xp = jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np
  fnum, fidx, pnum, pidx = (xp.asarray(a, xp.int32) for a in arrays)
  f_ok = xp.arange(fidx.shape[-1]) < fnum[..., None]
  p_ok = xp.arange(pidx.shape[-1]) < pnum[..., None]
  both = xp.concatenate([xp.where(f_ok, fidx, nk), xp.where(p_ok, pidx, nk)], axis=-1)
  both = xp.sort(both, axis=-1)
  num = (fnum + pnum).astype(xp.int32)
  # Padding slots repeat a valid index so a stray read can never leave the buffer.
  both = xp.where(both >= nk, 0, both).astype(xp.int32)
  return num, both


def _kernel(q_ref, k_ref, v_ref, num_ref, idx_ref, out_ref, lse_ref, scoped, *, dtype,
            block_q, block_kv, head_dim, steps_ring, qk_scale2, kv_len, num_kv_blocks, dense,
            sel_b, sel_h):
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  qi = lax.axis_index("q_seq")
  hi = lax.axis_index("heads")
  bi = lax.axis_index("batch")
  wg = lax.axis_index("wg")
  smem, (k_ready, v_ready, q_ready), (k_free, v_free), schedule = scoped
  qo_smem2, k_smem, v_smem, lse_smem2 = smem

  # The step count is always read from memory: a compile-time trip count makes Mosaic GPU
  # (jax 0.11.2) emit the loops differently and fail on a captured constant.
  if dense:
    total = num_ref[0, 0, 0]
    block_at = lambda step: step
  else:
    mb, mh = (bi if sel_b else 0), (hi if sel_h else 0)
    total = num_ref[mb, mh, qi]
    block_at = lambda step: idx_ref[mb, mh, qi, step]
  # Only the block holding kv_len is cut; the list is ascending, so it can only be last.
  tail_cut = kv_len % block_kv != 0
  if tail_cut:
    last = jnp.maximum(total - 1, 0)
    has_tail = ((total > 0) & (block_at(last) == num_kv_blocks - 1)).astype(jnp.int32)
  else:
    has_tail = jnp.int32(0)

  def schedule_barrier():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg]
    q_base = qi * (_COMPUTE_WGS * block_q) + wg * block_q
    plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_base, block_q), hi], qo_smem, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])

    m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(total > 0)
    def _():
      plgpu.barrier_wait(k_ready.at[0])

    pl.when(wg == 1)(schedule_barrier)

    def step_body(step, carry, cut):
      acc, m_i, l_i = carry
      slot = lax.rem(step, jnp.int32(steps_ring))

      def qk_scope(s_ref):
        plgpu.wgmma(s_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        schedule_barrier()
        return s_ref[...]

      s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if cut:  # keys past kv_len in the last block
        cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                      layout=plgpu.Layout.WGMMA)
        s = jnp.where(cols < kv_len - (num_kv_blocks - 1) * block_kv, s, -jnp.inf)
      # Running max kept in scaled log2 units so p = exp2(s * c - m) is one FMA + exp2.
      m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale2)
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s * qk_scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha
      p16 = p.astype(dtype)
      if head_dim <= 128:
        l_i = l_i + p.sum(axis=1)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(schedule)
      else:
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(schedule)
        l_i = l_i + p.sum(axis=1)

      def pv_scope(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        nxt = step + 1

        @pl.when(nxt < total)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(steps_ring))])

      acc = pl.run_state(pv_scope)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i

    carry = (acc, m_i, l_i)
    carry = lax.fori_loop(0, total - has_tail, functools.partial(step_body, cut=False), carry)
    if tail_cut:
      carry = lax.fori_loop(total - has_tail, total, functools.partial(step_body, cut=True),
                            carry)
    acc, m_i, l_i = carry
    pl.when(wg == 0)(schedule_barrier)

    # Empty rows (no visited block): acc = 0 and l = 0 -> output 0, lse -inf.
    inv = 1.0 / jnp.maximum(l_i, jnp.float32(1e-30))
    acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    if lse_smem2 is not None:
      lse_smem2.at[wg][...] = (m_i + jnp.log2(l_i)) * LN2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(q_base, block_q), hi])
    if lse_smem2 is not None:
      plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[bi, hi, pl.ds(q_base, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def fetch(step, slot):
      rows = pl.ds(block_at(step) * block_kv, block_kv)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_ready.at[slot])

    for i in range(steps_ring):
      pl.when(i < total)(functools.partial(fetch, jnp.int32(i), i))

    @pl.loop(0, jnp.maximum(total - steps_ring, 0))
    def _(step):
      slot = lax.rem(step, jnp.int32(steps_ring))
      rows = pl.ds(block_at(step + steps_ring) * block_kv, block_kv)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_ready.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_ready.at[slot])


def _pad_axis(x, axis, size):
  """Pads axis up to `size` rows (a longer buffer is left as it is: rows past kv_len are
  never read)."""
  if x.shape[axis] >= size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


@functools.partial(jax.jit, static_argnames=("kv_len", "scale", "return_lse", "config"))
def block_sparse_attention_mgpu(q, k, v, mask: BlockMask | None = None, *,
                                kv_len: int | None = None, scale: float | None = None,
                                return_lse: bool = False,
                                config: MosaicConfig = MosaicConfig()):
  """Block-granular block-sparse attention (mask given) or dense attention (mask None).

  q [B, Lq, H, D], k, v [B, Lk_buf, H, D], bf16 or fp16, D in (64, 128). Keys past kv_len
  (mask.kv_len, else `kv_len`, else Lk_buf) are ignored; a buffer padded to a multiple of
  block_kv avoids a copy. mask blocks must be (2 * block_q) x block_kv = 128 x block_kv.
  Returns out [B, Lq, H, D] and with return_lse the natural-log log-sum-exp [B, H, Lq] f32
  (-inf for a query whose list is empty; its output is 0).
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  b, lq, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"q [B, Lq, H, D] and k, v [B, Lk, H, D] must agree; got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}.")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  why = supports(q, mask, config)
  if why:
    raise NotImplementedError(f"Mosaic GPU attention does not support {why}; use "
                              "block_sparse_attention (Triton) instead.")
  if mask is not None:
    if lq != mask.q_len:
      raise ValueError(f"q has {lq} queries but the mask was built for q_len={mask.q_len}.")
    kv_len = mask.kv_len
  kv_len = k.shape[1] if kv_len is None else kv_len
  if not 0 < kv_len <= k.shape[1]:
    raise ValueError(f"kv_len={kv_len} must be in [1, {k.shape[1]}] (the K/V buffer length).")
  bq, bk = config.block_q, config.block_kv
  tile_q = _COMPUTE_WGS * bq
  nq = -(-lq // tile_q)
  nk = -(-kv_len // bk)
  qp = _pad_axis(q, 1, nq * tile_q)
  kp, vp = _pad_axis(k, 1, nk * bk), _pad_axis(v, 1, nk * bk)
  if mask is None:
    num = jnp.full((1, 1, 1), nk, jnp.int32)
    idx = jnp.zeros((1, 1, 1, 1), jnp.int32)
    sel_b = sel_h = False
  else:
    num, idx = visit_lists(mask)
    num, idx = jnp.asarray(num), jnp.asarray(idx)
    bm, hm = num.shape[:2]
    if bm not in (1, b) or hm not in (1, h):
      raise ValueError(f"mask batch/head dims {(bm, hm)} must be 1 or match q's {(b, h)}.")
    sel_b, sel_h = bm > 1, hm > 1
  steps_ring = config.max_concurrent_steps
  dtype = q.dtype
  kernel = functools.partial(
      _kernel, dtype=dtype, block_q=bq, block_kv=bk, head_dim=d, steps_ring=steps_ring,
      qk_scale2=(d ** -0.5 if scale is None else scale) * LOG2E, kv_len=kv_len,
      num_kv_blocks=nk, dense=mask is None, sel_b=sel_b, sel_h=sel_h)

  def entry(q_ref, k_ref, v_ref, num_ref, idx_ref, out_ref, lse_ref):
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((_COMPUTE_WGS, bq, d), dtype, transforms=tiles),
        plgpu.SMEM((steps_ring, bk, d), dtype, transforms=tiles),
        plgpu.SMEM((steps_ring, bk, d), dtype, transforms=tiles),
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32) if return_lse else None,
    ]
    pl.run_scoped(
        lambda *sc: kernel(q_ref, k_ref, v_ref, num_ref, idx_ref, out_ref, lse_ref, sc),
        scratch,
        (plgpu.Barrier(num_barriers=steps_ring), plgpu.Barrier(num_barriers=steps_ring),
         plgpu.Barrier(num_barriers=_COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=steps_ring),) * 2,
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
        collective_axes="wg",
    )

  out_type = [jax.ShapeDtypeStruct(qp.shape, dtype),
              jax.ShapeDtypeStruct((b, h, nq * tile_q), jnp.float32) if return_lse else None]
  if config.q_tiles_fastest:
    grid, names = (nq, h, b), ("q_seq", "heads", "batch")
  else:
    grid, names = (h, nq, b), ("heads", "q_seq", "batch")
  out, lse = plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=names,
      num_threads=_COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(qp, kp, vp, num, idx)
  out = out[:, :lq]
  if return_lse:
    return out, lse[:, :, :lq]
  return out
