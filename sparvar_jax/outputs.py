"""Writing what people look at (PNG images and grids) and what machines read (JSON, NPZ).

Every file is written to a temporary name in the destination folder and renamed into
place, so an interrupted run never leaves a half-written output that looks complete; the
file gets the mode the user's umask gives (not the private mode of a temporary file). A run
killed outright (SIGKILL) can leave only such temporary files (`.sparvar-tmp-*`), which the
next run into that folder removes. `OutputRun` is one run's folder: it refuses a folder that
already holds files unless told to overwrite, and lists exactly the files the run wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np


class OutputError(Exception):
  """The output location cannot be written."""


TMP_PREFIX = ".sparvar-tmp-"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def remove_stale_temps(path: str) -> list[str]:
  """Deletes temporary files a killed run left in `path`; returns their names."""
  gone = []
  for name in os.listdir(path):
    if name.startswith(TMP_PREFIX):
      try:
        os.remove(os.path.join(path, name))
        gone.append(name)
      except OSError:
        pass
  return gone


def prepare_dir(path: str) -> str:
  """Creates `path` if needed and proves it is writable before any work starts."""
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "write-test-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise OutputError(f"cannot write to output folder {path!r}: {e.strerror or e}. Choose a "
                      "writable --out.") from e
  return path


def _atomic_write(path: str, write_fn) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=d)
  os.close(fd)
  try:
    write_fn(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def to_uint8(img_HW3: np.ndarray) -> np.ndarray:
  """[0, 1] float -> uint8 by truncation, as the official scripts do (x * 255 -> uint8)."""
  return (np.clip(np.asarray(img_HW3, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(imgs_BHW3: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles a batch of [0, 1] float or uint8 images into one uint8 grid, `pad` white pixels
  between."""
  imgs = np.asarray(imgs_BHW3)
  B, H, W, _ = imgs.shape
  ncol = ncol or min(B, 8)
  nrow = -(-B // ncol)
  grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
  for i in range(B):
    r, c = divmod(i, ncol)
    y, x = pad + r * (H + pad), pad + c * (W + pad)
    grid[y:y + H, x:x + W] = imgs[i] if imgs.dtype == np.uint8 else to_uint8(imgs[i])
  return grid


def downscale(img_HW3: np.ndarray, max_side: int) -> np.ndarray:
  """Integer-factor box downscale (uint8 in, uint8 out) so the long side is <= max_side."""
  f = -(-max(img_HW3.shape[:2]) // max_side)
  if f <= 1:
    return img_HW3
  H, W = (img_HW3.shape[0] // f) * f, (img_HW3.shape[1] // f) * f
  x = img_HW3[:H, :W].reshape(H // f, f, W // f, f, 3).astype(np.float32)
  return np.round(x.mean(axis=(1, 3))).astype(np.uint8)


class GridCollector:
  """Keeps what grid.png needs while images stream to disk: the first `max_images` as uint8,
  downscaled to `thumb_side` once the grid holds more than `full_res_upto` images (a run of
  thousands of prompts keeps megabytes, not one float image per prompt)."""

  def __init__(self, max_images: int = 64, full_res_upto: int = 16, thumb_side: int = 256):
    self.max_images, self.full_res_upto, self.thumb_side = max_images, full_res_upto, thumb_side
    self.images: list[np.ndarray] = []
    self.seen = 0

  def add(self, img_HW3: np.ndarray) -> None:
    self.seen += 1
    if len(self.images) < self.max_images:
      self.images.append(img_HW3 if img_HW3.dtype == np.uint8 else to_uint8(img_HW3))

  def grid(self) -> np.ndarray:
    imgs = self.images
    if len(imgs) > self.full_res_upto:
      imgs = [downscale(im, self.thumb_side) for im in imgs]
    return make_grid(np.stack(imgs))


def save_png(path: str, img: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = img if img.dtype == np.uint8 else to_uint8(img)
  _atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_json(path: str, obj: dict[str, Any]) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, default=_json_default)
      f.write("\n")
  _atomic_write(path, write)


def save_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
  """One JSON object a line."""
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
  _atomic_write(path, write)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  _atomic_write(path, write)


def save_npz_rows(path: str, key: str, shape: tuple[int, ...], dtype,
                  rows: Iterable[np.ndarray]) -> None:
  """An `np.savez` file holding one array `key` of `shape`, written from `rows` (arrays of
  shape[1:]) one at a time: 50,000 256x256 images are 9.8 GB, more than a host should
  hold at once. ValueError if the rows do not fill exactly `shape` (nothing is left)."""
  dtype = np.dtype(dtype)
  header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": tuple(int(d) for d in shape)}

  def write(tmp):
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      with zf.open(key + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        n = 0
        for row in rows:
          row = np.ascontiguousarray(row, dtype)
          if row.shape != header["shape"][1:] or n >= header["shape"][0]:
            raise ValueError(f"row {n} has shape {row.shape}; expected {shape[0]} rows of "
                             f"{header['shape'][1:]}")
          f.write(row.tobytes())
          n += 1
        if n != header["shape"][0]:
          raise ValueError(f"got {n} rows for an array of {shape[0]}")
  _atomic_write(path, write)


def read_png(path: str) -> np.ndarray | None:
  """The RGB uint8 image [H, W, 3] of a PNG file, or None if it is missing or does not
  decode to the end (a damaged file)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      if im.format != "PNG" or im.mode != "RGB":
        return None
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError, SyntaxError):
    return None


class OutputRun:
  """One run's output folder.

  A folder that holds files (other than temporaries of a killed run, which are removed) is
  refused unless `overwrite`: then this run's files replace same-named ones and everything
  else is left alone. Writability is proven before any work. `files` lists, in order,
  exactly the files this run wrote."""

  def __init__(self, path: str, overwrite: bool = False, flag: str = "--out"):
    self.created = not os.path.exists(path)
    self.path = prepare_dir(path)
    remove_stale_temps(self.path)
    present = sorted(f for f in os.listdir(self.path) if not f.startswith(TMP_PREFIX))
    if present and not overwrite:
      shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5
                                        else "")
      raise OutputError(f"output folder {self.path!r} is not empty ({shown}); choose an empty "
                        f"or new {flag}, or pass --overwrite to replace this run's files there "
                        "(other files are left alone).")
    self.files: list[str] = []

  def discard_if_empty(self) -> None:
    """Removes the folder when this run created it and wrote nothing (a failed run)."""
    if self.created and not self.files:
      try:
        os.rmdir(self.path)
      except OSError:
        pass

  def _record(self, name: str) -> str:
    if os.sep in name or name.startswith("."):
      raise ValueError(f"output names are plain file names, got {name!r}")
    if name not in self.files:
      self.files.append(name)
    return os.path.join(self.path, name)

  def png(self, name: str, img: np.ndarray) -> None:
    save_png(os.path.join(self.path, name), img)
    self._record(name)

  def json(self, name: str, obj: dict[str, Any]) -> None:
    save_json(os.path.join(self.path, name), obj)
    self._record(name)

  def npz(self, name: str, **arrays: np.ndarray) -> None:
    save_npz(os.path.join(self.path, name), **arrays)
    self._record(name)


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")
