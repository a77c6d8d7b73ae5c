"""The manifest of a `generate_many` output folder: a JSON line per image, appended as the
image is written, and the merge of the per-process shards into one file.

Layout of the folder: `{i:06d}.png` per item; `manifest.jsonl` (one process, or the merge
of several); `manifest.p{p}-of-{N}.jsonl` (process p of N, until merged); `summary.json`;
`fid_samples.npz` (VAR). A record's `settings` hold every value its image depends on and
`t` the time it was written: per item, the latest record says what the PNG holds now.

Crash safety: a PNG is renamed into place before its line is appended, and a line is one
write, so a kill leaves at most a cut last line (skipped by the readers) and never a line
without its image; temporaries of a killed write are removed by the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from sparvar_jax import outputs

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
FID_NPZ = "fid_samples.npz"
_SHARD_RE = re.compile(r"manifest\.p(\d+)-of-(\d+)\.jsonl")
_LOCK_PREFIX = ".sparvar-lock-"


def shard_name(process: int, num: int) -> str:
  """The file process `process` of `num` appends to (one process: manifest.jsonl)."""
  return MANIFEST if num == 1 else f"manifest.p{process}-of-{num}.jsonl"


def manifest_files(out: str) -> list[str]:
  names = sorted(n for n in os.listdir(out) if _SHARD_RE.fullmatch(n))
  return ([MANIFEST] if os.path.exists(os.path.join(out, MANIFEST)) else []) + names


def read_records(out: str) -> list[tuple[str, dict]]:
  """(file, record) of every complete manifest line in `out` (a line cut short by a kill
  does not parse and is dropped)."""
  recs = []
  for name in manifest_files(out):
    try:
      with open(os.path.join(out, name), encoding="utf-8") as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue
          if isinstance(rec, dict) and isinstance(rec.get("item"), int):
            recs.append((name, rec))
    except FileNotFoundError:  # a shard merged away meanwhile
      continue
  return recs


def latest_records(recs: Iterable[tuple[str, dict]]) -> dict[int, dict]:
  """Per item, the record written last: it describes what its PNG holds now."""
  out: dict[int, dict] = {}
  for _, rec in recs:
    i = rec["item"]
    if i not in out or rec.get("t", 0) >= out[i].get("t", 0):
      out[i] = rec
  return out


def short(v, n: int = 40) -> str:
  s = json.dumps(v, ensure_ascii=False)
  return s if len(s) <= n else s[:n - 3] + "..."


def ranges(idx: Iterable[int], most: int = 6) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (the first `most` runs, then a count)."""
  idx = sorted(idx)
  runs, start = [], 0
  for k in range(1, len(idx) + 1):
    if k == len(idx) or idx[k] != idx[k - 1] + 1:
      a, b = idx[start], idx[k - 1]
      runs.append(str(a) if a == b else f"{a}-{b}")
      start = k
  return ", ".join(runs[:most]) + (f" and {len(runs) - most} more" if len(runs) > most else "")


def describe_changes(changed: Iterable[tuple[int, dict, dict]]) -> str:
  """'cfg 1.5 -> 2.0 (items 0-39); ...' from (item, settings now, settings recorded)."""
  diffs: dict[tuple, list[int]] = {}
  for index, new, old in changed:
    for k in sorted(set(old) | set(new)):
      if old.get(k) != new.get(k):
        diffs.setdefault((k, short(old.get(k)), short(new.get(k))), []).append(index)
  parts = [f"{k} {a} -> {b} (item{'s' if len(v) > 1 else ''} {ranges(v)})"
           for (k, a, b), v in sorted(diffs.items(), key=lambda kv: -len(kv[1]))]
  return "; ".join(parts[:8]) + (f"; and {len(parts) - 8} more" if len(parts) > 8 else "")


class ManifestWriter:
  """One process's manifest file, appended a line per image. An exclusive lock refuses a
  second run of the same slice writing into it at the same time."""

  def __init__(self, out: str, name: str, keep: list[dict] | None = None):
    self.path = os.path.join(out, name)
    self._lock = open(os.path.join(out, _LOCK_PREFIX + name), "w")
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._lock.close()
      raise outputs.OutputError(f"another process is writing {self.path!r} (the same --out, "
                                "--process_id and --num_processes); wait for it to finish or "
                                "stop it.") from None
    if keep is not None:  # drops cut lines and superseded records before appending
      outputs.save_jsonl(self.path, keep)
    self._f = open(self.path, "a", encoding="utf-8")

  def append(self, rec: dict[str, Any]) -> None:
    # One write of a whole line: a kill leaves at most one cut line, which readers skip.
    self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()
    try:
      os.remove(self._lock.name)
    except OSError:
      pass
    self._lock.close()


def remove_temps(out: str, own: set[str] | None) -> None:
  """Temporaries left by a killed write: all of them (own None), or only those of the
  files in `own` (other processes may be writing theirs right now)."""
  if own is None:
    outputs.remove_stale_temps(out)
    return
  for name in os.listdir(out):
    if name.startswith(outputs.TMP_PREFIX):
      target = name[len(outputs.TMP_PREFIX):].rsplit(".", 1)[0]
      if target in own:
        try:
          os.remove(os.path.join(out, name))
        except OSError:
          pass


def merge(out: str, expected: list[tuple[int, dict]], is_done: Callable[[int, dict], bool]
          ) -> tuple[list[dict], list[int]]:
  """Writes manifest.jsonl: for each (item, settings) of `expected`, in item order, its
  latest record if that has these settings and is_done(item, record) (its PNG decodes);
  removes the shard files once every item is there. -> (records, missing items)."""
  latest = latest_records(read_records(out))
  chosen, missing = [], []
  for index, settings in sorted(expected, key=lambda e: e[0]):
    rec = latest.get(index)
    if rec is not None and rec.get("settings") == settings and is_done(index, rec):
      chosen.append(rec)
    else:
      missing.append(index)
  outputs.save_jsonl(os.path.join(out, MANIFEST), chosen)
  if not missing:
    for name in manifest_files(out):
      if name != MANIFEST:
        try:
          os.remove(os.path.join(out, name))
        except FileNotFoundError:
          pass
  return chosen, missing


def write_fid_npz(out: str, files: list[str], image_hw: tuple[int, int]) -> str:
  """fid_samples.npz from the PNGs in order: `arr_0` uint8 [N, H, W, 3], the array the
  official evaluator (guided-diffusion's evaluator.py, which VAR's README uses) reads."""
  h, w = image_hw

  def rows():
    for name in files:
      img = outputs.read_png(os.path.join(out, name))
      if img is None or img.shape != (h, w, 3):
        raise ValueError(f"{name} does not decode to a {h}x{w} RGB image")
      yield img
  outputs.save_npz_rows(os.path.join(out, FID_NPZ), "arr_0", (len(files), h, w, 3), "uint8",
                        rows())
  return FID_NPZ
