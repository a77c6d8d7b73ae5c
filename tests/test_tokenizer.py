"""Prompt tokenization: our T5Tokenizer gives Hugging Face's T5 tokenizer ids exactly.

The sentencepiece model is trained here, offline, from a few sentences (T5's special ids:
pad 0, eos 1, unk 2, no bos), and HF's tokenizer is built from the same file.
"""

import os
import warnings

import numpy as np
import pytest

from sparvar_jax import text

_SENTENCES = [
    "A photo of a cat sitting on a red sofa.",
    "An astronaut riding a horse on the moon, digital art!",
    "Ünïcödé façade café naïve résumé — 東京 タワー 🚀",
    "The quick brown fox jumps over the lazy dog 12345.",
    "a watercolor painting of mountains at sunrise, highly detailed",
    "Hello, world: tabs\tand newlines\nhere. ＡＢＣ ½ ﬁ",
]

PROMPTS = [
    "a cat",
    "A photo of a cat sitting on a red sofa.",
    "  leading, trailing and   repeated   spaces  ",
    "tab\tand\nnewline\r\nand\u00a0nbsp",
    "東京 タワー 🚀 ÿ 👍🏽 ok",
    "",
    " ",
    "café vs cafe\u0301 (combining accent)",
    "full\u3000width ＡＢＣ ﬁ ½",
    "zero\u200bwidth joiner",
    "x </s> y",
    "z<extra_id_0>w <extra_id_99>",
    "a <pad> b <unk>c",
    "UPPER lower MiXeD 0123456789 !?.,;:'\"()[]{}",
]


def train_tiny_spiece(out_dir: str) -> str:
  """Trains a tiny T5-style sentencepiece model into out_dir/spiece.model; returns path."""
  import sentencepiece as spm
  prefix = os.path.join(out_dir, "spiece")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_SENTENCES * 20), model_prefix=prefix, vocab_size=80,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
      character_coverage=1.0, minloglevel=2)
  return prefix + ".model"


def hf_tokenizer(tok_dir: str):
  """HF's T5 tokenizer (legacy=True, as Infinity loads it) from tok_dir/spiece.model.

  transformers 5 builds its tokenizers-backed T5Tokenizer from spiece.model in
  from_pretrained (the constructor's vocab_file alone does not convert it).
  """
  transformers = pytest.importorskip("transformers")
  return transformers.T5Tokenizer.from_pretrained(tok_dir, legacy=True)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("spiece"))
  train_tiny_spiece(d)
  return d


def test_ids_equal_hf(tok_dir):
  ours = text.T5Tokenizer.from_dir(tok_dir)
  hf = hf_tokenizer(tok_dir)
  for p in PROMPTS:
    assert ours.encode(p) == hf(p)["input_ids"], p
  # The prompts must exercise unknown pieces, sentinels and the special-token split.
  all_ids = sum((ours.encode(p) for p in PROMPTS), [])
  assert text.UNK_ID in all_ids and ours.special["<extra_id_0>"] in all_ids
  assert ours.special["<extra_id_0>"] == hf.convert_tokens_to_ids("<extra_id_0>")
  assert ours.vocab_size == len(hf)


def test_batch_padding_equals_hf(tok_dir):
  ours = text.T5Tokenizer.from_dir(tok_dir)
  hf = hf_tokenizer(tok_dir)
  ids, mask = ours(PROMPTS)
  ref = hf(PROMPTS, max_length=512, padding="max_length", truncation=True, return_tensors="np")
  assert ids.shape == (len(PROMPTS), 512) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_truncation_warns_and_matches_hf(tok_dir):
  ours = text.T5Tokenizer.from_dir(tok_dir)
  hf = hf_tokenizer(tok_dir)
  long = "a cat on a red sofa " * 120
  n_full = len(ours.encode(long))
  assert n_full > 512
  with pytest.warns(text.PromptTruncatedWarning, match=f"last {n_full - 512} tokens were dropped"):
    ids, mask = ours(["a cat", long])
  ref = hf(["a cat", long], max_length=512, padding="max_length", truncation=True,
           return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  assert ids[1, -1] == text.EOS_ID and mask[1].sum() == 512
  # A prompt of exactly 512 tokens is kept whole, silently.
  exact = ours.encode(long)[:511]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert ours.truncate(exact + [text.EOS_ID]) == exact + [text.EOS_ID]


def test_shorter_padding(tok_dir):
  ours = text.T5Tokenizer.from_dir(tok_dir)
  ids, mask = ours(["a cat", "a red sofa"], length=16)
  assert ids.shape == (2, 16)
  assert list(mask.sum(1)) == [len(ours.encode("a cat")), len(ours.encode("a red sofa"))]
  with pytest.raises(ValueError, match="more than length"):
    ours(["a cat " * 10], length=4)
  assert text.bucket_length(1) == 16 and text.bucket_length(17) == 32
  assert text.bucket_length(64) == 64 and text.bucket_length(600) == 512


def test_errors(tmp_path, tok_dir):
  with pytest.raises(text.T5LoadError, match="does not exist.*spiece.model"):
    text.T5Tokenizer.from_dir(str(tmp_path / "nope"))
  with pytest.raises(text.T5LoadError, match="has no spiece.model"):
    text.T5Tokenizer.from_dir(str(tmp_path))
  bad = tmp_path / "spiece.model"
  bad.write_bytes(b"not a sentencepiece model")
  with pytest.raises(text.T5LoadError, match="not a valid sentencepiece model"):
    text.T5Tokenizer.from_dir(str(tmp_path))
  # A sentencepiece model with other special ids is not T5's.
  import sentencepiece as spm
  other = str(tmp_path / "other")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_SENTENCES * 20), model_prefix=other,
                                 vocab_size=60, minloglevel=2)
  with pytest.raises(text.T5LoadError, match="not a T5 sentencepiece model"):
    text.T5Tokenizer(other + ".model")
  with pytest.raises(TypeError, match="must be str"):
    text.T5Tokenizer.from_dir(tok_dir).encode(None)
