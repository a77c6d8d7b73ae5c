"""Version guards for the Pallas APIs used here (jax 0.10.2 on CPU CI, 0.11.2 on the H100).

Both versions have `pl.pallas_call`, `pl.BlockSpec`, `pl.Squeezed`, `pl.ds`, `pl.multiple_of`
and `jax.experimental.pallas.triton.CompilerParams` (older releases called it
`TritonCompilerParams` in `pallas.gpu`). Passing the Triton params selects the Triton lowering
even though Mosaic GPU is the default since 0.9; the Triton backend warns that it is
deprecated (0.11) and we silence only that warning.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import triton as _plt
  TritonCompilerParams = getattr(_plt, "CompilerParams", None) or getattr(
      _plt, "TritonCompilerParams")
except ImportError:  # pragma: no cover - very old jax
  from jax.experimental.pallas import gpu as _plgpu  # type: ignore
  TritonCompilerParams = _plgpu.TritonCompilerParams  # type: ignore

SQUEEZED = pl.Squeezed() if hasattr(pl, "Squeezed") else None
JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def triton_params(num_warps: int, num_stages: int):
  return TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def quiet_triton_deprecation():
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")
    warnings.filterwarnings("ignore", message=".*jax-pallas-triton.*")
    yield


def on_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def on_hopper() -> bool:
  """True on an sm_90 GPU (H100/H200), where the Mosaic GPU kernels compile."""
  if not on_gpu():
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9")
