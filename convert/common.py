"""Shared machinery for checkpoint conversion: safe loading, strict key maps, atomic output.

A conversion is declarative: a list of `Rule`s, each naming the JAX tree path it fills,
the PyTorch key(s) it reads, the PyTorch shape it expects and a transform (transpose,
stack over layers, ...). `apply_rules` checks the whole state dict against the rules
before anything is written and reports every missing key, every unexpected key and
every shape mismatch at once.

This package maps and validates tensors only; it imports no model code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np


class ConversionError(Exception):
  """Bad input to a conversion; the message says what was wrong and what to do."""


# --------------------------------------------------------------------------------------
# Loading untrusted checkpoint files
# --------------------------------------------------------------------------------------


def _to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(t, torch.Tensor):
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
      t = t.float()
    return t.numpy()
  return np.asarray(t)


def _flatten_nested(obj: Any, prefix: str = "") -> dict[str, Any]:
  """Flattens nested dicts of tensors into dotted keys (for wrapped checkpoints)."""
  out = {}
  for k, v in obj.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten_nested(v, key + "."))
    else:
      out[key] = v
  return out


def load_torch_file(path: str) -> dict[str, Any]:
  """Loads a .pth/.pt/.bin (torch zip, weights only) or .safetensors file as a dict.

  Checkpoints are untrusted: pickles are opened with `weights_only=True`, so a file
  that needs arbitrary Python objects is refused rather than executed.
  """
  if not os.path.exists(path):
    raise ConversionError(f"checkpoint file not found: {path!r}. Pass the path to the "
                          "downloaded official file.")
  if os.path.isdir(path):
    raise ConversionError(f"{path!r} is a directory; expected a single checkpoint file.")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return dict(load_file(path))
    except Exception as e:  # safetensors raises several types for corrupt headers
      raise ConversionError(f"could not read safetensors file {path!r}: {e}. The file is "
                            "corrupt or truncated; download it again.") from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError("reading .pth checkpoints needs PyTorch: pip install "
                          "'sparvar-jax[convert]' (CPU torch is enough).") from e
  if not zipfile.is_zipfile(path):
    raise ConversionError(
        f"{path!r} is not a PyTorch zip checkpoint (legacy or corrupt file). Only files "
        "written by torch.save (zip format) or .safetensors files are accepted; re-save "
        "it with torch.save or download it again.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # UnpicklingError, RuntimeError for truncated zips, ...
    raise ConversionError(
        f"could not load {path!r} safely: {type(e).__name__}: {str(e)[:400]}. Checkpoints "
        "are opened with weights_only=True, so files that need arbitrary Python objects "
        "are refused; a truncated download also ends here.") from e
  if not isinstance(obj, dict):
    raise ConversionError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
  return obj


def load_state_dict(path: str, wrappers: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Loads a checkpoint, unwraps the first of `wrappers` present, returns numpy arrays.

  `path` may also be a directory of shards (`*.safetensors` or `pytorch_model*.bin`,
  optionally with an index JSON), as the sharded 8B Infinity weights are.
  """
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    shards = [n for n in names if n.endswith(".safetensors")] or [
        n for n in names if n.endswith((".bin", ".pth", ".pt"))]
    if not shards:
      raise ConversionError(f"directory {path!r} holds no .safetensors/.bin/.pth shards; "
                            f"found {names[:20]}")
    obj = {}
    for n in shards:
      obj.update(load_torch_file(os.path.join(path, n)))
  else:
    obj = load_torch_file(path)
  for w in wrappers:
    if w in obj and isinstance(obj[w], dict):
      obj = obj[w]
      break
  flat = _flatten_nested(obj) if any(isinstance(v, dict) for v in obj.values()) else obj
  out = {}
  for k, v in flat.items():
    try:
      out[k] = _to_numpy(v)
    except Exception as e:
      raise ConversionError(f"entry {k!r} of {path!r} is not a tensor ({type(v).__name__})"
                            ) from e
  return out


# --------------------------------------------------------------------------------------
# Declarative key maps
# --------------------------------------------------------------------------------------


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear_t(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> JAX kernel [in, out]."""
  return np.ascontiguousarray(x.T)


def conv_oihw_to_hwio(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


@dataclasses.dataclass(frozen=True)
class Rule:
  """Fills `path` (tuple of tree keys) from `keys` (one torch key, or several stacked
  along a new leading axis, e.g. one per layer), each of torch shape `shape`."""

  path: tuple[str, ...]
  keys: tuple[str, ...]
  shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray] = identity
  stacked: bool = False


def rule(path: str, key: str, shape: Iterable[int], transform=identity) -> Rule:
  return Rule(tuple(path.split("/")), (key,), tuple(shape), transform, False)


def stacked_rule(path: str, key_template: str, n: int, shape: Iterable[int],
                 transform=identity) -> Rule:
  """One tree leaf with a leading axis of size n from keys `key_template.format(i)`."""
  return Rule(tuple(path.split("/")), tuple(key_template.format(i) for i in range(n)),
              tuple(shape), transform, True)


def _fmt_list(title: str, items: Sequence[str], limit: int = 60) -> str:
  lines = [f"{title} ({len(items)}):"] + [f"  - {s}" for s in items[:limit]]
  if len(items) > limit:
    lines.append(f"  ... and {len(items) - limit} more")
  return "\n".join(lines)


def apply_rules(sd: dict[str, np.ndarray], rules: Sequence[Rule], *, ignore: Sequence[str] = (),
                what: str = "checkpoint", progress: bool = False,
                dtype: Any = np.float32) -> dict[str, Any]:
  """Builds the nested JAX tree; strict: every key used once, every shape as expected.

  Keys matching a regex in `ignore` (buffers the JAX model recomputes) may be present
  or absent. Raises ConversionError listing every problem.
  """
  wanted: dict[str, tuple[int, ...]] = {}
  for r in rules:
    for k in r.keys:
      if k in wanted:
        raise AssertionError(f"key map uses {k!r} twice")
      wanted[k] = r.shape
  ign = [re.compile(p) for p in ignore]
  missing = sorted(k for k in wanted if k not in sd)
  unexpected = sorted(k for k in sd if k not in wanted and not any(p.fullmatch(k) for p in ign))
  bad_shapes = sorted(f"{k}: expected {tuple(wanted[k])}, found {tuple(sd[k].shape)}"
                      for k in wanted if k in sd and tuple(sd[k].shape) != tuple(wanted[k]))
  if missing or unexpected or bad_shapes:
    parts = [f"the {what} does not match the model it was taken for."]
    if missing:
      parts.append(_fmt_list("missing keys", missing))
    if unexpected:
      parts.append(_fmt_list("unexpected keys", unexpected))
    if bad_shapes:
      parts.append(_fmt_list("shape mismatches", bad_shapes))
    parts.append("Check that the file is the official checkpoint for this model (and that "
                 "the VAE matches the transformer); nothing was written.")
    raise ConversionError("\n".join(parts))

  tree: dict[str, Any] = {}
  it = rules
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(rules, desc=f"converting {what}", unit="tensor", file=sys.stderr)
  for r in it:
    arrs = [r.transform(sd[k]) for k in r.keys]
    val = np.stack(arrs) if r.stacked else arrs[0]
    if dtype is not None and np.issubdtype(val.dtype, np.floating):
      val = val.astype(dtype)
    node = tree
    for p in r.path[:-1]:
      node = node.setdefault(p, {})
    if r.path[-1] in node:
      raise AssertionError(f"key map fills {'/'.join(r.path)} twice")
    node[r.path[-1]] = val
  return tree


# --------------------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"


def check_out_dir(out_dir: str, overwrite: bool) -> None:
  """Refuses an --out that exists (unless overwrite) or is a file. Converters call it before
  reading the checkpoint, so a wrong --out fails in a second, not after the conversion;
  `write_converted` calls it again before writing."""
  path = os.path.abspath(out_dir)
  if os.path.exists(path) and not overwrite:
    raise ConversionError(f"output {path!r} already exists; choose another --out or pass "
                          "--overwrite.")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConversionError(f"output {path!r} is a file, not a checkpoint directory; "
                          "--overwrite only replaces a directory. Choose another --out.")


def write_converted(out_dir: str, trees: dict[str, dict[str, Any]], configs: dict[str, dict],
                    meta: dict[str, Any] | None = None, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> None:
  """Writes `out_dir/{name}/` orbax trees plus `out_dir/config.json`, atomically.

  `extra_files` ({name in out_dir: source path}) are copied in as well (e.g. a
  tokenizer). Everything goes to a temporary sibling directory first and is renamed
  into place only when complete, so a failed run leaves nothing that looks like a
  checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  check_out_dir(out_dir, overwrite)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  except OSError as e:
    raise ConversionError(f"cannot write under {parent!r}: {e.strerror}. Choose a writable "
                          "--out.") from e
  try:
    ckptr = ocp.StandardCheckpointer()
    for name, tree in trees.items():
      print(f"writing {name} ({sum(np.size(x) for x in _leaves(tree)) / 1e6:.1f}M values)",
            file=sys.stderr)
      ckptr.save(os.path.join(tmp, name), tree)
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({"configs": configs, "meta": meta or {}}, f, indent=1)
    for name, src in (extra_files or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def main_wrapper(fn: Callable[[], None]) -> None:
  """Runs a conversion CLI body: ConversionError becomes one paragraph and exit code 2."""
  try:
    fn()
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
