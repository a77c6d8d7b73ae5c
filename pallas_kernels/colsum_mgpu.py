"""Column sums of the attention probabilities on Hopper (Pallas Mosaic GPU), and their reference.

Letters: B batch, Q queries, K keys, H heads, D head dim, G query groups.

colsum[b, h, g, k] = sum over the queries q of group g of exp(q . k * scale - lse[b, h, q]),
the second pass of `colsum.dense_colsum_attention` (the first, dense attention, supplies lse).
It is the transpose of a flash-attention forward: each CTA holds 2 x block_kv keys (one tile
per compute warpgroup, loaded once) and streams all its head's queries past them, as
FlashAttention's dK/dV kernel does. A compute warpgroup computes S^T = K Q^T with wgmma (keys
are the wgmma rows, so a key's sum over queries is a row sum in registers, the reduction flash
attention does for its softmax denominators; the key tile is the A operand, from registers),
P^T = exp2(S^T * c - lse), and sums the rows per group; the two warpgroups take the tensor
cores in turns. One memory warpgroup streams the query tiles and their log-sum-exp with TMA.

Measured (H100, Infinity's decision scale 10: 1600 queries x 4121 keys, batch 2, 192-query
groups; WORKSPACE.md "Kernels"): the pass alone 0.189 ms at 16 heads, 0.326 at 28 (the
Triton pass: 0.223 / 0.394), so dense + column sums is 1.71x / 1.89x the cuDNN dense pass.
It runs at ~320 TFLOP/s: without the exp2 and the log-sum-exp it still took 0.153 ms (full:
0.186), so the matmul issue itself (each warpgroup waits for its wgmma before the next;
64-key x 192-query tiles) is the limit, not the exponentials. Tried and dropped: 3-4 compute warpgroups with a persistent launch
(hung on its first GPU run, never debugged).

Reference: `column_sums_reference` below (pure JAX, f32). Not runnable on CPU (see
block_sparse_mgpu.py); CPU tests lower it for CUDA, GPU checks compare it with the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_sparse import LOG2E, _pad_axis
from pallas_kernels.block_sparse_mgpu import _SMEM_LIMIT, operand_refusal

_COMPUTE_WGS = 2
_SMEM_RESERVE = 1024  # barriers and buffer alignment (fewer buffers than the flash kernel)
_TMA_BOX_MAX = 256  # a TMA box has at most 256 rows: the groups of one key tile in one store


@dataclasses.dataclass(frozen=True)
class ColsumMosaicConfig:
  """Tiles of the Hopper column-sum kernel: block_kv keys per compute warpgroup (the wgmma M,
  loaded once per CTA), block_q queries per streamed tile (divides the group size), a ring of
  max_concurrent_steps query tiles."""
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 3
  # The two compute warpgroups take the tensor cores in turns (a barrier per warpgroup, each
  # opened by the other's finished matmul), so one's exp2 runs under the other's wgmma.
  # Without it both wait for the same query tile and run in lockstep, matmul then exp2.
  # H100, 16 heads, scale 10, 64-query tiles: 0.236 -> 0.217 ms (the Triton pass: 0.223).
  pingpong: bool = True
  # The key tile as the wgmma's A operand from registers (read from shared memory once; from
  # shared memory both operands are re-read by every wgmma): 0.217 -> 0.203 ms.
  k_in_registers: bool = True

  def __post_init__(self):
    if self.block_q not in (64, 128, 192, 256):
      raise ValueError(f"block_q={self.block_q} must be 64, 128, 192 or 256 (a wgmma N, whole "
                       "64-row swizzle tiles).")
    if self.block_kv not in (64, 128):
      raise ValueError(f"block_kv={self.block_kv} must be 64 or 128 (wgmma M per warpgroup).")
    if not 2 <= self.max_concurrent_steps <= 8:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must lie in [2, 8].")
    # The f32 score tile lives in registers: block_kv x block_q over a warpgroup's 128 threads.
    if self.block_kv * self.block_q // 128 > 128:
      raise ValueError(f"block_kv x block_q = {self.block_kv} x {self.block_q} needs "
                       f"{self.block_kv * self.block_q // 128} score registers per thread "
                       "(at most 128); use block_kv=64 with block_q above 128.")

  @classmethod
  def for_group(cls, group_size: int) -> "ColsumMosaicConfig":
    """The measured best tiles for a query-group size. H100, scale 10, column-sum pass
    alone, 16 / 28 heads, one run (WORKSPACE.md "Kernels"): SparVAR's 192-query groups in one
    tile, 64-key warpgroup tiles, ring 2: 0.189 / 0.326 ms; 64-query tiles, 128 keys, ring 3:
    0.203 / 0.327 (the Triton pass: 0.223 / 0.394)."""
    if group_size % 192 == 0:
      return cls(block_q=192, block_kv=64, max_concurrent_steps=2)
    return cls()

  @property
  def keys_per_cta(self) -> int:
    return _COMPUTE_WGS * self.block_kv

  def smem_bytes(self, head_dim: int, num_groups: int, itemsize: int = 2) -> int:
    k = _COMPUTE_WGS * self.block_kv * head_dim * itemsize
    q = self.max_concurrent_steps * self.block_q * (head_dim * itemsize + 4)
    cs = _COMPUTE_WGS * num_groups * self.block_kv * 4
    return k + q + cs + _SMEM_RESERVE


def supports(q, group_size: int, config: ColsumMosaicConfig = ColsumMosaicConfig()) -> str | None:
  """None when the Hopper kernel can run this call, else the reason it cannot."""
  why = operand_refusal(q)
  if why is not None:
    return why
  d = q.shape[-1]
  if group_size % config.block_q:
    return f"group_size={group_size} is not a multiple of block_q={config.block_q}"
  ng = -(-q.shape[1] // group_size)
  if ng > _TMA_BOX_MAX:
    return f"{ng} query groups (at most {_TMA_BOX_MAX}: one TMA store per key tile)"
  need = config.smem_bytes(d, ng, q.dtype.itemsize)
  if need > _SMEM_LIMIT:
    return f"{config} needs {need} B of shared memory for {ng} groups (the limit is {_SMEM_LIMIT})"
  return None


@dataclasses.dataclass(frozen=True)
class _Static:
  dtype: object
  block_q: int
  block_kv: int
  head_dim: int
  ring: int
  qk_scale2: float
  tiles_per_group: int
  num_groups: int
  pingpong: bool
  k_in_registers: bool


def _kernel(q_ref, k_ref, lse_ref, cs_ref, scoped, *, st: _Static):
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  kt, hi, bi = lax.axis_index("kv"), lax.axis_index("heads"), lax.axis_index("batch")
  wg = lax.axis_index("wg")
  (k_smem2, q_smem, lse_smem, cs_smem), (k_ready, q_ready, lse_ready), q_free, turn = scoped
  bq, bk = st.block_q, st.block_kv
  # Loop bounds and constants are made from runtime values inside the loops: jax 0.11.2's
  # Mosaic GPU lowering rejects jnp constants captured by loop bodies (block_sparse_mgpu.py).
  zero = hi - hi
  ring = lambda: jnp.int32(st.ring)

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    k_base = (kt * _COMPUTE_WGS + wg) * bk
    k_smem = k_smem2.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(k_base, bk), hi], k_smem, k_ready.at[wg])
    plgpu.barrier_wait(k_ready.at[wg])
    # The key tile is the wgmma's A operand for every step: held in registers it is read from
    # shared memory once, and each wgmma reads only the query tile (B). From shared memory
    # both are re-read per wgmma, which at N = 64 queries costs what the tensor cores do.
    k_op = plgpu.load(k_smem, (), layout=plgpu.Layout.WGMMA) if st.k_in_registers else k_smem

    def group(g, carry):
      def step(t, acc):
        s = g * st.tiles_per_group + t
        slot = lax.rem(s, ring())
        plgpu.barrier_wait(q_ready.at[slot])
        if st.pingpong:
          # Take the tensor cores in turns: warpgroup 0 goes first at step 0.
          @pl.when(jnp.logical_or(wg == 1, s > 0))
          def _():
            plgpu.barrier_wait(turn.at[wg])

        def qk_scope(acc_ref):
          plgpu.wgmma(acc_ref, k_op, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
          return acc_ref[...]

        s_t = pl.run_scoped(qk_scope, plgpu.ACC((bk, bq), jnp.float32))
        if st.pingpong:
          plgpu.barrier_arrive(turn.at[1 - wg])
        plgpu.barrier_wait(lse_ready.at[slot])
        lse2 = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        plgpu.barrier_arrive(q_free.at[slot])
        p_t = jnp.exp2(s_t * st.qk_scale2 - lax.broadcast_in_dim(lse2, s_t.shape, [1]))
        return acc + p_t.sum(axis=1)

      acc = plgpu.layout_cast(jnp.full((bk,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = lax.fori_loop(zero, zero + st.tiles_per_group, step, acc)
      cs_smem.at[wg, g][...] = acc
      return carry

    lax.fori_loop(zero, zero + st.num_groups, group, zero)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(cs_smem.at[wg], cs_ref.at[bi, hi, :, pl.ds(k_base, bk)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def step(s, carry):
      slot = lax.rem(s, ring())

      @pl.when(s >= ring())
      def _():
        plgpu.barrier_wait(q_free.at[slot])

      rows = pl.ds(s * bq, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[slot], q_ready.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[slot], lse_ready.at[slot])
      return carry

    lax.fori_loop(zero, zero + st.num_groups * st.tiles_per_group, step, zero)


@functools.partial(jax.jit, static_argnames=("group_size", "scale", "config"))
def column_sums_mgpu(q, k, lse, *, group_size: int, scale: float | None = None,
                     config: ColsumMosaicConfig = ColsumMosaicConfig()):
  """Column sums [B, H, G, Lk] f32 from q [B, Lq, H, D], k [B, Lk, H, D] (bf16/fp16) and
  lse [B, H, Lq] (natural log, f32), on an H100. Padding queries (Lq up to whole groups) add
  nothing: their lse is +inf."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  b, lq, h, d = q.shape
  lk = k.shape[1]
  if k.shape != (b, lk, h, d) or k.dtype != q.dtype:
    raise ValueError(f"k must be [B, Lk, H, D] = [{b}, Lk, {h}, {d}] in {q.dtype}; got "
                     f"{k.shape} {k.dtype}.")
  if lse.shape != (b, h, lq):
    raise ValueError(f"lse must be [B, H, Lq] = {(b, h, lq)}; got {lse.shape}.")
  why = supports(q, group_size, config)
  if why is not None:
    raise ValueError(f"column_sums_mgpu cannot run this call: {why}. Use the Triton pass "
                     "(colsum.column_sums(backend='triton')).")
  scale = d ** -0.5 if scale is None else scale
  ng = -(-lq // group_size)
  lq_pad = ng * group_size
  kc = config.keys_per_cta
  nkt = -(-lk // kc)
  lk_pad = nkt * kc
  st = _Static(dtype=q.dtype, block_q=config.block_q, block_kv=config.block_kv, head_dim=d,
               ring=config.max_concurrent_steps, qk_scale2=scale * LOG2E,
               tiles_per_group=group_size // config.block_q, num_groups=ng,
               pingpong=config.pingpong, k_in_registers=config.k_in_registers)
  lse2 = _pad_axis(lse.astype(jnp.float32) * LOG2E, 2, lq_pad, value=jnp.inf)
  ring = config.max_concurrent_steps

  def entry(q_ref, k_ref, lse_ref, cs_ref):
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((_COMPUTE_WGS, config.block_kv, d), q.dtype, transforms=tiles),
        plgpu.SMEM((ring, config.block_q, d), q.dtype, transforms=tiles),
        plgpu.SMEM((ring, config.block_q), jnp.float32),
        plgpu.SMEM((_COMPUTE_WGS, ng, config.block_kv), jnp.float32),
    ]
    pl.run_scoped(
        lambda *sc: _kernel(q_ref, k_ref, lse_ref, cs_ref, sc, st=st),
        scratch,
        (plgpu.Barrier(num_barriers=_COMPUTE_WGS), plgpu.Barrier(num_barriers=ring),
         plgpu.Barrier(num_barriers=ring)),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=ring),
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        collective_axes="wg",
    )

  # Key tiles fastest: consecutive CTAs stream the same head's queries, which stay in L2.
  cs = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, h, ng, lk_pad), jnp.float32),
      grid=(nkt, h, b), grid_names=("kv", "heads", "batch"),
      num_threads=_COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(_pad_axis(q, 1, lq_pad), _pad_axis(k, 1, lk_pad), lse2)
  return cs[..., :lk]


@functools.partial(jax.jit, static_argnames=("group_size", "scale"))
def column_sums_reference(q, k, lse, *, group_size: int, scale: float | None = None):
  """Pure-JAX f32: colsum[b, h, g, k] = sum_{q in group g} exp(q . k * scale - lse[b, h, q])."""
  b, lq, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * scale
  p = jnp.exp(s - lse.astype(jnp.float32)[..., None])
  ng = -(-lq // group_size)
  p = _pad_axis(p, 2, ng * group_size)
  return p.reshape(b, h, ng, group_size, -1).sum(axis=3)
