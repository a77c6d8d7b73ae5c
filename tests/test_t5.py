"""T5 encoder parity against transformers' PyTorch T5EncoderModel, conversion, loading."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import t5 as convert_t5
from convert.common import ConversionError
from sparvar_jax import text
from sparvar_jax.configs import T5Config
from sparvar_jax.models.t5 import T5Encoder, relative_position_buckets
from tests.test_tokenizer import hf_tokenizer, train_tiny_spiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny T5 v1.1: 8 buckets up to distance 20 so that L=40 reaches the log-spaced and the
# clipped buckets. vocab 180 = the tiny sentencepiece's 80 pieces + 100 sentinels.
TINY = dict(vocab_size=180, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _hf_config(**kw):
  return transformers.T5Config(**{**TINY, **kw}, feed_forward_proj="gated-gelu",
                               dropout_rate=0.0, layer_norm_epsilon=1e-6)


def _randomize_norms(model, seed):
  """HF initialises norm weights to 1; make them random so the test sees them."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
  return model


@pytest.fixture(scope="module")
def hf_encoder():
  torch.manual_seed(0)
  return _randomize_norms(transformers.T5EncoderModel(_hf_config()).eval(), 0)


def _hf_forward(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(np.asarray(ids, np.int64)),
                 attention_mask=torch.as_tensor(np.asarray(mask, np.int64))
                 ).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("spiece"))
  train_tiny_spiece(d)
  return d


def _save_hf(model, d, tok_dir, fmt):
  """Writes model as a HF directory: 'safetensors' (save_pretrained), 'sharded'
  (save_pretrained, small shards + index) or 'bin' (torch.save, what older
  transformers' save_pretrained wrote); plus the tokenizer files."""
  os.makedirs(d, exist_ok=True)
  if fmt == "bin":
    model.config.to_json_file(os.path.join(d, "config.json"))
    # As hub T5 .bin files: a tied copy of the embedding and an untied lm_head.
    sd = dict(model.state_dict())
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    sd["lm_head.weight"] = torch.randn_like(sd["shared.weight"])
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
  elif fmt == "sharded":
    model.save_pretrained(d, max_shard_size="40KB")
  else:
    model.save_pretrained(d)
  # transformers 5 saves tokenizer.json but not spiece.model; hub T5 dirs have both.
  hf_tokenizer(tok_dir).save_pretrained(d)
  shutil.copyfile(os.path.join(tok_dir, "spiece.model"), os.path.join(d, "spiece.model"))
  return d


@pytest.fixture(scope="module")
def converted(hf_encoder, tok_dir, tmp_path_factory):
  """hf_encoder converted from safetensors (save_pretrained) into a sparvar-jax dir."""
  root = tmp_path_factory.mktemp("conv")
  hf_dir = _save_hf(hf_encoder, str(root / "hf"), tok_dir, "safetensors")
  out = str(root / "out")
  convert_t5.convert(hf_dir, out)
  return out


def test_relative_buckets_equal_hf():
  bucket_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for nb, md, L in [(32, 128, 512), (8, 20, 64), (16, 40, 300)]:
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    ref = bucket_fn(rel, bidirectional=True, num_buckets=nb, max_distance=md).numpy()
    np.testing.assert_array_equal(relative_position_buckets(L, L, nb, md), ref)


def test_parity_padding_and_lengths(converted, hf_encoder):
  """fp32 parity with padding masks, different lengths; padding length does not matter."""
  encoder, _ = text.load_t5(converted)
  rng = np.random.default_rng(0)
  L, lens = 40, [40, 25, 7, 1]
  ids = rng.integers(3, TINY["vocab_size"], (len(lens), L))
  mask = (np.arange(L)[None] < np.array(lens)[:, None]).astype(np.int32)
  ids = np.where(mask, ids, 0)
  ref = _hf_forward(hf_encoder, ids, mask)
  fwd = nnx.jit(lambda m, i, k: m(i, k))
  out = np.asarray(fwd(encoder, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
  assert out.dtype == np.float32 and out.shape == (len(lens), L, TINY["d_model"])
  for b, n in enumerate(lens):
    assert _rel(out[b, :n], ref[b, :n]) <= 1e-5, (b, _rel(out[b, :n], ref[b, :n]))
  assert _rel(out, ref) <= 1e-5
  # Longer padding leaves the real tokens' features unchanged.
  ids64 = np.pad(ids, ((0, 0), (0, 24)))
  mask64 = np.pad(mask, ((0, 0), (0, 24)))
  out64 = np.asarray(fwd(encoder, jnp.asarray(ids64, jnp.int32), jnp.asarray(mask64)))
  for b, n in enumerate(lens):
    assert _rel(out64[b, :n], out[b, :n]) <= 1e-6


def test_scan_keeps_program_size_constant():
  def n_eqns(layers):
    cfg = T5Config(**{**TINY, "num_layers": layers})
    enc = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    graphdef, state = nnx.split(enc)
    jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i, i > 0))(state, ids)
    return len(jaxpr.jaxpr.eqns), str(jaxpr).count("scan[")

  assert n_eqns(2) == n_eqns(24)
  assert n_eqns(2)[1] == 1


@pytest.mark.parametrize("fmt", ["bin", "sharded_full_t5"])
def test_convert_formats_round_trip(fmt, hf_encoder, tok_dir, tmp_path):
  """pytorch_model.bin, and a sharded full T5ForConditionalGeneration (decoder skipped)."""
  if fmt == "bin":
    model, save = hf_encoder, "bin"
  else:
    torch.manual_seed(1)
    model = _randomize_norms(
        transformers.T5ForConditionalGeneration(_hf_config(num_decoder_layers=2)).eval(), 1)
    save = "sharded"
  hf_dir = _save_hf(model, str(tmp_path / "hf"), tok_dir, save)
  if save == "sharded":
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
  out = str(tmp_path / "out")
  convert_t5.convert(hf_dir, out)
  assert os.path.isfile(os.path.join(out, "spiece.model"))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["configs"]["t5"]["num_layers"] == TINY["num_layers"]
  encoder, tok = text.load_t5(out)
  enc_ref = model if fmt == "bin" else model.get_encoder()
  prompts = ["a cat", "An astronaut riding a horse on the moon, digital art!", "東京 🚀"]
  hf_tok = hf_tokenizer(tok_dir)
  feats, lens = text.encode_prompts(encoder, tok, prompts)
  batch = hf_tok(prompts, max_length=512, padding="max_length", truncation=True,
                 return_tensors="np")
  np.testing.assert_array_equal(lens, batch["attention_mask"].sum(1))
  ref = _hf_forward(enc_ref, batch["input_ids"], batch["attention_mask"])
  feats = np.asarray(feats)
  for b, n in enumerate(lens):
    assert _rel(feats[b, :n], ref[b, :n]) <= 1e-5
    assert not feats[b, n:].any()  # padding is zeroed


def test_encode_prompts_matches_hf_pipeline(converted, hf_encoder, tok_dir):
  """Infinity's recipe: HF tokenizer (512, padded) -> T5EncoderModel -> first mask.sum()."""
  encoder, tok = text.load_t5(converted)
  prompts = ["a watercolor painting of mountains at sunrise", "x", "  Ünïcödé\tcafé  ",
             "a cat on a red sofa " * 120]
  with pytest.warns(text.PromptTruncatedWarning, match="tokens were dropped"):
    feats, lens = text.encode_prompts(encoder, tok, prompts)
  batch = hf_tokenizer(tok_dir)(prompts, max_length=512, padding="max_length",
                                truncation=True, return_tensors="np")
  ref = _hf_forward(hf_encoder, batch["input_ids"], batch["attention_mask"])
  np.testing.assert_array_equal(lens, batch["attention_mask"].sum(1))
  assert feats.shape == (4, 512, TINY["d_model"]) and lens[-1] == 512
  feats = np.asarray(feats)
  for b, n in enumerate(lens):
    assert _rel(feats[b, :n], ref[b, :n]) <= 1e-5


def test_bf16_close_to_fp32(converted):
  enc32, tok = text.load_t5(converted)
  enc16, _ = text.load_t5(converted, dtype=jnp.bfloat16)
  assert enc16.layers.q[...].dtype == jnp.bfloat16
  f32, lens = text.encode_prompts(enc32, tok, ["a photo of a cat sitting on a red sofa"])
  f16, _ = text.encode_prompts(enc16, tok, ["a photo of a cat sitting on a red sofa"])
  assert f16.dtype == jnp.float32
  n = int(lens[0])
  assert _rel(np.asarray(f16)[0, :n], np.asarray(f32)[0, :n]) < 3e-2


def test_convert_errors(hf_encoder, tok_dir, tmp_path, converted):
  hf_dir = _save_hf(hf_encoder, str(tmp_path / "hf"), tok_dir, "bin")
  with pytest.raises(ConversionError, match="already exists.*--overwrite"):
    convert_t5.convert(hf_dir, converted)
  with pytest.raises(ConversionError, match="is not a directory"):
    convert_t5.convert(str(tmp_path / "nope"), str(tmp_path / "o1"))
  # Original T5 (ReLU FFN) is refused.
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump({**cfg, "feed_forward_proj": "relu", "dense_act_fn": "relu"}, f)
  with pytest.raises(ConversionError, match="not a T5 v1.1 encoder"):
    convert_t5.convert(hf_dir, str(tmp_path / "o2"))
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump({**cfg, "model_type": "bert"}, f)
  with pytest.raises(ConversionError, match="model_type='bert'"):
    convert_t5.convert(hf_dir, str(tmp_path / "o2"))
  # A config whose sizes disagree with the weights: every shape mismatch is listed.
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump({**cfg, "d_ff": 64}, f)
  with pytest.raises(ConversionError, match=r"shape mismatches \(9\)"):
    convert_t5.convert(hf_dir, str(tmp_path / "o3"))
  # Extra / missing keys are listed, nothing is written.
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(cfg, f)
  sd = dict(hf_encoder.state_dict())
  sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
  del sd["encoder.final_layer_norm.weight"]
  torch.save(sd, os.path.join(hf_dir, "pytorch_model.bin"))
  with pytest.raises(ConversionError, match=r"(?s)missing keys \(1\).*final_layer_norm.*"
                     r"unexpected keys \(1\).*block.1.*relative_attention_bias"):
    convert_t5.convert(hf_dir, str(tmp_path / "o4"))
  assert not os.path.exists(tmp_path / "o4")
  assert not [n for n in os.listdir(tmp_path) if n.startswith("o4")]  # no temp left over
  sd = dict(hf_encoder.state_dict())
  sd["encoder.embed_tokens.weight"] = sd["shared.weight"] + 1
  torch.save(sd, os.path.join(hf_dir, "pytorch_model.bin"))
  with pytest.raises(ConversionError, match="differs from shared.weight"):
    convert_t5.convert(hf_dir, str(tmp_path / "o4"))
  os.remove(os.path.join(hf_dir, "pytorch_model.bin"))
  with pytest.raises(ConversionError, match="holds no T5 weights"):
    convert_t5.convert(hf_dir, str(tmp_path / "o5"))
  os.remove(os.path.join(hf_dir, "spiece.model"))
  with pytest.raises(ConversionError, match="no spiece.model"):
    convert_t5.convert(hf_dir, str(tmp_path / "o6"))


def test_cli_refuses_clearly(tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(
      {"model_type": "t5", "feed_forward_proj": "relu"}))
  r = subprocess.run([sys.executable, "-m", "convert.t5", "--hf_dir", str(tmp_path / "hf"),
                      "--out", str(tmp_path / "out")], cwd=_REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "error:" in r.stderr and "not a T5 v1.1 encoder" in r.stderr


def test_load_t5_errors(tmp_path, converted, tok_dir):
  with pytest.raises(text.T5LoadError, match="does not exist.*python -m convert.t5"):
    text.load_t5(str(tmp_path / "nope"))
  d = tmp_path / "nocfg"
  d.mkdir()
  train_tiny_spiece(str(d))
  with pytest.raises(text.T5LoadError, match="has no config.json.*config.json, t5/ and "
                     "spiece.model"):
    text.load_t5(str(d))
  # A raw Hugging Face directory has config.json and spiece.model but is not converted.
  (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(text.T5LoadError, match="must be converted first"):
    text.load_t5(str(d))
  e = tmp_path / "nospiece"
  e.mkdir()
  (e / "config.json").write_text(open(os.path.join(converted, "config.json")).read())
  with pytest.raises(text.T5LoadError, match="has no spiece.model"):
    text.load_t5(str(e))


def test_cli_converts_bf16_checkpoint(hf_encoder, tok_dir, tmp_path):
  """The CLI on a bf16 safetensors checkpoint, stored as bf16: exact weights, fp32 parity."""
  import copy
  from sparvar_jax import checkpoint
  model16 = copy.deepcopy(hf_encoder).to(torch.bfloat16)
  hf_dir = _save_hf(model16, str(tmp_path / "hf"), tok_dir, "safetensors")
  out = str(tmp_path / "out")
  r = subprocess.run([sys.executable, "-m", "convert.t5", "--hf_dir", hf_dir, "--out", out,
                      "--dtype", "bfloat16"], cwd=_REPO, capture_output=True, text=True,
                     timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  q = checkpoint.read_tree(out, "t5")["layers"]["q"]
  assert str(q.dtype) == "bfloat16"
  ref_q = model16.state_dict()["encoder.block.1.layer.0.SelfAttention.q.weight"]
  np.testing.assert_array_equal(np.asarray(q[1], np.float32), ref_q.float().numpy().T)
  encoder, tok = text.load_t5(out)  # fp32 model from bf16-valued weights
  model32 = model16.float()
  prompts = ["a cat", "a watercolor painting of mountains at sunrise"]
  feats, lens = text.encode_prompts(encoder, tok, prompts)
  batch = hf_tokenizer(tok_dir)(prompts, max_length=512, padding="max_length",
                                truncation=True, return_tensors="np")
  ref = _hf_forward(model32, batch["input_ids"], batch["attention_mask"])
  for b, n in enumerate(lens):
    assert _rel(np.asarray(feats)[b, :n], ref[b, :n]) <= 1e-5
