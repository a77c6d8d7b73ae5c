"""Token-gather sparse attention (CS4A's sparse step) in Pallas (Triton lowering) + reference.

Letters: B batch, Q queries, K keys, H heads, D head dim, G query groups, S selected slots.

Every group of `group_size` consecutive queries of a (batch, head) attends to its own list of
key token indices (fixed budget S, padded; `counts` says how many are valid). The softmax runs
over the selected keys only; an optional residual (CS4A's output cache) is added to the
normalised output. A query whose group has count 0 returns the residual (zeros without one).
Indices must lie in [0, kv_len); `gather_attention` checks concrete lists before the kernel
(which clamps indices for memory safety) and refuses out-of-range ones with a clear error.
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

from pallas_kernels import _compat, block_sparse_mgpu, gather_mgpu
from pallas_kernels.block_mask import TokenBoxRule
from pallas_kernels.block_sparse import (LOG2E, _M_INIT, _check_qkv, _check_triton_tiles,
                                         _concrete, _is_pow2, _online_softmax_step, _pad_axis)


@dataclasses.dataclass(frozen=True)
class GatherConfig:
  """Query tile (divides the group size), keys gathered per step, Triton launch params."""
  block_q: int = 64
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    _check_triton_tiles(self)


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
            has_residual, permuted, exact):
  rest = list(rest)
  qperm_ref = rest.pop(0) if permuted else None
  qyx_ref, kbox_ref = (rest.pop(0), rest.pop(0)) if exact else (None, None)
  res_ref = rest.pop(0) if has_residual else None
  (o_ref,) = rest
  if permuted:
    # Query tile gathered by index (e.g. a 2D patch of the scale), written back the same way.
    qids = qperm_ref[...]
    q = q_ref[qids, :]
  else:
    q = q_ref[...]
  bq, d = q.shape
  cnt = cnt_ref[0]
  if exact:
    qy = qyx_ref[0, :]
    qx = qyx_ref[1, :]
  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
           jnp.zeros((bq,), jnp.float32))

  def body(c, carry, tail):
    start = pl.multiple_of(c * block_kv, block_kv)
    ids = jnp.clip(idx_ref[pl.ds(start, block_kv)], 0, kv_len - 1)
    k = k_ref[ids, :]
    v = v_ref[ids, :]
    keep = ((start + jnp.arange(block_kv, dtype=jnp.int32)) < cnt)[None, :] if tail else None
    if exact:
      ylo, yhi, xlo, xhi = (kbox_ref[r, ids] for r in range(4))
      box = ((ylo[None, :] <= qy[:, None]) & (qy[:, None] <= yhi[None, :])
             & (xlo[None, :] <= qx[:, None]) & (qx[:, None] <= xhi[None, :]))
      keep = box if keep is None else keep & box
    return _online_softmax_step(q, k, v, carry, qk_scale, keep)

  # Whole chunks skip the count mask (a select per score); only the last partial chunk pays.
  n_full = lax.div(cnt, jnp.int32(block_kv))
  carry = lax.fori_loop(0, n_full, functools.partial(body, tail=False), carry)
  acc, _, l = lax.fori_loop(n_full, lax.div(cnt + block_kv - 1, jnp.int32(block_kv)),
                            functools.partial(body, tail=True), carry)
  ok = l > 0
  out = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0)
  if has_residual:
    res = res_ref[qids, :] if permuted else res_ref[...]
    out = out + res.astype(jnp.float32)
  if permuted:
    o_ref[qids, :] = out.astype(o_ref.dtype)
  else:
    o_ref[...] = out.astype(o_ref.dtype)


GATHER_BACKENDS = ("auto", "triton", "mosaic")


def gather_attention(q, k, v, indices, counts=None, residual=None, *, group_size: int,
                     q_perm=None, rule: TokenBoxRule | None = None,
                     scale: float | None = None, config: GatherConfig = GatherConfig(),
                     interpret: bool = False, backend: str = "auto"):
  """Attention of each query group over its gathered keys; see `_gather_attention`.

  counts None means every slot is valid (fixed-budget top-k lists, as `topk_key_indices`
  makes). Concrete lists (numpy, or jax constants at trace time) are checked first with
  `validate_gather_lists`: the kernel clamps indices for memory safety, so an out-of-range
  index would otherwise read a wrong key silently. Traced lists (computed under jit, e.g. by
  `topk_key_indices`) are in range by construction and are not checked.

  backend: "triton" (this module's kernel: any counts, q_perm, rule, any GPU, interpret
  mode); "mosaic" (Hopper: each group's rows copied into one K/V buffer, then the Mosaic
  flash kernel with the residual fused — `gather_mgpu.py`; full lists, no q_perm / rule,
  group_size a multiple of 128); "auto": mosaic on an sm_90 GPU where it applies and
  group_size >= gather_mgpu.AUTO_MIN_GROUP, triton otherwise.
  """
  if backend not in GATHER_BACKENDS:
    raise ValueError(f"backend={backend!r}; choose one of {GATHER_BACKENDS}.")
  full = counts is None
  if counts is None:
    counts = np.full(np.shape(indices)[:3], np.shape(indices)[-1], np.int32)
  if _concrete(indices, counts):
    validate_gather_lists(indices, counts, k.shape[1])
    full = full or bool((np.asarray(counts) == np.shape(indices)[-1]).all())
  if choose_backend(q, full, group_size, q_perm=q_perm, rule=rule, residual=residual,
                    interpret=interpret, backend=backend) == "mosaic":
    return gather_mgpu.gather_attention_mgpu(q, k, v, indices, residual, group_size=group_size,
                                             scale=scale)
  return _gather_attention(q, k, v, indices, counts, residual, group_size=group_size,
                           q_perm=q_perm, rule=rule, scale=scale, config=config,
                           interpret=interpret)


def choose_backend(q, full: bool, group_size: int, *, q_perm=None, rule=None, residual=None,
                   interpret: bool = False, backend: str = "auto") -> str:
  """The backend `gather_attention` runs: "mosaic" or "triton" (see its docstring). full:
  every slot of every list is valid. Raises when "mosaic" is forced but cannot run."""
  if backend == "triton":
    return "triton"
  why = _mosaic_unsupported(q, full, group_size, q_perm, rule, interpret, residual)
  if backend == "mosaic":
    if why:
      raise NotImplementedError(f"the Mosaic gather path does not support {why}; use "
                                "backend='triton'.")
    return "mosaic"
  if not why and group_size >= gather_mgpu.AUTO_MIN_GROUP and _compat.on_hopper():
    return "mosaic"
  return "triton"


def _mosaic_unsupported(q, full, group_size, q_perm, rule, interpret, residual) -> str | None:
  """None when gather_mgpu's Hopper path can run this call, else why not."""
  if interpret:
    return "interpret mode"
  if q_perm is not None or rule is not None:
    return "q_perm or rule (2D tiles / exact lists)"
  if not full:
    return "partial lists (counts < S somewhere, or counts traced: pass counts=None for full lists)"
  if group_size % 128:
    return f"group_size={group_size} (a multiple of 128 only)"
  if residual is not None and residual.dtype != q.dtype:
    return f"a {residual.dtype} residual with {q.dtype} queries (same dtype only)"
  return block_sparse_mgpu.supports(q, None, residual=residual is not None, return_lse=False)


@functools.partial(jax.jit, static_argnames=("group_size", "scale", "config", "interpret"))
def _gather_attention(q, k, v, indices, counts, residual=None, *, group_size: int,
                      q_perm=None, rule: TokenBoxRule | None = None,
                      scale: float | None = None, config: GatherConfig = GatherConfig(),
                      interpret: bool = False):
  """Attention of each query group over its gathered keys.

  q [B, Lq, H, D]; k, v [B, Lk, H, D]; indices int32 [Bm, Hm, G, S] with G = ceil(Lq / group_size)
  and Bm in {1, B}, Hm in {1, H}; counts int32 [Bm, Hm, G]; residual [B, Lq, H, D] or None.
  q_perm: optional int32 [G * group_size], a permutation of the queries (needs Lq a multiple
    of group_size): group g holds queries q_perm[g*group_size:(g+1)*group_size], e.g. 2D
    patches of a scale. Outputs stay in the original order.
  rule: optional TokenBoxRule [Lq queries, Lk keys]; the selected keys are then also masked
    token by token (exact sparse attention over a per-group superset list).
  Returns [B, Lq, H, D] in q.dtype. group_size must be a multiple of config.block_q.
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  _check_qkv(q, k, v, lk)
  ng = -(-lq // group_size)
  bm, hm = indices.shape[:2]
  if (indices.ndim != 4 or indices.shape[2] != ng or counts.shape != indices.shape[:3]
      or bm not in (1, b) or hm not in (1, h)):
    raise ValueError(f"indices must be [Bm, Hm, G, S] with G={ng} (Lq={lq}, group_size="
                     f"{group_size}), Bm in (1, {b}), Hm in (1, {h}), and counts [Bm, Hm, G]; "
                     f"got {indices.shape} and {counts.shape}.")
  if group_size % config.block_q:
    raise ValueError(f"group_size={group_size} must be a multiple of the query tile "
                     f"config.block_q={config.block_q}.")
  if not _is_pow2(d) or d < 16:
    raise NotImplementedError(f"head dim {d} is not supported by the Triton kernel (powers of "
                              "two >= 16); use gather_attention_reference.")
  if residual is not None and residual.shape != q.shape:
    raise ValueError(f"residual must have q's shape {q.shape}; got {residual.shape}.")
  permuted = q_perm is not None
  if permuted and (lq % group_size or q_perm.shape != (lq,)):
    raise ValueError(f"q_perm needs Lq={lq} to be a multiple of group_size={group_size} and "
                     f"shape ({lq},); got {q_perm.shape}.")
  if rule is not None and (rule.q_len != lq or rule.kv_len != lk):
    raise ValueError(f"rule tables are for {rule.q_len} x {rule.kv_len}, the call is {lq} x {lk}.")
  scale = d ** -0.5 if scale is None else scale
  bq, bk = config.block_q, config.block_kv
  lq_pad = ng * group_size
  slots = -(-indices.shape[-1] // bk) * bk
  idx = _pad_axis(jnp.asarray(indices, jnp.int32), 3, slots)
  cnt = jnp.asarray(counts, jnp.int32)
  per_group = group_size // bq
  sel_b = (lambda bi: bi) if bm > 1 else (lambda bi: 0)
  sel_h = (lambda hi: hi) if hm > 1 else (lambda hi: 0)
  sq = _compat.SQUEEZED
  if permuted:
    q_spec = pl.BlockSpec((sq, lq, sq, d), lambda i, bi, hi: (bi, 0, hi, 0))
  else:
    q_spec = pl.BlockSpec((sq, bq, sq, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((sq, lk, sq, d), lambda i, bi, hi: (bi, 0, hi, 0))
  in_specs = [q_spec, kv_spec, kv_spec,
              pl.BlockSpec((sq, sq, 1), lambda i, bi, hi: (sel_b(bi), sel_h(hi), i // per_group)),
              pl.BlockSpec((sq, sq, sq, slots),
                           lambda i, bi, hi: (sel_b(bi), sel_h(hi), i // per_group, 0))]
  args = [q if permuted else _pad_axis(q, 1, lq_pad), k, v, cnt, idx]
  if permuted:
    in_specs.append(pl.BlockSpec((bq,), lambda i, bi, hi: (i,)))
    args.append(jnp.asarray(q_perm, jnp.int32))
  if rule is not None:
    qyx = jnp.asarray(rule.q_yx_2Q, jnp.int32)
    qyx = jnp.take(qyx, jnp.asarray(q_perm, jnp.int32), axis=1) if permuted else _pad_axis(
        qyx, 1, lq_pad, value=-1)
    in_specs += [pl.BlockSpec((2, bq), lambda i, bi, hi: (0, i)),
                 pl.BlockSpec((4, lk), lambda i, bi, hi: (0, 0))]
    args += [qyx, jnp.asarray(rule.k_box_4K, jnp.int32)]
  if residual is not None:
    in_specs.append(q_spec)
    args.append(residual if permuted else _pad_axis(residual, 1, lq_pad))
  kernel = functools.partial(_kernel, qk_scale=scale * LOG2E, kv_len=lk, block_kv=bk,
                             has_residual=residual is not None, permuted=permuted,
                             exact=rule is not None)
  with _compat.quiet_triton_deprecation():
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, lq if permuted else lq_pad, h, d), q.dtype),
        grid=(lq_pad // bq, b, h), in_specs=in_specs, out_specs=q_spec,
        compiler_params=_compat.triton_params(config.num_warps, config.num_stages),
        interpret=interpret, name="gather_attention")(*args)
  return out[:, :lq]


@functools.partial(jax.jit, static_argnames=("group_size", "scale"))
def gather_attention_reference(q, k, v, indices, counts, residual=None, *, group_size: int,
                               q_perm=None, rule: TokenBoxRule | None = None,
                               scale: float | None = None):
  """Pure-JAX f32 reference of `gather_attention`: the dense token mask it implies."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  ng = indices.shape[2]
  valid = jnp.arange(indices.shape[-1]) < counts[..., None]
  idx = jnp.clip(indices, 0, lk - 1)
  # Multiplicity of each key in each group's list (repeats count twice, as in the kernel).
  bi, hi, gi, _ = jnp.indices(idx.shape, sparse=True)
  mult_BHGK = jnp.zeros(idx.shape[:3] + (lk,), jnp.float32).at[bi, hi, gi, idx].add(
      valid.astype(jnp.float32))
  order = jnp.arange(lq) if q_perm is None else jnp.asarray(q_perm)
  group_of_q = jnp.zeros((lq,), jnp.int32).at[order].set(jnp.arange(lq) // group_size)
  mult = jnp.broadcast_to(mult_BHGK, (b, h, ng, lk))[:, :, group_of_q]  # [B, H, Lq, Lk]
  if rule is not None:
    mult = mult * rule.token_mask_jnp()[None, None]
  scale = d ** -0.5 if scale is None else scale
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=lax.Precision.HIGHEST) * scale
  keep = mult > 0
  s = jnp.where(keep, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(keep, mult * jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = jnp.where(l > 0, p / jnp.where(l > 0, l, 1.0), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=lax.Precision.HIGHEST)
  if residual is not None:
    out = out + residual.astype(jnp.float32)
  return out
