"""Shared machinery for checkpoint conversion: safe loading, strict key maps, atomic output.

A conversion is declarative: a list of `Rule`s, each naming the JAX tree path it fills,
the PyTorch key(s) it reads, the PyTorch shape it expects and a transform (transpose,
stack over layers, ...). `apply_rules` checks the whole state dict against the rules
before anything is written and reports every missing key, every unexpected key and
every shape mismatch at once.

This package maps and validates tensors only; it imports no model code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
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
# config.json's "format" and "entries" (every name the conversion put in the directory) let
# --overwrite tell a converted checkpoint from any other folder.
FORMAT = "sparvar-jax converted checkpoint"
# Files beside the trees in checkpoints written before config.json listed its entries
# (convert.t5's tokenizer files).
_LEGACY_EXTRA_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json",
                       "tokenizer.json")
# Written into a temporary output directory first ("<host> <pid>" of the writer), so a
# later run can tell a directory left by a killed conversion from one still being written.
_TMP_MARKER = ".sparvar-convert-tmp"


def _within(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies under it (both real paths)."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _not_a_checkpoint(path: str) -> str | None:
  """Why the directory `path` is not one that `write_converted` wrote; None if it is."""
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      raw = json.load(f)
  except FileNotFoundError:
    return f"it has no {CONFIG_FILE}"
  except (OSError, ValueError) as e:
    return f"its {CONFIG_FILE} is unreadable ({e})"
  configs = raw.get("configs") if isinstance(raw, dict) else None
  if (not isinstance(configs, dict) or not isinstance(raw.get("meta"), dict)
      or raw.get("format", FORMAT) != FORMAT
      or not all(isinstance(c, dict) and "type" in c for c in configs.values())):
    return f"its {CONFIG_FILE} is not the one a converter writes"
  entries = raw.get("entries")
  if isinstance(entries, list):
    allowed = {CONFIG_FILE, *map(str, entries)}
  else:
    allowed = {CONFIG_FILE, *configs, *_LEGACY_EXTRA_FILES}
  try:
    others = sorted(set(os.listdir(path)) - allowed)
  except OSError as e:
    return f"its contents cannot be listed ({e.strerror})"
  if others:
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    return f"it also holds {', '.join(others[:5])}{more}, which no conversion writes"
  return None


def _new_tmp_dir(parent: str, base: str) -> str:
  """An empty `<base>.tmp-<pid>-<random>` directory in `parent` (the pid names its writer)."""
  return tempfile.mkdtemp(prefix=f"{base}.tmp-{os.getpid()}-", dir=parent)


def check_out_dir(out_dir: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
  """Refuses an --out that must not or cannot be written. Converters call it before reading
  any checkpoint, so a wrong --out fails in a second, not after the conversion;
  `write_converted` calls it again before writing.

  An existing --out is replaced only with `overwrite`, and only when it is a checkpoint
  directory a converter wrote that holds none of `inputs` (the conversion's input files
  or folders): replacing deletes it, so a user's folder or the inputs are never touched.
  """
  path = os.path.abspath(out_dir)
  if os.path.lexists(path):
    if not overwrite:
      raise ConversionError(f"output {path!r} already exists; choose another --out or pass "
                            "--overwrite (which replaces only a checkpoint directory written "
                            "by a converter).")
    if os.path.islink(path):
      raise ConversionError(f"output {path!r} is a symbolic link; --overwrite replaces only a "
                            "checkpoint directory, not a link. Choose another --out.")
    if not os.path.isdir(path):
      raise ConversionError(f"output {path!r} is a file, not a checkpoint directory; "
                            "--overwrite only replaces a directory. Choose another --out.")
    real = os.path.realpath(path)
    held = [p for p in inputs if p and _within(os.path.realpath(p), real)]
    if held:
      raise ConversionError(f"--overwrite would delete {path!r}, which holds this "
                            f"conversion's input {held[0]!r}. Nothing was changed; choose "
                            "another --out.")
    why = _not_a_checkpoint(path)
    if why:
      raise ConversionError(f"--overwrite replaces only a checkpoint directory written by a "
                            f"converter, and {path!r} is not one: {why}. Nothing was "
                            "changed; choose another --out (or delete that folder yourself "
                            "if nothing in it is needed).")
  # The nearest existing ancestor must take a new directory: probed now, not after the
  # conversion has run for minutes.
  parent = os.path.dirname(path)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConversionError(f"cannot write {path!r}: {parent!r} is a file, not a directory. "
                          "Choose a writable --out.")
  try:
    os.rmdir(_new_tmp_dir(parent, os.path.basename(path)))
  except OSError as e:
    raise ConversionError(f"cannot write under {parent!r}: {e.strerror}. Choose a writable "
                          "--out.") from e


# --------------------------------------------------------------------------------------
# Interrupts: SIGINT / SIGTERM end a conversion cleanly
# --------------------------------------------------------------------------------------


class Interrupted(BaseException):
  """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt: the `except
  Exception` around file reading must not turn it into a ConversionError)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held = {"depth": 0, "pending": None}
_written: list[str] = []  # the directory write_converted put in place, for the exit message


def _on_signal(signum, frame):
  del frame
  if _held["depth"]:
    _held["pending"] = _held["pending"] or signum
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def _handling_signals():
  """SIGINT and SIGTERM raise `Interrupted` (only the main thread can take signals)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def _signals_held():
  """Delays `Interrupted` to the end of the block: around the steps that must not stop
  half-way (starting an orbax save, waiting for its writer threads, removing files)."""
  _held["depth"] += 1
  try:
    yield
  finally:
    _held["depth"] -= 1
    if not _held["depth"] and _held["pending"]:
      signum, _held["pending"] = _held["pending"], None
      raise Interrupted(signum)  # pylint: disable=lost-exception


def _tmp_owner(path: str, name_pid: int) -> tuple[str, int] | None:
  """(host, pid) of the conversion that made the temporary directory `path`, or None when
  that cannot be told (then the directory is left alone)."""
  try:
    with open(os.path.join(path, _TMP_MARKER)) as f:
      host, pid = f.read().split()
    return host, int(pid)
  except FileNotFoundError:
    pass
  except (OSError, ValueError):
    return None
  # No marker: killed between creating the directory and writing the marker, or after the
  # marker was removed before the final rename (then it is a finished checkpoint), or an
  # old checkpoint moved aside by --overwrite.
  try:
    if not os.listdir(path) or _not_a_checkpoint(path) is None:
      return socket.gethostname(), name_pid
  except OSError:
    pass
  return None


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists, owned by someone else
    return True
  return True


def stale_tmp_dirs(parent: str, base: str) -> list[str]:
  """Temporary directories `<base>.tmp-<pid>-<random>` in `parent` that a conversion on
  this host left when it was killed (its process is gone). Nothing else matches: not a
  folder of another name, not one of a conversion still running."""
  pattern = re.compile(re.escape(base) + r"\.tmp-(\d+)-[a-z0-9_]{8}")
  try:
    names = sorted(os.listdir(parent))
  except OSError:
    return []
  host = socket.gethostname()
  stale = []
  for name in names:
    m = pattern.fullmatch(name)
    path = os.path.join(parent, name)
    if not m or os.path.islink(path) or not os.path.isdir(path):
      continue
    owner = _tmp_owner(path, int(m.group(1)))
    if owner and owner[0] == host and not _alive(owner[1]):
      stale.append(path)
  return stale


def _umask() -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
  os.umask(mask)
  return mask


def write_converted(out_dir: str, trees: dict[str, dict[str, Any]], configs: dict[str, dict],
                    meta: dict[str, Any] | None = None, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None,
                    inputs: Sequence[str] = ()) -> None:
  """Writes `out_dir/{name}/` orbax trees plus `out_dir/config.json`, atomically.

  `extra_files` ({name in out_dir: source path}) are copied in as well (e.g. a tokenizer);
  `inputs` are the conversion's input paths, which --overwrite must never delete (see
  `check_out_dir`). Everything goes to a temporary sibling `<out>.tmp-<pid>-<random>`
  first and is renamed into place only when complete, so a failed or interrupted run
  (SIGINT/SIGTERM: the orbax writer threads are waited for, then the directory removed)
  leaves nothing that looks like a checkpoint. A run killed outright leaves its temporary
  directory; the next conversion to the same --out removes it. The result gets the
  modes the umask gives, not the temporary directory's 0700.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  check_out_dir(out_dir, overwrite, inputs)
  out_dir = os.path.abspath(out_dir)
  parent, base = os.path.split(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise ConversionError(f"cannot write under {parent!r}: {e.strerror}. Choose a writable "
                          "--out.") from e
  for path in stale_tmp_dirs(parent, base):
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {path} (left by an interrupted conversion)", file=sys.stderr)
  entries = sorted({CONFIG_FILE, *trees, *(extra_files or {})})
  tmp = None
  with _handling_signals():
    try:
      with _signals_held():
        tmp = _new_tmp_dir(parent, base)
        os.chmod(tmp, 0o777 & ~_umask())
        with open(os.path.join(tmp, _TMP_MARKER), "w") as f:
          f.write(f"{socket.gethostname()} {os.getpid()}\n")
      ckptr = ocp.StandardCheckpointer()
      try:
        for name, tree in trees.items():
          ckptr.wait_until_finished()  # the previous tree; an interrupt may stop the wait
          print(f"writing {name} ({sum(np.size(x) for x in _leaves(tree)) / 1e6:.1f}M "
                "values)", file=sys.stderr)
          with _signals_held():
            ckptr.save(os.path.join(tmp, name), tree)
        ckptr.wait_until_finished()
      finally:
        with _signals_held():  # no writer thread is left to write into tmp after this
          ckptr.close()
      with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "entries": entries, "configs": configs,
                   "meta": meta or {}}, f, indent=1)
      for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(tmp, name))
      with _signals_held():
        os.remove(os.path.join(tmp, _TMP_MARKER))
        old = None
        if os.path.lexists(out_dir):  # checked by check_out_dir: ours, holding no input
          old = _new_tmp_dir(parent, base)  # moved aside, so a failed rename can restore it
          os.replace(out_dir, old)
        try:
          os.replace(tmp, out_dir)
        except OSError:
          if old:
            os.replace(old, out_dir)
          raise
        _written.append(out_dir)
        if old:
          shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
      if tmp:
        with _signals_held():
          shutil.rmtree(tmp, ignore_errors=True)
      if isinstance(e, (OSError, ValueError)):  # e.g. a full disk, as orbax reports it
        raise ConversionError(f"writing {out_dir!r} failed: {type(e).__name__}: "
                              f"{str(e)[:300]}. Nothing was written; check the free space "
                              f"and permissions under {parent!r}.") from e
      raise


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _cli_defaults() -> None:
  """A converter CLI runs on the CPU (unless JAX_PLATFORMS says otherwise: it never needs
  an accelerator, and probing for one prints "Unable to initialize backend" lines) and
  logs warnings only (orbax logs ~50 INFO lines per conversion) unless --verbosity is
  given."""
  if "JAX_PLATFORMS" not in os.environ:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the environment then
      sys.modules["jax"].config.update("jax_platforms", "cpu")
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.is_parsed() and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def main_wrapper(fn: Callable[[], None]) -> None:
  """Runs a conversion CLI body: ConversionError becomes one paragraph and exit code 2;
  SIGINT / SIGTERM one line and exit code 130 / 143, with no temporary files left."""
  _cli_defaults()
  del _written[:]
  try:
    with _handling_signals():
      fn()
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Interrupted as e:
    name = signal.Signals(e.signum).name
    if _written:
      print(f"interrupted by {name} after {_written[-1]} was written (it is complete).",
            file=sys.stderr)
    else:
      print(f"interrupted by {name}: the conversion stopped; nothing was written and no "
            "temporary files are left.", file=sys.stderr)
    sys.exit(128 + e.signum)
