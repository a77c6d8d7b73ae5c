"""Block-sparse flash attention (Pallas, Triton lowering) and its pure-JAX reference.

Letters: B batch, Q query tokens, K key tokens, H heads, D head dim.

Two semantics, chosen by `rule`:
  * block-granular (rule=None): every visited block is computed whole (only keys past
    `mask.kv_len` are masked). This is what SparVAR's FlexAttention CSLA kernel measures.
  * exact (rule given): full blocks unmasked, partial blocks masked token by token with the
    rule's per-token tables, evaluated in the kernel (4 compares per pair, no dense mask).
Empty rows (a query that sees no key) return zeros and log-sum-exp -inf.

The kernel tile may be finer than the mask's blocks: `config.block_q` must divide
`mask.block_q` and `config.block_kv` must divide `mask.block_kv`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.block_mask import BlockMask, TokenBoxRule

LOG2E = math.log2(math.e)
# Finite start for the running max: a row that has seen only masked (-inf) scores keeps
# m = _M_INIT, so exp2(-inf - m) = 0 and exp2(m - m) = 1 never produce NaN.
_M_INIT = -1e30


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def _check_triton_tiles(cfg) -> None:
  """Triton tiles (cfg.block_q, cfg.block_kv) must be powers of two >= 16."""
  for name in ("block_q", "block_kv"):
    val = getattr(cfg, name)
    if not _is_pow2(val) or val < 16:
      raise ValueError(f"{name}={val} must be a power of two >= 16 (Triton tiles).")


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
  """Kernel tile and Triton launch parameters."""
  block_q: int = 128
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    _check_triton_tiles(self)
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16.")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1.")


def _check_qkv(q, k, v, kv_len):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, H, D]; got {q.shape=}, {k.shape=}, {v.shape=}.")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q [B, Lq, H, D] and k, v [B, Lk, H, D] must agree in B, H, D and k, v "
                     f"in shape; got {q.shape=}, {k.shape=}, {v.shape=}.")
  if k.shape[1] < kv_len:
    raise ValueError(f"k/v hold {k.shape[1]} keys but kv_len={kv_len}; pass buffers with at "
                     "least kv_len rows.")


def _pad_axis(x, axis, size, value=0):
  """Pads `axis` up to `size` rows; a longer array is returned as it is (buffers may run past
  the rows a kernel reads, e.g. a KV cache padded further)."""
  if x.shape[axis] >= size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def _online_softmax_step(q, k, v, carry, qk_scale, keep):
  """One key tile of the flash-attention recurrence (base-2 exponentials, f32 stats).

  The running max is kept in scaled units and the scale applied inside the exponent, so each
  score costs one FMA (s * c - m) instead of a multiply and a subtract; the max of the raw
  row times c (> 0) is the max of the scaled row."""
  acc, m, l = carry
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  if keep is not None:
    s = jnp.where(keep, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s * qk_scale - m_new[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return acc * alpha[:, None] + pv, m_new, l


def _finish(acc, m, l, o_ref, lse_ref):
  ok = l > 0
  out = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0)
  o_ref[...] = out.astype(o_ref.dtype)
  if lse_ref is not None:
    lse2 = jnp.where(ok, m + jnp.log2(jnp.where(ok, l, 1.0)), -jnp.inf)
    lse_ref[...] = lse2 / LOG2E


def _kernel(q_ref, k_ref, v_ref, fnum_ref, fidx_ref, pnum_ref, pidx_ref, *rest, qk_scale,
            kv_len, block_kv, sub_kv, exact, return_lse):
  if exact:
    qyx_ref, kbox_ref, *rest = rest
  o_ref = rest[0]
  lse_ref = rest[1] if return_lse else None
  bq, d = q_ref.shape
  q = q_ref[...]
  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
           jnp.zeros((bq,), jnp.float32))

  def tile_start(idx_ref, s):
    if sub_kv == 1:
      return pl.multiple_of(idx_ref[s] * block_kv, block_kv)
    # lax.div/rem on int32: jnp's floor-mod lowers to a mixed i32/i1 op the Triton backend
    # rejects (seen on jax 0.11.2).
    pos = lax.div(s, jnp.int32(sub_kv))
    sub = s - pos * sub_kv
    return pl.multiple_of((idx_ref[pos] * sub_kv + sub) * block_kv, block_kv)

  def full_body(s, carry):
    start = tile_start(fidx_ref, s)
    k = k_ref[pl.ds(start, block_kv), :]
    v = v_ref[pl.ds(start, block_kv), :]
    return _online_softmax_step(q, k, v, carry, qk_scale, None)

  if exact:
    qy = qyx_ref[0, :]
    qx = qyx_ref[1, :]

  def part_body(s, carry):
    start = tile_start(pidx_ref, s)
    k = k_ref[pl.ds(start, block_kv), :]
    v = v_ref[pl.ds(start, block_kv), :]
    cols = start + jnp.arange(block_kv, dtype=jnp.int32)
    keep = (cols < kv_len)[None, :]
    if exact:
      ylo = kbox_ref[0, pl.ds(start, block_kv)]
      yhi = kbox_ref[1, pl.ds(start, block_kv)]
      xlo = kbox_ref[2, pl.ds(start, block_kv)]
      xhi = kbox_ref[3, pl.ds(start, block_kv)]
      keep = (keep & (ylo[None, :] <= qy[:, None]) & (qy[:, None] <= yhi[None, :])
              & (xlo[None, :] <= qx[:, None]) & (qx[:, None] <= xhi[None, :]))
    return _online_softmax_step(q, k, v, carry, qk_scale, keep)

  carry = lax.fori_loop(0, fnum_ref[0] * sub_kv, full_body, carry)
  carry = lax.fori_loop(0, pnum_ref[0] * sub_kv, part_body, carry)
  _finish(*carry, o_ref, lse_ref)


BACKENDS = ("auto", "triton", "mosaic")


def choose_backend(q, mask: BlockMask, rule: TokenBoxRule | None, backend: str,
                   interpret: bool = False) -> str:
  """'auto' -> 'mosaic' (the Hopper kernel) for block-granular masks with 128 x 128 blocks,
  bf16/fp16, head dim 64/128 on an sm_90 GPU; 'triton' otherwise."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}.")
  if backend != "auto":
    return backend
  if interpret or rule is not None or not _compat.on_hopper():
    return "triton"
  from pallas_kernels import block_sparse_mgpu
  return "mosaic" if block_sparse_mgpu.supports(q, mask) is None else "triton"


# Tiles measured best on the H100 (WORKSPACE.md "Kernels", tuning at scale 12): exact masks
# like 64x64 (finer sub-blocks skip more of a partial block), block-granular 128x64.
EXACT_CONFIG = BlockSparseConfig(64, 64, 4, 2)
BLOCK_CONFIG = BlockSparseConfig(128, 64, 4, 2)


def _concrete(*trees) -> bool:
  """No leaf is traced: the arrays can be read on the host now (at trace time under jit)."""
  return not any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def block_sparse_attention(q, k, v, mask: BlockMask, rule: TokenBoxRule | None = None, *,
                           scale: float | None = None, return_lse: bool = False,
                           config: BlockSparseConfig | None = None,
                           interpret: bool = False, backend: str = "auto",
                           refine: bool = True):
  """Block-sparse attention; see `_block_sparse_attention_triton` for the arguments.

  backend: "triton" (portable Pallas kernel: both semantics, any tile), "mosaic" (the Hopper
  kernel in block_sparse_mgpu.py: block-granular, 128 x 128 blocks, bf16/fp16) or "auto"
  (mosaic where it applies, measured faster on every mask on the H100; else triton).
  config: Triton tiles; None = EXACT_CONFIG with a rule, else BLOCK_CONFIG.
  refine: in exact mode with a concrete mask and rule (static masks, e.g. CSLA's), walk the
  kernel's finer tiles instead of the mask's blocks (`BlockMask.refined`): the same output,
  minus the sub-blocks the rule leaves empty. A traced mask is used as given.
  """
  if config is None:
    config = EXACT_CONFIG if rule is not None else BLOCK_CONFIG
  chosen = choose_backend(q, mask, rule, backend, interpret)
  if chosen == "mosaic":
    if rule is not None:
      raise NotImplementedError("the Mosaic GPU kernel is block-granular only; exact masks "
                                "(rule given) need backend='triton'.")
    from pallas_kernels.block_sparse_mgpu import block_sparse_attention_mgpu
    return block_sparse_attention_mgpu(q, k, v, mask, scale=scale, return_lse=return_lse)
  if (refine and rule is not None and _concrete(mask, rule)
      and (config.block_q, config.block_kv) != (mask.block_q, mask.block_kv)
      and mask.block_q % config.block_q == 0 and mask.block_kv % config.block_kv == 0):
    mask = mask.refined(rule, block_q=config.block_q, block_kv=config.block_kv)
  return _block_sparse_attention_triton(q, k, v, mask, rule, scale=scale, return_lse=return_lse,
                                        config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "return_lse", "config", "interpret"))
def _block_sparse_attention_triton(q, k, v, mask: BlockMask, rule: TokenBoxRule | None = None,
                                   *, scale: float | None = None, return_lse: bool = False,
                                   config: BlockSparseConfig = BlockSparseConfig(),
                                   interpret: bool = False):
  """Block-sparse attention (Pallas, Triton lowering).

  q [B, Lq, H, D]; k, v [B, Lk_buf, H, D] with Lk_buf >= mask.kv_len (keys past kv_len are
  ignored; a buffer already padded to a multiple of config.block_kv avoids a copy; its
  padding rows must hold finite values). Lq == mask.q_len. bf16/fp16 on GPU, fp32 allowed.
  D must be a power of two (64, 128). scale defaults to D**-0.5.
  Returns out [B, Lq, H, D] in q.dtype, and with return_lse the natural-log log-sum-exp
  [B, H, Lq] f32 (-inf for empty rows).
  """
  b, lq, h, d = q.shape
  _check_qkv(q, k, v, mask.kv_len)
  if lq != mask.q_len:
    raise ValueError(f"q has {lq} queries but the mask was built for q_len={mask.q_len}.")
  if not _is_pow2(d) or d < 16:
    raise NotImplementedError(f"head dim {d} is not supported by the Triton kernel (powers of "
                              "two >= 16, e.g. 64 or 128); use the reference.")
  if mask.block_q % config.block_q or mask.block_kv % config.block_kv:
    raise ValueError(f"kernel tile {config.block_q}x{config.block_kv} must divide the mask's "
                     f"blocks {mask.block_q}x{mask.block_kv}; rebuild the mask or change "
                     "BlockSparseConfig.")
  bm, hm = mask.full_num_BHQ.shape[:2]
  if bm not in (1, b) or hm not in (1, h):
    raise ValueError(f"mask batch/head dims {(bm, hm)} must be 1 or match q's {(b, h)}.")
  if rule is not None and (rule.q_len != lq or rule.kv_len != mask.kv_len):
    raise ValueError(f"rule tables are for {rule.q_len} queries x {rule.kv_len} keys, but the "
                     f"call has {lq} x {mask.kv_len}.")
  scale = d ** -0.5 if scale is None else scale
  bq, bk = config.block_q, config.block_kv
  sub_q, sub_kv = mask.block_q // bq, mask.block_kv // bk
  nq = mask.num_q_blocks * sub_q
  lq_pad = nq * bq
  lk_pad = -(-max(k.shape[1], mask.kv_len) // mask.block_kv) * mask.block_kv
  qp = _pad_axis(q, 1, lq_pad)
  kp, vp = _pad_axis(k, 1, lk_pad), _pad_axis(v, 1, lk_pad)
  # Triton tiles need power-of-two list widths.
  lists = []
  for num, idx in ((mask.full_num_BHQ, mask.full_idx_BHQK), (mask.part_num_BHQ, mask.part_idx_BHQK)):
    width = pl.next_power_of_2(max(1, idx.shape[-1]))
    lists += [jnp.asarray(num, jnp.int32), _pad_axis(jnp.asarray(idx, jnp.int32), 3, width)]

  sel_b = (lambda bi: bi) if bm > 1 else (lambda bi: 0)
  sel_h = (lambda hi: hi) if hm > 1 else (lambda hi: 0)
  sq = _compat.SQUEEZED
  in_specs = [
      pl.BlockSpec((sq, bq, sq, d), lambda i, bi, hi: (bi, i, hi, 0)),
      pl.BlockSpec((sq, lk_pad, sq, d), lambda i, bi, hi: (bi, 0, hi, 0)),
      pl.BlockSpec((sq, lk_pad, sq, d), lambda i, bi, hi: (bi, 0, hi, 0)),
  ]
  for j in range(2):
    width = lists[2 * j + 1].shape[-1]
    in_specs += [
        pl.BlockSpec((sq, sq, 1), lambda i, bi, hi: (sel_b(bi), sel_h(hi), i // sub_q)),
        pl.BlockSpec((sq, sq, sq, width),
                     lambda i, bi, hi: (sel_b(bi), sel_h(hi), i // sub_q, 0)),
    ]
  args = [qp, kp, vp, *lists]
  if rule is not None:
    rp = rule.padded(lq_pad, lk_pad)
    in_specs += [pl.BlockSpec((2, bq), lambda i, bi, hi: (0, i)),
                 pl.BlockSpec((4, lk_pad), lambda i, bi, hi: (0, 0))]
    args += [rp.q_yx_2Q, rp.k_box_4K]
  out_shape = [jax.ShapeDtypeStruct((b, lq_pad, h, d), q.dtype)]
  out_specs = [pl.BlockSpec((sq, bq, sq, d), lambda i, bi, hi: (bi, i, hi, 0))]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((sq, sq, bq), lambda i, bi, hi: (bi, hi, i)))
  kernel = functools.partial(_kernel, qk_scale=scale * LOG2E, kv_len=mask.kv_len, block_kv=bk,
                             sub_kv=sub_kv, exact=rule is not None, return_lse=return_lse)
  with _compat.quiet_triton_deprecation():
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(nq, b, h), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_compat.triton_params(config.num_warps, config.num_stages),
        interpret=interpret, name="block_sparse_attention")(*args)
  out = outs[0][:, :lq]
  if return_lse:
    return out, outs[1][:, :, :lq]
  return out


# ----------------------------------------------------------------------------- reference


def token_mask_of(mask: BlockMask, rule: TokenBoxRule | None = None) -> jax.Array:
  """Dense bool [Bm, Hm, Lq, Lk] the kernel applies: visited blocks (block-granular) or
  full blocks | (partial blocks & rule) (exact); keys past kv_len never."""
  nk = mask.num_kv_blocks

  def table(num, idx):
    valid = jnp.arange(idx.shape[-1]) < num[..., None]
    hit = jax.nn.one_hot(idx, nk, dtype=jnp.int32) * valid[..., None]
    return hit.sum(-2) > 0  # [Bm, Hm, nQ, nK]

  def expand(t):
    t = jnp.repeat(jnp.repeat(t, mask.block_q, axis=2), mask.block_kv, axis=3)
    return t[:, :, :mask.q_len, :mask.kv_len]

  full = expand(table(mask.full_num_BHQ, mask.full_idx_BHQK))
  part = expand(table(mask.part_num_BHQ, mask.part_idx_BHQK))
  if rule is not None:
    part = part & rule.token_mask_jnp()[None, None]
  return full | part


def masked_attention_reference(q, k, v, keep_BHQK, *, scale=None, return_lse=False):
  """Softmax attention in f32 under a dense bool mask [Bm|B, Hm|H, Lq, Lk]; empty rows -> 0."""
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  lk = keep_BHQK.shape[-1]
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k[:, :lk], v[:, :lk]))
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=lax.Precision.HIGHEST) * scale
  s = jnp.where(keep_BHQK, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(keep_BHQK, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  pn = jnp.where(l > 0, p / jnp.where(l > 0, l, 1.0), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", pn, vf, precision=lax.Precision.HIGHEST)
  if not return_lse:
    return out
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)),
                  -jnp.inf)
  return out, lse


@functools.partial(jax.jit, static_argnames=("scale", "return_lse"))
def block_sparse_attention_reference(q, k, v, mask: BlockMask, rule: TokenBoxRule | None = None,
                                     *, scale: float | None = None, return_lse: bool = False):
  """Pure-JAX f32 reference of `block_sparse_attention` (same semantics, dense mask)."""
  return masked_attention_reference(q, k, v, token_mask_of(mask, rule), scale=scale,
                                    return_lse=return_lse)
