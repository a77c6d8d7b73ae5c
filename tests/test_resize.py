"""Resize matrices against torch.nn.functional.interpolate on every scale pair used."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparvar_jax import resize
from sparvar_jax.configs import VAR_PATCH_NUMS

# Infinity 1M schedules (dynamic_resolution.py ratio2hws): the 1:1 template and 1.333.
INF_1M_SQUARE = [(p, p) for p in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)]
INF_1M_1333 = [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
               (36, 27), (48, 36), (60, 45), (72, 54)]


def _var_pairs():
  """(in_hw, out_hw, mode): VAR bicubic scale->last scale, area last scale->scale."""
  pairs = set()
  for pns in (VAR_PATCH_NUMS[256], VAR_PATCH_NUMS[512]):
    last = pns[-1]
    for pn in pns[:-1]:
      pairs.add(((pn, pn), (last, last), "bicubic"))
      pairs.add(((last, last), (pn, pn), "area"))
  return sorted(pairs)


def _infinity_pairs():
  """Bilinear up of every scale's codes to the final grid, and down to every next scale;
  x2 grids for the patchify VAE."""
  pairs = set()
  for sched in (INF_1M_SQUARE, INF_1M_1333):
    for mult in (1, 2):
      hws = [(h * mult, w * mult) for h, w in sched]
      last = hws[-1]
      for hw in hws[:-1]:
        pairs.add((hw, last, "bilinear"))
      for hw in hws[1:]:
        pairs.add((last, hw, "bilinear"))
      # Teacher forcing (flip_requant) also area-downsizes the residual to every scale.
      for hw in hws[:-1]:
        pairs.add((last, hw, "area"))
  return sorted(pairs)


def _apply_np(x_BHWC, out_hw, mode):
  m_h = resize.resize_matrix(x_BHWC.shape[1], out_hw[0], mode).astype(np.float32)
  m_w = resize.resize_matrix(x_BHWC.shape[2], out_hw[1], mode).astype(np.float32)
  return np.einsum("wW,BhWC->BhwC", m_w, np.einsum("hH,BHWC->BhWC", m_h, x_BHWC))


def _check(in_hw, out_hw, mode, rng, use_jax=True):
  """Max abs error of our resize against F.interpolate on N(0,1) data."""
  x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
  got = np.asarray(resize.resize_hw(x, out_hw, mode)) if use_jax else _apply_np(x, out_hw, mode)
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  if mode == "bilinear":  # Infinity calls 'trilinear' on (B, C, 1, H, W)
    want = F.interpolate(t.unsqueeze(2), size=(1, *out_hw), mode="trilinear").squeeze(2)
  else:
    want = F.interpolate(t, size=out_hw, mode=mode)
  want = want.permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  assert err <= 1e-6, f"{in_hw}->{out_hw} {mode}: max abs err {err}"
  return err


def test_var_pairs():
  rng = np.random.default_rng(0)
  pairs = _var_pairs()
  assert len(pairs) == 2 * (9 + 9)  # two modes x nine smaller scales x two resolutions
  errs = [_check(a, b, m, rng, use_jax=(b[0] == 16 or a[0] == 16)) for a, b, m in pairs]
  assert max(errs) > 0  # the comparison is live


def test_infinity_pairs():
  """Every pair through the matrices; a non-square subset through resize_hw (jit per shape
  is slow on CPU, and the wiring is the same for every pair)."""
  rng = np.random.default_rng(1)
  pairs = _infinity_pairs()
  for a, b, m in pairs:
    _check(a, b, m, rng, use_jax=False)
  for a, b, m in [((4, 3), (72, 54), "bilinear"), ((72, 54), (24, 18), "bilinear"),
                  ((144, 108), (16, 12), "area"), ((2, 2), (128, 128), "bilinear")]:
    assert (a, b, m) in pairs
    _check(a, b, m, rng, use_jax=True)


def test_bilinear_is_not_antialiased_and_area_overlaps():
  # 16 -> 13 area windows overlap; 64 -> 2 bilinear samples two points per output.
  m = resize.resize_matrix(16, 13, "area")
  assert (np.count_nonzero(m, axis=1) >= 2).all() and np.allclose(m.sum(1), 1)
  assert np.count_nonzero(m[:, 1]) == 2  # input 1 feeds two overlapping windows
  b = resize.resize_matrix(64, 2, "bilinear")
  assert (np.count_nonzero(b, axis=1) == 2).all()


def test_identity_and_errors():
  x = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)
  for mode in resize.MODES:
    np.testing.assert_array_equal(np.asarray(resize.resize_hw(x, (5, 4), mode)), x)
  with pytest.raises(ValueError, match="unknown resize mode"):
    resize.resize_matrix(4, 8, "lanczos")
  with pytest.raises(ValueError):
    resize.resize_matrix(0, 8, "area")
  assert not resize.resize_matrix(4, 8, "bicubic").flags.writeable


def _torch_matrix(n_in, n_out, mode):
  """PyTorch's effective 1-D resize matrix, read off from one-hot inputs."""
  x = torch.eye(n_in, dtype=torch.float32).reshape(n_in, 1, n_in, 1)
  if mode == "bilinear":
    y = F.interpolate(x.unsqueeze(2), size=(1, n_out, 1), mode="trilinear").squeeze(2)
  else:
    y = F.interpolate(x, size=(n_out, 1), mode=mode)
  return y.reshape(n_in, n_out).T.double().numpy()


def test_weights_equal_torch_bitwise():
  pairs = {(a[0], b[0], m) for a, b, m in _var_pairs() + _infinity_pairs()}
  pairs |= {(a[1], b[1], m) for a, b, m in _infinity_pairs()}
  for n_in, n_out, mode in sorted(pairs):
    np.testing.assert_array_equal(resize.resize_matrix(n_in, n_out, mode),
                                  _torch_matrix(n_in, n_out, mode), err_msg=f"{n_in}->{n_out} {mode}")
