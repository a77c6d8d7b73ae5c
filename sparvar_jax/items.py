"""What `python -m sparvar_jax.generate_many` generates: items from a text or JSONL file, or
VAR class ranges.

Item i is the i-th non-blank line of the file (a bad line keeps its number, so fixing it
later leaves every other item's number, file name and key as they were) or the i-th image
of the class list. A line that cannot be an item is returned as a bad line with its
number and the reason; the caller skips it and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from sparvar_jax.runner import UsageError


class ItemError(Exception):
  """One item cannot be made; it is reported with its line and skipped."""


@dataclasses.dataclass(frozen=True)
class Item:
  index: int
  line: int | None  # 1-based line of the input file; None for class lists
  fields: dict[str, Any]


def read_lines(path: str) -> list[tuple[int, str]]:
  """(line number, stripped text) of the non-blank lines of a UTF-8 file."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise UsageError(f"--input {path!r} does not exist; give a UTF-8 text or JSONL file."
                     ) from None
  except OSError as e:
    raise UsageError(f"cannot read --input {path!r}: {e.strerror or e}.") from None
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UsageError(f"--input {path!r} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} "
                     f"at offset {e.start}); save it as UTF-8.") from None
  lines = [(n + 1, t.strip()) for n, t in enumerate(text.splitlines())]
  return [(n, t) for n, t in lines if t]


def parse_classes(text: str, num_classes: int) -> list[int]:
  """'0-999' or '1,5,10-19' -> class ids, in the order given."""
  out = []
  for part in text.replace(" ", "").split(","):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m:
      raise UsageError(f"--classes must be class ids and ranges such as 0-999 or 1,5,10-19; "
                       f"cannot read {part!r}")
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if a > b:
      raise UsageError(f"--classes range {part!r} runs backwards; write {b}-{a}")
    out.extend(range(a, b + 1))
  bad = [c for c in out if c >= num_classes]
  if bad:
    raise UsageError(f"--classes: class ids must be in [0, {num_classes}) (the model's "
                     f"classes), got {bad[:5]}")
  return out


def class_items(classes: str, per_class: int, num_classes: int) -> list[Item]:
  """per_class items of each class, class by class."""
  if per_class < 1:
    raise UsageError(f"--per_class must be >= 1, got {per_class}")
  labels = parse_classes(classes, num_classes)
  return [Item(i, None, {"label": c})
          for i, c in enumerate(c for c in labels for _ in range(per_class))]


def file_items(path: str, fmt: str, kind: str) -> tuple[list[Item], list[dict[str, Any]]]:
  """(items, bad lines [{line, item, error}]) of a text file (Infinity: a prompt a line;
  VAR: a class id a line) or a JSONL file (fmt 'jsonl'; 'auto' picks it for *.jsonl)."""
  if fmt == "auto":
    fmt = "jsonl" if path.lower().endswith(".jsonl") else "text"
  items, bad = [], []
  for n, (line, text) in enumerate(read_lines(path)):
    try:
      if fmt == "jsonl":
        try:
          fields = json.loads(text)
        except json.JSONDecodeError as e:
          raise ItemError(f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(fields, dict):
          raise ItemError(f"expected a JSON object, got {type(fields).__name__}")
      elif kind == "var":
        try:
          fields = {"label": int(text)}
        except ValueError:
          raise ItemError(f"not a class id: {text[:40]!r}") from None
      else:
        fields = {"prompt": text}
      items.append(Item(n, line, fields))
    except ItemError as e:
      bad.append({"line": line, "item": n, "error": str(e)})
  if not items and not bad:
    raise UsageError(f"--input {path!r} holds no items (it is empty or only blank lines).")
  return items, bad


def number_list(name: str, v) -> str | None:
  """A JSON cfg / tau (a number, a list of numbers or the flag's text) as the flag's
  comma-separated text."""
  if v is None:
    return None
  if isinstance(v, str):
    return v
  vals = v if isinstance(v, list) else [v]
  if not vals or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
    raise ItemError(f"{name} must be a number or a list of numbers, got {json.dumps(v)}")
  return ",".join(repr(float(x)) for x in vals)
