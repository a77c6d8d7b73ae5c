"""Token-gather sparse attention (CS4A's sparse step) in Pallas (Triton lowering) + reference.

Letters: B batch, Q queries, K keys, H heads, D head dim, G query groups, S selected slots.

Every group of `group_size` consecutive queries of a (batch, head) attends to its own list of
key token indices (fixed budget S, padded; `counts` says how many are valid). The softmax runs
over the selected keys only; an optional residual (CS4A's output cache) is added to the
normalised output. A query whose group has count 0 returns the residual (zeros without one).
Indices must lie in [0, kv_len); the kernel clamps them for memory safety, so an out-of-range
index silently reads a clamped key: validate host-side with `validate_gather_lists`.
A repeated index counts twice (top-k lists never repeat).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.block_sparse import LOG2E, _M_INIT, _check_qkv, _is_pow2, _online_softmax_step, _pad_axis


@dataclasses.dataclass(frozen=True)
class GatherConfig:
  """Query tile (divides the group size), keys gathered per step, Triton launch params."""
  block_q: int = 64
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      val = getattr(self, name)
      if not _is_pow2(val) or val < 16:
        raise ValueError(f"{name}={val} must be a power of two >= 16 (Triton tiles).")


def validate_gather_lists(indices, counts, kv_len: int):
  """Host-side check of concrete lists: counts within the budget, indices in [0, kv_len)."""
  idx, cnt = np.asarray(indices), np.asarray(counts)
  if idx.ndim != 4 or cnt.shape != idx.shape[:3]:
    raise ValueError(f"indices must be [B, H, G, S] and counts [B, H, G]; got {idx.shape} and "
                     f"{cnt.shape}.")
  if (cnt < 0).any() or (cnt > idx.shape[-1]).any():
    raise ValueError(f"counts must lie in [0, S={idx.shape[-1]}]; got min {cnt.min()}, max "
                     f"{cnt.max()}.")
  valid = np.arange(idx.shape[-1]) < cnt[..., None]
  if (valid & ((idx < 0) | (idx >= kv_len))).any():
    raise ValueError(f"a key index outside [0, kv_len={kv_len}) is inside the valid part of a "
                     "list.")


def _kernel(q_ref, k_ref, v_ref, cnt_ref, idx_ref, *rest, qk_scale, kv_len, block_kv,
            has_residual):
  if has_residual:
    res_ref, o_ref = rest
  else:
    (o_ref,) = rest
  bq, d = q_ref.shape
  q = q_ref[...]
  cnt = cnt_ref[0]
  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
           jnp.zeros((bq,), jnp.float32))

  def body(c, carry):
    start = pl.multiple_of(c * block_kv, block_kv)
    ids = jnp.clip(idx_ref[pl.ds(start, block_kv)], 0, kv_len - 1)
    k = k_ref[ids, :]
    v = v_ref[ids, :]
    keep = ((start + jnp.arange(block_kv, dtype=jnp.int32)) < cnt)[None, :]
    return _online_softmax_step(q, k, v, carry, qk_scale, keep)

  acc, _, l = lax.fori_loop(0, (cnt + block_kv - 1) // block_kv, body, carry)
  ok = l > 0
  out = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0)
  if has_residual:
    out = out + res_ref[...].astype(jnp.float32)
  o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "scale", "config", "interpret"))
def gather_attention(q, k, v, indices, counts, residual=None, *, group_size: int,
                     scale: float | None = None, config: GatherConfig = GatherConfig(),
                     interpret: bool = False):
  """Attention of each query group over its gathered keys.

  q [B, Lq, H, D]; k, v [B, Lk, H, D]; indices int32 [B, H, G, S] with G = ceil(Lq / group_size);
  counts int32 [B, H, G]; residual [B, Lq, H, D] or None. Returns [B, Lq, H, D] in q.dtype.
  group_size must be a multiple of config.block_q.
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  _check_qkv(q, k, v, lk)
  ng = -(-lq // group_size)
  if indices.shape[:3] != (b, h, ng) or counts.shape != (b, h, ng):
    raise ValueError(f"indices must be [B, H, G, S]=[{b}, {h}, {ng}, S] and counts [{b}, {h}, "
                     f"{ng}] for Lq={lq}, group_size={group_size}; got {indices.shape} and "
                     f"{counts.shape}.")
  if group_size % config.block_q:
    raise ValueError(f"group_size={group_size} must be a multiple of the query tile "
                     f"config.block_q={config.block_q}.")
  if not _is_pow2(d) or d < 16:
    raise NotImplementedError(f"head dim {d} is not supported by the Triton kernel (powers of "
                              "two >= 16); use gather_attention_reference.")
  if residual is not None and residual.shape != q.shape:
    raise ValueError(f"residual must have q's shape {q.shape}; got {residual.shape}.")
  scale = d ** -0.5 if scale is None else scale
  bq, bk = config.block_q, config.block_kv
  lq_pad = ng * group_size
  slots = -(-indices.shape[-1] // bk) * bk
  idx = _pad_axis(jnp.asarray(indices, jnp.int32), 3, slots)
  cnt = jnp.asarray(counts, jnp.int32)
  per_group = group_size // bq
  sq = _compat.SQUEEZED
  q_spec = pl.BlockSpec((sq, bq, sq, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((sq, lk, sq, d), lambda i, bi, hi: (bi, 0, hi, 0))
  in_specs = [q_spec, kv_spec, kv_spec,
              pl.BlockSpec((sq, sq, 1), lambda i, bi, hi: (bi, hi, i // per_group)),
              pl.BlockSpec((sq, sq, sq, slots), lambda i, bi, hi: (bi, hi, i // per_group, 0))]
  args = [_pad_axis(q, 1, lq_pad), k, v, cnt, idx]
  if residual is not None:
    in_specs.append(q_spec)
    args.append(_pad_axis(residual, 1, lq_pad))
  kernel = functools.partial(_kernel, qk_scale=scale * LOG2E, kv_len=lk, block_kv=bk,
                             has_residual=residual is not None)
  with _compat.quiet_triton_deprecation():
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, lq_pad, h, d), q.dtype),
        grid=(lq_pad // bq, b, h), in_specs=in_specs, out_specs=q_spec,
        compiler_params=_compat.triton_params(config.num_warps, config.num_stages),
        interpret=interpret, name="gather_attention")(*args)
  return out[:, :lq]


@functools.partial(jax.jit, static_argnames=("group_size", "scale"))
def gather_attention_reference(q, k, v, indices, counts, residual=None, *, group_size: int,
                               scale: float | None = None):
  """Pure-JAX f32 reference of `gather_attention` (gathers keys per group, dense softmax)."""
  b, lq, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  ng = indices.shape[2]
  qf = _pad_axis(q.astype(jnp.float32), 1, ng * group_size).reshape(b, ng, group_size, h, d)
  kf = jnp.transpose(k.astype(jnp.float32), (0, 2, 1, 3))  # [B, H, K, D]
  vf = jnp.transpose(v.astype(jnp.float32), (0, 2, 1, 3))
  idx = jnp.clip(indices, 0, k.shape[1] - 1)
  ks = jax.vmap(jax.vmap(lambda kk, ii: kk[ii]))(kf, idx)  # [B, H, G, S, D]
  vs = jax.vmap(jax.vmap(lambda vv, ii: vv[ii]))(vf, idx)
  s = jnp.einsum("bgqhd,bhgsd->bhgqs", qf, ks, precision=lax.Precision.HIGHEST) * scale
  keep = (jnp.arange(indices.shape[-1]) < counts[..., None])[:, :, :, None, :]
  s = jnp.where(keep, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(keep, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = jnp.where(l > 0, p / jnp.where(l > 0, l, 1.0), 0.0)
  out = jnp.einsum("bhgqs,bhgsd->bgqhd", p, vs, precision=lax.Precision.HIGHEST)
  out = out.reshape(b, ng * group_size, h, d)[:, :lq]
  if residual is not None:
    out = out + residual.astype(jnp.float32)
  return out
