"""Reading converted checkpoint directories (written by `python -m convert.<model>`).

Layout: `DIR/config.json` ({"configs": {name: config dict}, "meta": {...}}) and one
orbax tree per component, `DIR/<name>/` (e.g. `var`, `vae`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from sparvar_jax import configs as configs_lib

CONFIG_FILE = "config.json"


class CheckpointError(Exception):
  """A converted checkpoint directory is missing, incomplete or of the wrong kind."""


def read_config(ckpt_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns ({component: config dataclass}, meta)."""
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"checkpoint directory {ckpt_dir!r} does not exist. Convert the "
                          "official weights first, e.g. `python -m convert.var --var "
                          "var_d16.pth --vae vae_ch160v4096z32.pth --out DIR`.")
  if not os.path.isfile(path):
    raise CheckpointError(f"{ckpt_dir!r} has no {CONFIG_FILE}: it is not a converted "
                          "checkpoint (or its conversion did not finish). Convert again.")
  try:
    with open(path) as f:
      raw = json.load(f)
    cfgs = {k: configs_lib.config_from_dict(v) for k, v in raw["configs"].items()}
  except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{path!r} is malformed ({e}); convert the checkpoint again.") from e
  _check_family(ckpt_dir, cfgs)
  return cfgs, raw.get("meta", {})


# Each transformer's own VAE: family, VAE config type, the VAE's name, the converter.
_FAMILY_VAE = {
    configs_lib.VARConfig: ("VAR", configs_lib.VQVAEConfig, "the multi-scale VQVAE",
                            "convert.var"),
    configs_lib.InfinityConfig: ("Infinity", configs_lib.BSQVAEConfig, "the BSQ VAE",
                                 "convert.infinity"),
}


def _check_family(ckpt_dir: str, cfgs: dict[str, Any]) -> None:
  """A transformer must come with its own family's VAE: the loaders build the VAE from
  its config, so another family's (even with a tree that matches that config) would fail
  with an AttributeError deep inside the VAE's constructor."""
  vae = cfgs.get("vae")
  for cfg in cfgs.values():
    if type(cfg) not in _FAMILY_VAE or vae is None:
      continue
    family, vae_type, vae_name, converter = _FAMILY_VAE[type(cfg)]
    if not isinstance(vae, vae_type):
      raise CheckpointError(
          f"{ckpt_dir!r} pairs its {family} transformer with a {type(vae).__name__} VAE; "
          f"{family} needs {vae_name} ({vae_type.__name__}). The directory "
          f"was assembled by hand or damaged; convert again with `python -m {converter}`.")


def read_tree(ckpt_dir: str, name: str) -> dict[str, Any]:
  """Restores one component's parameter tree as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.join(ckpt_dir, name))
  if not os.path.isdir(path):
    raise CheckpointError(f"{ckpt_dir!r} has no component {name!r}; found "
                          f"{sorted(os.listdir(ckpt_dir))}. Convert again.")
  _ignore_reads_after_a_failed_restore()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(path)
  except Exception as e:  # orbax raises many types for damaged trees
    raise CheckpointError(f"could not read {path!r}: {type(e).__name__}: {str(e)[:300]}. "
                          "The directory is damaged; convert again.") from e
  return _to_numpy_tree(tree)


def _ignore_reads_after_a_failed_restore() -> None:
  """When one array of a damaged tree fails to read, orbax raises at once and closes its
  event loop while tensorstore still finishes the other reads; their completion callbacks
  then hit the closed loop and Python prints "RuntimeError: Event loop is closed" tracebacks
  after our error message (as unraisable exceptions, from tensorstore's threads, at any
  time up to exit). They carry nothing: the failed read is already reported. This drops
  exactly those and passes every other unraisable exception on."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _to_numpy_tree(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def load_into(model, tree: dict[str, Any], what: str = "model"):
  """Copies a pure-dict tree into an NNX model, strictly (same paths and shapes)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  state = nnx.state(model, nnx.Param)
  want = flatten_tree(nnx.to_pure_dict(state))
  have = flatten_tree(tree)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(f"{k}: model {tuple(want[k].shape)}, checkpoint {tuple(have[k].shape)}"
                  for k in set(want) & set(have) if tuple(want[k].shape) != tuple(have[k].shape))
  if missing or unexpected or shapes:
    raise CheckpointError(
        f"the converted {what} does not fit the model built from its config:\n"
        f"missing: {missing[:40]}\nunexpected: {unexpected[:40]}\nshapes: {shapes[:40]}\n"
        "Convert again with this version of sparvar-jax.")
  cast = {k: jnp.asarray(v, dtype=want[k].dtype) for k, v in have.items()}
  nnx.replace_by_pure_dict(state, _unflat(cast))
  nnx.update(model, state)
  return model


def flatten_tree(tree, prefix=()) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf} (keys joined with "/" as strings)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_tree(v, prefix + (str(k),)))
    else:
      out["/".join(prefix + (str(k),))] = v
  return out


def _unflat(flat):
  tree: dict[str, Any] = {}
  for k, v in flat.items():
    parts = k.split("/")
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree
