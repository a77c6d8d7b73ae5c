"""Prompt tokenization and T5 text features for Infinity.

Infinity (tools/run_infinity.py) tokenizes with the flan-t5-xl tokenizer
(`AutoTokenizer(legacy=True)`, `max_length=512`, `padding='max_length'`, `truncation`),
runs the T5 encoder, takes `last_hidden_state.float()` and keeps the first
`mask.sum()` tokens of each prompt (that count includes `</s>`).

`T5Tokenizer` reproduces the Hugging Face T5 tokenizer's ids from the directory's
`spiece.model`: the special-token strings (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) in a
prompt become their ids, every text piece between them is encoded by sentencepiece (which
prepends the word-boundary mark and collapses whitespace), and `</s>` (id 1) is appended;
`<pad>` is id 0.

Over-long prompts: like the original, a prompt whose tokens (with `</s>`) exceed
`max_len` = 512 is truncated to its first 511 tokens plus `</s>`; we emit a
`PromptTruncatedWarning` saying how many tokens were dropped, rather than refusing.

Usage:
  encoder, tok = load_t5("/ckpt/flan-t5-xl", dtype=jnp.bfloat16)  # from convert.t5
  feats_BLC, lens_B = encode_prompts(encoder, tok, ["a cat", "a dog on a skateboard"])
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_LEN = 512
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
SPIECE_FILE = "spiece.model"
T5_TREE = "t5"
_CONVERT_HINT = ("Convert the Hugging Face model first: `python -m convert.t5 --hf_dir "
                 "flan-t5-xl --out DIR`; DIR then holds config.json, the weights in t5/ and "
                 "spiece.model.")


class T5LoadError(Exception):
  """A T5 directory is missing or incomplete; the message says what it must contain."""


class PromptTruncatedWarning(UserWarning):
  """A prompt was longer than the encoder's maximum length and was cut."""


def _spiece_path(t5_dir: str) -> str:
  if not os.path.isdir(t5_dir):
    raise T5LoadError(f"T5 directory {t5_dir!r} does not exist. It must contain "
                      f"{SPIECE_FILE} (the sentencepiece tokenizer). {_CONVERT_HINT}")
  path = os.path.join(t5_dir, SPIECE_FILE)
  if not os.path.isfile(path):
    raise T5LoadError(f"T5 directory {t5_dir!r} has no {SPIECE_FILE} (the sentencepiece "
                      f"tokenizer model); found {sorted(os.listdir(t5_dir))[:20]}. Copy "
                      f"{SPIECE_FILE} from the Hugging Face flan-t5-xl directory, or "
                      f"convert again. {_CONVERT_HINT}")
  return path


class T5Tokenizer:
  """The Hugging Face T5 tokenizer (legacy=True) for prompts, from a `spiece.model`.

  `encode(prompt) -> list[int]` (untruncated, ends with `</s>`);
  `__call__(prompts, length=None) -> (ids_BL int32, mask_BL int32)`, truncated to
  `max_len` and right-padded with id 0 to `length` (default: `max_len`).
  """

  def __init__(self, spiece_model: str, *, max_len: int = MAX_LEN, extra_ids: int = 100):
    try:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise T5LoadError("tokenizing prompts needs the sentencepiece package: "
                        "pip install sentencepiece") from e
    if not os.path.isfile(spiece_model):
      raise T5LoadError(f"sentencepiece model {spiece_model!r} not found. {_CONVERT_HINT}")
    try:
      self.sp = spm.SentencePieceProcessor(model_file=spiece_model)
    except Exception as e:  # sentencepiece raises OSError / RuntimeError on bad files
      raise T5LoadError(f"{spiece_model!r} is not a valid sentencepiece model ({e}). Copy "
                        f"{SPIECE_FILE} again from the Hugging Face T5 directory.") from e
    if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
      raise T5LoadError(
          f"{spiece_model!r} is not a T5 sentencepiece model: it has pad/eos/unk ids "
          f"{(self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())}, T5 uses (0, 1, 2).")
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    self.max_len = max_len
    n = self.sp.get_piece_size()
    # HF appends the sentinels after the sentencepiece vocabulary in reverse order.
    self.special = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    self.special.update({f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)})
    self._split = re.compile("(" + "|".join(
        re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")")

  @classmethod
  def from_dir(cls, t5_dir: str, **kw) -> "T5Tokenizer":
    """From a converted T5 directory or a Hugging Face T5 directory (`spiece.model`)."""
    return cls(_spiece_path(t5_dir), **kw)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size() + len(self.special) - 3

  def encode(self, prompt: str) -> list[int]:
    if not isinstance(prompt, str):
      raise TypeError(f"prompts must be str, got {type(prompt).__name__}")
    ids: list[int] = []
    for part in self._split.split(prompt):
      if part in self.special:
        ids.append(self.special[part])
      elif part:
        ids.extend(self.sp.encode(part))
    ids.append(EOS_ID)
    return ids

  def __call__(self, prompts: Sequence[str], length: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      prompts = [prompts]
    length = self.max_len if length is None else length
    if not 1 <= length <= self.max_len:
      raise ValueError(f"length must be in [1, {self.max_len}], got {length}")
    return _pad([self.truncate(self.encode(p), i) for i, p in enumerate(prompts)], length)

  def truncate(self, ids: list[int], index: int = 0) -> list[int]:
    """As HF `truncation=True`: keep the first max_len-1 tokens, then `</s>`; warns."""
    if len(ids) <= self.max_len:
      return ids
    warnings.warn(
        f"prompt {index} has {len(ids)} tokens (with </s>), more than the T5 maximum of "
        f"{self.max_len}; its last {len(ids) - self.max_len} tokens were dropped, as the "
        "original Infinity pipeline does.", PromptTruncatedWarning, stacklevel=3)
    return ids[:self.max_len - 1] + [EOS_ID]


def bucket_length(n: int, max_len: int = MAX_LEN) -> int:
  """Padded length for a longest prompt of n tokens: a power of two >= 16, <= max_len."""
  return min(max_len, max(16, 1 << max(0, n - 1).bit_length()))


def _forward(encoder, ids_BL, mask_BL):
  return encoder(ids_BL, mask_BL) * mask_BL[..., None].astype(jnp.float32)


_forward_jit = None


def encode_prompts(encoder, tokenizer: T5Tokenizer, prompts: Sequence[str], *,
                   length: int | None = None) -> tuple[jax.Array, np.ndarray]:
  """T5 features of prompts: (feats_BLC fp32, lens_B int32).

  `lens_B[b]` is prompt b's token count including `</s>` (Infinity's `mask.sum()`);
  `feats_BLC[b, :lens_B[b]]` are its features and the rest is zero. L is `length` or,
  by default, the longest prompt rounded up to a power of two (16..512), so few shapes
  get compiled. The features of real tokens do not depend on L: padded keys are masked
  and T5's position bias depends only on offsets.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError("encode_prompts needs at least one prompt")
  rows = [tokenizer.truncate(tokenizer.encode(p), i) for i, p in enumerate(prompts)]
  lens = np.array([len(r) for r in rows], np.int32)
  if length is None:
    length = bucket_length(int(lens.max()), tokenizer.max_len)
  elif not 1 <= length <= tokenizer.max_len:
    raise ValueError(f"length must be in [1, {tokenizer.max_len}], got {length}")
  return encode_token_rows(encoder, rows, length), lens


def encode_token_rows(encoder, rows: list[list[int]], length: int) -> jax.Array:
  """T5 features [B, length, C] fp32 of already tokenized (and truncated) rows."""
  global _forward_jit
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if _forward_jit is None:
    _forward_jit = nnx.jit(_forward)
  ids, mask = _pad(rows, length)
  return _forward_jit(encoder, jnp.asarray(ids), jnp.asarray(mask))


def _pad(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  if max(map(len, rows)) > length:
    raise ValueError(f"a prompt has {max(map(len, rows))} tokens, more than length={length}")
  ids = np.full((len(rows), length), PAD_ID, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return ids, mask


def read_t5_config(t5_dir: str):
  """The T5Config of a converted T5 directory (checked: config.json, spiece.model)."""
  from sparvar_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sparvar_jax.configs import T5Config  # pylint: disable=g-import-not-at-top

  _spiece_path(t5_dir)
  cfg_path = os.path.join(t5_dir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise T5LoadError(f"T5 directory {t5_dir!r} has no {checkpoint.CONFIG_FILE}: it must "
                      f"be a converted T5 directory with config.json, t5/ and "
                      f"{SPIECE_FILE}. {_CONVERT_HINT}")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise T5LoadError(f"{cfg_path!r} is not readable JSON ({e}). {_CONVERT_HINT}") from e
  if not isinstance(raw, dict) or "t5" not in raw.get("configs", {}):
    raise T5LoadError(f"{cfg_path!r} is not the config of a converted T5 directory (it has "
                      f"no configs.t5 entry; a Hugging Face directory must be converted "
                      f"first). {_CONVERT_HINT}")
  cfgs, _ = checkpoint.read_config(t5_dir)
  cfg = cfgs["t5"]
  if not isinstance(cfg, T5Config):
    raise T5LoadError(f"{cfg_path!r}: configs.t5 is a {type(cfg).__name__}, not a T5Config.")
  return cfg


def load_t5(t5_dir: str, dtype=jnp.float32, *, cfg=None, tokenizer: T5Tokenizer | None = None):
  """Loads a converted T5 directory: returns (T5Encoder with weights in dtype, T5Tokenizer).

  The directory is the output of `python -m convert.t5`: config.json, t5/ and
  spiece.model. cfg / tokenizer: already read from the same directory (not read again).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sparvar_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sparvar_jax.models.t5 import T5Encoder  # pylint: disable=g-import-not-at-top

  cfg = cfg or read_t5_config(t5_dir)
  tree = checkpoint.read_tree(t5_dir, T5_TREE)
  # Build without materialising random weights (1.2B parameters for flan-t5-xl).
  encoder = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  checkpoint.load_into(encoder, tree, what="T5 encoder")
  return encoder, tokenizer or T5Tokenizer(_spiece_path(t5_dir))
