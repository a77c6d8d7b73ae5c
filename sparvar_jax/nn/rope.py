"""Infinity's 2D rotary position embedding (`precompute_rope2d_freqs_grid`, mode
`rope2d_normalized_by_hw=2`, and `apply_rotary_emb` in infinity/models/basic.py).

Scale (ph, pw) of a schedule samples a fixed max_hw x max_hw grid of angles at rows
round(i * uph / ph) and columns round(j * upw / pw), where (uph, upw) is the last grid of
the template's 1M schedule; rounding is half-to-even (torch.round) on float32 products,
as the official code computes them. The angle vector of a position is
cat(row * inv_freq, col * inv_freq) (head_dim/2 angles); angle k rotates the adjacent
pair (x[2k], x[2k+1]). Tables are numpy constants computed at trace time.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """[head_dim // 4] float32: 1 / theta^(arange(0, half, 2) / half), half = head_dim / 2."""
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
  half = head_dim // 2
  expo = np.arange(0, half, 2, dtype=np.int64).astype(np.float32) / np.float32(half)
  # torch evaluates `theta ** expo` (scalar base) to the correctly rounded float32; a
  # float32 numpy power differs in the last bit for some entries, which moves the
  # angles of far positions (x127) by ~4e-6.
  powed = np.power(np.float64(theta), expo.astype(np.float64)).astype(np.float32)
  return (np.float32(1.0) / powed).astype(np.float32)


def grid_indices(ph: int, pw: int, uph: int, upw: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column indices ([ph*pw] int32 each, row-major) of scale (ph, pw)."""
  rows = np.round(np.arange(ph, dtype=np.float32) * np.float32(uph / ph)).astype(np.int32)
  cols = np.round(np.arange(pw, dtype=np.float32) * np.float32(upw / pw)).astype(np.int32)
  return np.repeat(rows, pw), np.tile(cols, ph)


@functools.lru_cache(maxsize=64)
def rope2d_table(head_dim: int, scales: tuple[tuple[int, int], ...], rope_hw: tuple[int, int],
                 max_hw: int = 128, theta: float = 10000.0) -> np.ndarray:
  """cos/sin table [2, L, head_dim // 2] float32 for all scales concatenated (L = sum h*w).

  The returned array is shared (cached): do not modify it.
  """
  uph, upw = rope_hw
  f = inv_freq(head_dim, theta)
  pos = np.arange(max_hw, dtype=np.int64).astype(np.float32)
  fr = np.outer(pos, f).astype(np.float32)  # [max_hw, head_dim/4]
  cos_f, sin_f = np.cos(fr), np.sin(fr)
  parts = []
  for ph, pw in scales:
    r, c = grid_indices(ph, pw, uph, upw)
    if r.max() >= max_hw or c.max() >= max_hw:
      raise ValueError(f"scale {(ph, pw)} with rope grid {rope_hw} needs positions beyond the "
                       f"{max_hw}x{max_hw} RoPE grid")
    cos = np.concatenate([cos_f[r], cos_f[c]], axis=-1)
    sin = np.concatenate([sin_f[r], sin_f[c]], axis=-1)
    parts.append(np.stack([cos, sin]))
  out = np.concatenate(parts, axis=1).astype(np.float32)
  out.setflags(write=False)
  return out


def apply_rope2d(x_BLHc: jnp.ndarray, table_2Lk) -> jnp.ndarray:
  """Rotates adjacent pairs of x [B, L, H, c] by the angles of table [2, L, c/2]; fp32 math,
  result in x's dtype."""
  dt = x_BLHc.dtype
  x = x_BLHc.astype(jnp.float32).reshape(*x_BLHc.shape[:-1], -1, 2)
  cos = jnp.asarray(table_2Lk[0], jnp.float32)[None, :, None, :]
  sin = jnp.asarray(table_2Lk[1], jnp.float32)[None, :, None, :]
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
  return out.reshape(x_BLHc.shape).astype(dt)
