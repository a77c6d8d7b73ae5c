"""Resizes that match `torch.nn.functional.interpolate` exactly, as precomputed matrices.

A separable resize is `y = M_h @ x @ M_w^T`. The matrices are built once in numpy (float64
storage) from PyTorch's own index/weight formulas (aten/src/ATen/native/UpSample.h,
UpSampleKernel.cpp), reproducing its float32 index arithmetic, and applied with einsum,
so the JAX result equals PyTorch's up to float32 summation order (~1e-7).
`jax.image.resize` does NOT match: its cubic kernel is Keys A=-0.5 with renormalised
borders, and its linear resize antialiases when shrinking.

Modes (all with align_corners=False, sizes given explicitly, no scale_factor):
- 'bicubic': A=-0.75; source x = (o+0.5)*in/out - 0.5 (not clamped); taps
  floor(x)-1 .. floor(x)+2 clamped to the border (replicate).
- 'bilinear': source x = max((o+0.5)*in/out - 0.5, 0); NO antialiasing, also when
  shrinking. Infinity's 'trilinear' on a (B,C,1,H,W) tensor is exactly this.
  ('trilinear' is accepted as an alias.)
- 'area': adaptive average pooling, window floor(o*in/out) .. ceil((o+1)*in/out)
  (windows overlap when in/out is not an integer, e.g. 16 -> 13).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("bicubic", "bilinear", "area")
_ALIASES = {"trilinear": "bilinear", "linear": "bilinear"}
_CUBIC_A = -0.75


def _canonical_mode(mode: str) -> str:
  mode = _ALIASES.get(mode, mode)
  if mode not in MODES:
    raise ValueError(f"unknown resize mode {mode!r}; supported: {MODES} "
                     f"(aliases {sorted(_ALIASES)})")
  return mode


_f32 = np.float32


def _cubic_weights(t: np.float32) -> tuple[np.float32, ...]:
  """PyTorch `get_cubic_upsample_coefficients` (float32 opmath) for taps -1, 0, 1, 2."""
  a = _f32(_CUBIC_A)

  def cc1(x):  # |x| <= 1
    return ((a + _f32(2)) * x - (a + _f32(3))) * x * x + _f32(1)

  def cc2(x):  # 1 < |x| < 2
    return ((a * x - _f32(5) * a) * x + _f32(8) * a) * x - _f32(4) * a

  x2 = _f32(1) - t
  return cc2(t + _f32(1)), cc1(t), cc1(x2), cc2(x2 + _f32(1))


def _source_index(scale: np.float32, o: int, mode: str) -> np.float32:
  """PyTorch `area_pixel_compute_source_index` (align_corners=False) in float32.

  torch 2.13's CPU build contracts `scale * (o + 0.5) - 0.5` into one fused multiply-add
  in the linear kernels but not in the cubic one (measured: with this choice the weights
  equal PyTorch's bit for bit on every pair in tests/test_resize.py). Both products are
  exact in float64, so a single rounding to float32 reproduces the FMA.
  """
  if mode == "bilinear":
    src = _f32(float(scale) * (o + 0.5) - 0.5)
    return max(src, _f32(0))
  return scale * (_f32(o) + _f32(0.5)) - _f32(0.5)


@functools.lru_cache(maxsize=None)
def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """[out_size, in_size] float64 matrix M with y = M @ x along one axis (read-only).

  The source positions and weights follow PyTorch's CPU kernels step by step in float32
  (its `opmath_t` for float inputs), so the weights are PyTorch's own, not merely close;
  the matrix is stored in float64 and rounded to the input dtype when applied.
  """
  mode = _canonical_mode(mode)
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got {in_size=} {out_size=}")
  m = np.zeros((out_size, in_size), np.float64)
  if in_size == out_size:  # every PyTorch kernel copies
    m[np.arange(in_size), np.arange(in_size)] = 1.0
    m.setflags(write=False)
    return m
  with np.errstate(over="raise", invalid="raise"):
    scale = _f32(in_size) / _f32(out_size)
    for o in range(out_size):
      if mode == "area":
        start = (o * in_size) // out_size
        end = -((-(o + 1) * in_size) // out_size)  # ceil
        m[o, start:end] = float(_f32(1) / _f32(end - start))  # torch: window sum / count
        continue
      src = _source_index(scale, o, mode)
      i0 = min(int(np.floor(src)), in_size - 1)
      lam = _f32(min(max(src - _f32(i0), _f32(0)), _f32(1)))
      if mode == "bilinear":
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        taps = ((i0, _f32(1) - lam), (i1, lam))
      else:  # bicubic: taps clamped to the border
        taps = [(min(max(i0 - 1 + k, 0), in_size - 1), wk)
                for k, wk in enumerate(_cubic_weights(lam))]
      for i, wk in taps:  # taps that clamp onto one pixel add up in float32, as in torch
        m[o, i] = float(_f32(m[o, i]) + wk)
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def _is_identity(in_size: int, out_size: int, mode: str) -> bool:
  return in_size == out_size and np.array_equal(resize_matrix(in_size, out_size, mode),
                                                np.eye(in_size))


def resize_hw(x_BHWC: jax.Array, hw: tuple[int, int], mode: str) -> jax.Array:
  """Resizes the two spatial axes of an NHWC array like PyTorch's F.interpolate.

  x_BHWC: [B, H, W, C] float; hw: (h, w) static; returns [B, h, w, C] in x's dtype.
  """
  h, w = int(hw[0]), int(hw[1])
  _, H, W, _ = x_BHWC.shape
  mode = _canonical_mode(mode)
  y = x_BHWC
  if not _is_identity(H, h, mode):
    m_hH = jnp.asarray(resize_matrix(H, h, mode), dtype=y.dtype)
    y = jnp.einsum("hH,BHWC->BhWC", m_hH, y, precision=jax.lax.Precision.HIGHEST)
  if not _is_identity(W, w, mode):
    m_wW = jnp.asarray(resize_matrix(W, w, mode), dtype=y.dtype)
    y = jnp.einsum("wW,BHWC->BHwC", m_wW, y, precision=jax.lax.Precision.HIGHEST)
  return y
