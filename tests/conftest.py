"""Shared test fixtures: the official golden outputs and GPU gating."""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", False)

_HERE = os.path.dirname(os.path.abspath(__file__))


def golden_dir(name: str) -> str:
  """Path of a golden fixture folder; skips the test where the fixtures are absent."""
  root = os.environ.get("SPARVAR_GOLDEN") or os.path.join(_HERE, "..", "..", "shared", "golden")
  path = os.path.join(root, name)
  if not os.path.isdir(path):
    pytest.skip(f"golden fixtures not found at {path}; set SPARVAR_GOLDEN to shared/golden")
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
