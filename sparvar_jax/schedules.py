"""Scale schedules: Infinity's resolution templates (`infinity/utils/dynamic_resolution.py`)
and VAR's square `patch_nums`, as one `Schedule` type.

A template is an aspect ratio h/w with a 13-step list of token grids (h, w); a 'pn'
(pixel budget) takes the first 7/10/12/13 steps. Every token is 16x16 pixels (stride-16
VAE, or the stride-8 VAE with 2x2 spatial patchify, whose latent grid is twice as large:
`vae_schedule`). Pure data and arithmetic: no JAX.
"""

from __future__ import annotations

import dataclasses
import math
import re

from sparvar_jax.configs import INFINITY_PN_STEPS

# Official `ratio2hws`: the eight portrait/square templates; the landscape ones are their
# transposes, keyed by int(1/ratio*1000)/1000 (0.8, 0.75, 0.666, 0.571, 0.5, 0.4, 0.333).
_PORTRAIT_HWS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24),
            (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24),
            (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
            (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22),
            (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
            (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
            (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16),
            (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
            (54, 18), (72, 24), (90, 30), (111, 37)),
}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
  out = {}
  for ratio, hws in _PORTRAIT_HWS.items():
    out[ratio] = hws
    if ratio != 1.0:
      out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
  return out


# All 15 templates in the official order (1.0, 1.25, 0.8, 1.333, 0.75, ...).
RATIO2HWS: dict[float, tuple[tuple[int, int], ...]] = _all_templates()
H_DIV_W_TEMPLATES: tuple[float, ...] = tuple(RATIO2HWS)
PN_VALUES: tuple[str, ...] = tuple(INFINITY_PN_STEPS)
TOKEN_STRIDE = 16  # pixels per transformer token side, for both VAEs


def nearest_template(h_div_w: float) -> float:
  """The template closest to h_div_w (official argmin |h_div_w - template|, first on ties)."""
  if not (isinstance(h_div_w, (int, float)) and math.isfinite(h_div_w) and h_div_w > 0):
    raise ValueError(f"aspect ratio h/w must be a positive finite number, got {h_div_w!r}")
  return min(H_DIV_W_TEMPLATES, key=lambda t: abs(h_div_w - t))


def parse_aspect(text: str) -> float:
  """'W:H' (e.g. '16:9' landscape, '1:1'), 'WxH' or a plain h/w number -> h/w."""
  s = str(text).strip()
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[:xX]\s*([0-9]*\.?[0-9]+)\s*", s)
  try:
    if m:
      w, h = float(m.group(1)), float(m.group(2))
      if w <= 0 or h <= 0:
        raise ValueError
      return h / w
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
      raise ValueError
    return v
  except ValueError:
    raise ValueError(f"cannot read aspect ratio {text!r}: give W:H such as 1:1, 16:9 or 3:4, "
                     "or a positive height/width number such as 1.333") from None


@dataclasses.dataclass(frozen=True)
class Schedule:
  """One generation schedule: template, pn, per-scale token grids and derived sizes."""

  template: float  # h/w of the template
  pn: str
  scales: tuple[tuple[int, int], ...]  # transformer token grid (h, w) per scale
  rope_hw: tuple[int, int]  # last grid of the template's 1M schedule (RoPE normalisation)

  @property
  def num_scales(self) -> int:
    return len(self.scales)

  @property
  def lengths(self) -> tuple[int, ...]:
    return tuple(h * w for h, w in self.scales)

  @property
  def offsets(self) -> tuple[int, ...]:
    """Start of every scale in the concatenated sequence, plus the total at the end."""
    out = [0]
    for n in self.lengths:
      out.append(out[-1] + n)
    return tuple(out)

  @property
  def total_tokens(self) -> int:
    return sum(self.lengths)

  @property
  def image_hw(self) -> tuple[int, int]:
    h, w = self.scales[-1]
    return h * TOKEN_STRIDE, w * TOKEN_STRIDE

  def scale_schedule_3d(self) -> list[tuple[int, int, int]]:
    """The official `[(1, h, w), ...]` form."""
    return [(1, h, w) for h, w in self.scales]


def get_schedule(h_div_w: float, pn: str = "1M", *, exact: bool = False) -> Schedule:
  """The schedule of the template nearest to h_div_w with pixel budget pn.

  With exact=True, h_div_w must itself be a template (within 1e-6).
  """
  if pn not in INFINITY_PN_STEPS:
    raise ValueError(f"unknown pn {pn!r}; choose one of {list(INFINITY_PN_STEPS)}")
  t = nearest_template(h_div_w)
  if exact and abs(t - h_div_w) > 1e-6:
    raise ValueError(f"h/w {h_div_w} is not a template; templates are {list(H_DIV_W_TEMPLATES)}")
  hws = RATIO2HWS[t]
  return Schedule(template=t, pn=pn, scales=hws[:INFINITY_PN_STEPS[pn]], rope_hw=hws[-1])


def custom_schedule(scales, rope_hw=None, pn: str = "custom") -> Schedule:
  """A schedule from explicit (h, w) grids (tests, tiny models). rope_hw defaults to the
  last grid."""
  scales = tuple((int(h), int(w)) for h, w in scales)
  if not scales or any(h < 1 or w < 1 for h, w in scales):
    raise ValueError(f"scales must be a non-empty list of positive (h, w), got {scales}")
  rope_hw = tuple(rope_hw) if rope_hw is not None else scales[-1]
  return Schedule(template=scales[-1][0] / scales[-1][1], pn=pn, scales=scales,
                  rope_hw=(int(rope_hw[0]), int(rope_hw[1])))


def square_schedule(patch_nums, pn: str = "var") -> Schedule:
  """VAR's `patch_nums` (square grids side x side) as a Schedule."""
  return custom_schedule([(int(p), int(p)) for p in patch_nums], pn=pn)


def vae_schedule(scales, patchify: bool) -> tuple[tuple[int, int], ...]:
  """VAE latent grids per scale: the token grids, doubled with 2x2 spatial patchify (8B)."""
  f = 2 if patchify else 1
  return tuple((h * f, w * f) for h, w in scales)
