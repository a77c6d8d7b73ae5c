"""Shared test fixtures: the official golden outputs and GPU gating."""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", False)

_HERE = os.path.dirname(os.path.abspath(__file__))


def golden_dir(name: str) -> str:
  """Path of a golden fixture folder. Where it is absent the test skips, saying so, or
  fails when SPARVAR_REQUIRE_GOLDEN is set (CI: a skipped parity test checks nothing)."""
  root = os.environ.get("SPARVAR_GOLDEN") or os.path.join(_HERE, "..", "..", "shared", "golden")
  path = os.path.join(root, name)
  if not os.path.isdir(path):
    msg = (f"golden fixtures not found at {path}; put shared/golden beside the checkout "
           "(../shared/golden) or set SPARVAR_GOLDEN to it")
    if os.environ.get("SPARVAR_REQUIRE_GOLDEN"):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  del config
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
