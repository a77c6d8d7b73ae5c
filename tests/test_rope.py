"""2D RoPE tables and rotation against our PyTorch statement of the official code."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sparvar_jax import schedules
from sparvar_jax.nn import rope
from tests.reference import infinity_torch as ref


@pytest.mark.parametrize("template", schedules.H_DIV_W_TEMPLATES)
def test_table_equals_reference(template):
  s = schedules.get_schedule(template, "1M")
  for head_dim in (128, 64):
    ours = rope.rope2d_table(head_dim, s.scales, s.rope_hw)
    theirs = ref.rope_table(head_dim, s.scales, s.rope_hw).numpy()
    assert ours.shape == (2, s.total_tokens, head_dim // 2)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-7)


def test_grid_indices_round_half_to_even_and_pn():
  # h/w 1.5, 1M grid 78x52: at the 48x32 scale row 4 maps to 4*78/48 = 6.5 -> 6 (even).
  rows, cols = rope.grid_indices(48, 32, 78, 52)
  assert rows[4 * 32] == 6 and rows[5 * 32] == 8
  # 512px 1:1 uses every second row/column of the 64x64 grid at its 32x32 scale.
  s = schedules.get_schedule(1.0, "0.25M")
  r, c = rope.grid_indices(32, 32, *s.rope_hw)
  assert r.reshape(32, 32)[:, 0].tolist() == list(range(0, 64, 2))
  assert c[:32].tolist() == list(range(0, 64, 2))
  # A 0.25M table is the prefix of the 1M table of the same template.
  full = schedules.get_schedule(1.5, "1M")
  part = schedules.get_schedule(1.5, "0.25M")
  t_full = rope.rope2d_table(128, full.scales, full.rope_hw)
  t_part = rope.rope2d_table(128, part.scales, part.rope_hw)
  np.testing.assert_array_equal(t_part, t_full[:, :part.total_tokens])


def test_apply_matches_reference_pairs_and_heights_first():
  s = schedules.get_schedule(0.75, "0.06M")
  tab = rope.rope2d_table(64, s.scales, s.rope_hw)
  x = np.random.default_rng(0).standard_normal((2, s.total_tokens, 3, 64)).astype(np.float32)
  ours = np.asarray(rope.apply_rope2d(jnp.asarray(x), tab))
  theirs = ref.apply_rope(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(tab.copy()))
  np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), rtol=0, atol=1e-6)
  # Pair 0 rotates by row angles (row * inv_freq[0] = row), the last pair by column angles.
  t = s.offsets[-2]  # first token of the last scale is (row 0, col 0); next is (0, 1)
  h, w = s.scales[-1]
  r, c = rope.grid_indices(h, w, *s.rope_hw)
  np.testing.assert_allclose(tab[0, t + 1, 0], np.cos(r[1]), atol=1e-7)
  np.testing.assert_allclose(tab[0, t + 1, 16], np.cos(c[1]), atol=1e-6)


def test_table_too_large_is_refused():
  with pytest.raises(ValueError, match="RoPE grid"):
    rope.rope2d_table(64, ((200, 1),), (200, 1))
