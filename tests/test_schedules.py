"""Infinity resolution templates and scale schedules (infinity/utils/dynamic_resolution.py)."""

import pytest

from sparvar_jax import schedules as S

# (template, 1M pixels, 1M tokens, 0.25M pixels, 0.25M tokens): reference notes, section 2.4.
TABLE = [
    (1.0, (1024, 1024), 10521, (512, 512), 2521),
    (1.25, (1120, 896), 10774, (560, 448), 2814),
    (1.333, (1152, 864), 10973, (576, 432), 2657),
    (1.5, (1248, 832), 10997, (624, 416), 2759),
    (1.75, (1344, 768), 11252, (672, 384), 2628),
    (2.0, (1440, 720), 11269, (736, 368), 2681),
    (2.5, (1600, 640), 10805, (800, 320), 2555),
    (3.0, (1776, 592), 11123, (864, 288), 2588),
]


def test_templates_and_order():
  assert S.H_DIV_W_TEMPLATES == (1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0,
                                 0.5, 2.5, 0.4, 3.0, 0.333)
  for t, hws in S.RATIO2HWS.items():
    assert len(hws) == 13
    for n in S.INFINITY_PN_STEPS.values():  # the official construction asserts this
      h, w = hws[n - 1]
      assert abs(h / w - t) < 0.01, (t, n)


@pytest.mark.parametrize("t,px1m,l1m,px025,l025", TABLE)
def test_sizes_match_reference_table(t, px1m, l1m, px025, l025):
  for tt, flip in ((t, False), (S.nearest_template(1 / t), True)):
    a, b = S.get_schedule(tt, "1M"), S.get_schedule(tt, "0.25M")
    f = (lambda p: p[::-1]) if flip else (lambda p: p)
    assert a.image_hw == f(px1m) and a.total_tokens == l1m and a.num_scales == 13
    assert b.image_hw == f(px025) and b.total_tokens == l025 and b.num_scales == 10
    assert b.rope_hw == a.scales[-1]  # RoPE is normalised by the 1M grid at any pn


def test_pn_steps_and_offsets():
  s = S.get_schedule(1.0, "0.06M")
  assert s.scales == ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16))
  assert s.offsets == (0, 1, 5, 21, 57, 121, 265, 521)
  assert S.get_schedule(1.0, "0.60M").num_scales == 12
  assert S.get_schedule(1.0, "1M").scale_schedule_3d()[-1] == (1, 64, 64)
  with pytest.raises(ValueError, match="unknown pn"):
    S.get_schedule(1.0, "2M")


def test_nearest_template():
  assert S.nearest_template(1.0) == 1.0
  assert S.nearest_template(1.3) == 1.333
  assert S.nearest_template(0.7) == 0.666
  assert S.nearest_template(9 / 16) == 0.571
  assert S.nearest_template(10.0) == 3.0
  assert S.nearest_template(0.01) == 0.333
  for bad in (0, -1, float("nan"), float("inf"), "1"):
    with pytest.raises(ValueError):
      S.nearest_template(bad)
  with pytest.raises(ValueError, match="not a template"):
    S.get_schedule(1.1, exact=True)


def test_parse_aspect():
  assert S.parse_aspect("1:1") == 1.0
  assert S.parse_aspect("16:9") == pytest.approx(9 / 16)
  assert S.parse_aspect("3x4") == pytest.approx(4 / 3)
  assert S.parse_aspect("1.5") == 1.5
  for bad in ("", "a:b", "0:1", "-1", "1:0", "nan"):
    with pytest.raises(ValueError, match="aspect ratio"):
      S.parse_aspect(bad)


def test_vae_schedule_and_custom():
  s = S.get_schedule(1.0, "1M")
  assert S.vae_schedule(s.scales, False) == s.scales
  assert S.vae_schedule(s.scales, True)[-1] == (128, 128)
  c = S.custom_schedule([(1, 1), (2, 3)], rope_hw=(4, 6))
  assert c.total_tokens == 7 and c.rope_hw == (4, 6)
  with pytest.raises(ValueError):
    S.custom_schedule([])
