r"""Converts a Hugging Face T5 v1.1 encoder (flan-t5-xl for Infinity) to sparvar-jax.

Usage:
  python -m convert.t5 --hf_dir /models/flan-t5-xl --out /ckpt/flan-t5-xl [--overwrite]
      [--dtype float32|bfloat16]

`--hf_dir` is a Hugging Face T5 directory: config.json, spiece.model and the weights as
`model.safetensors`, `pytorch_model.bin`, or shards with their index JSON
(`model.safetensors.index.json` / `pytorch_model.bin.index.json`). Only the encoder is
kept (`shared.weight` and `encoder.*`); `decoder.*` and `lm_head.*` of a full
T5ForConditionalGeneration checkpoint are skipped without being read where the format
allows. The key map is strict: any other missing or unexpected key, or any shape that
does not follow from config.json, stops the conversion before anything is written.

Output (written atomically, self-contained): `OUT/config.json` ({"configs": {"t5": ...}}),
`OUT/t5/` (orbax tree, layers stacked along a leading axis) and the tokenizer files
(`spiece.model`, plus tokenizer_config.json / special_tokens_map.json / tokenizer.json
where present). Load it with `sparvar_jax.text.load_t5(OUT)`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from convert import common
from convert.common import ConversionError

TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")
_SKIP_PREFIXES = ("decoder.", "lm_head.")
_TIED_EMBED = "encoder.embed_tokens.weight"  # T5 ties it to shared.weight


def t5_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """Our T5Config fields from a Hugging Face config.json dict; refuses non-v1.1 models."""
  model_type = hf.get("model_type")
  if model_type != "t5":
    raise ConversionError(f"config.json has model_type={model_type!r}; only T5 ('t5', e.g. "
                          "google/flan-t5-xl) is supported.")
  proj = hf.get("feed_forward_proj", "relu")
  if proj != "gated-gelu":
    raise ConversionError(
        f"config.json has feed_forward_proj={proj!r}: this is not a T5 v1.1 encoder. Only "
        "the gated-GELU T5 v1.1 family (google/t5-v1_1-*, google/flan-t5-*, the encoder "
        "Infinity uses) is supported; original T5 (ReLU FFN) and other variants are not.")
  act = hf.get("dense_act_fn", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ConversionError(f"config.json has dense_act_fn={act!r}; T5 v1.1 uses the tanh "
                          "GELU ('gelu_new'), which is what the model implements.")
  try:
    cfg = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]),
        d_kv=int(hf["d_kv"]),
        d_ff=int(hf["d_ff"]),
        num_layers=int(hf["num_layers"]),
        num_heads=int(hf["num_heads"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj="gated-gelu",
    )
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"config.json lacks or mangles a T5 size field ({e!r}); use the "
                          "config.json that came with the weights.") from e
  return cfg


def t5_rules(cfg: dict[str, Any]) -> list[common.Rule]:
  """Key map: HF T5 encoder state dict -> our tree (see sparvar_jax.models.t5)."""
  n, d, f = cfg["num_layers"], cfg["d_model"], cfg["d_ff"]
  inner = cfg["num_heads"] * cfg["d_kv"]
  blk = "encoder.block.{}.layer."
  rules = [
      common.rule("embedding", "shared.weight", (cfg["vocab_size"], d)),
      common.rule("rel_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
                  ".weight", (cfg["relative_attention_num_buckets"], cfg["num_heads"])),
      common.rule("final_norm", "encoder.final_layer_norm.weight", (d,)),
      common.stacked_rule("layers/attn_norm", blk + "0.layer_norm.weight", n, (d,)),
      common.stacked_rule("layers/ffn_norm", blk + "1.layer_norm.weight", n, (d,)),
  ]
  for name in ("q", "k", "v"):
    rules.append(common.stacked_rule(f"layers/{name}", blk + f"0.SelfAttention.{name}.weight",
                                     n, (inner, d), common.linear_t))
  rules.append(common.stacked_rule("layers/o", blk + "0.SelfAttention.o.weight", n,
                                   (d, inner), common.linear_t))
  for name in ("wi_0", "wi_1"):
    rules.append(common.stacked_rule(f"layers/{name}", blk + f"1.DenseReluDense.{name}.weight",
                                     n, (f, d), common.linear_t))
  rules.append(common.stacked_rule("layers/wo", blk + "1.DenseReluDense.wo.weight", n, (d, f),
                                   common.linear_t))
  return rules


def _wanted(key: str) -> bool:
  return not key.startswith(_SKIP_PREFIXES)


def _weight_files(hf_dir: str) -> list[str]:
  """The weight files to read, preferring safetensors; shards via their index JSON."""
  for single, index in (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
    if os.path.isfile(os.path.join(hf_dir, single)):
      return [os.path.join(hf_dir, single)]
    ipath = os.path.join(hf_dir, index)
    if os.path.isfile(ipath):
      try:
        with open(ipath) as fh:
          weight_map = json.load(fh)["weight_map"]
      except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"shard index {ipath!r} is unreadable ({e!r}); download it "
                              "again.") from e
      # Shards that hold only decoder weights are never opened.
      shards = sorted({v for k, v in weight_map.items() if _wanted(k)})
      missing = [s for s in shards if not os.path.isfile(os.path.join(hf_dir, s))]
      if missing:
        raise ConversionError(f"{hf_dir!r} lacks shards named in {index}: {missing}. "
                              "Download the whole model directory.")
      return [os.path.join(hf_dir, s) for s in shards]
  raise ConversionError(
      f"{hf_dir!r} holds no T5 weights: expected model.safetensors, pytorch_model.bin, or "
      f"shards with model.safetensors.index.json / pytorch_model.bin.index.json; found "
      f"{sorted(os.listdir(hf_dir))[:20]}.")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  try:
    with safe_open(path, framework="np") as fh:
      keys = [k for k in fh.keys() if _wanted(k)]
      for k in keys:
        v = fh.get_tensor(k)
        # Half types are widened (as for .bin files); --dtype decides what is stored.
        out[k] = v.astype(np.float32) if str(v.dtype) in ("bfloat16", "float16") else v
  except Exception as e:  # safetensors raises several types for corrupt files
    raise ConversionError(f"could not read safetensors file {path!r}: {e}. The file is "
                          "corrupt or truncated; download it again.") from e
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  obj = common.load_torch_file(path)  # weights_only, memory-mapped
  out = {}
  for k, v in obj.items():
    if not _wanted(k):
      continue
    if not hasattr(v, "detach"):
      raise ConversionError(f"entry {k!r} of {path!r} is not a tensor ({type(v).__name__}).")
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


def load_encoder_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
  """Encoder tensors of a HF T5 directory as numpy (decoder/lm_head skipped)."""
  sd: dict[str, np.ndarray] = {}
  for path in _weight_files(hf_dir):
    part = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)
    sd.update(part)
  if "shared.weight" not in sd and _TIED_EMBED in sd:
    sd["shared.weight"] = sd.pop(_TIED_EMBED)
  elif _TIED_EMBED in sd:
    tied = sd.pop(_TIED_EMBED)
    if tied.shape != sd["shared.weight"].shape or not np.array_equal(tied, sd["shared.weight"]):
      raise ConversionError(f"{_TIED_EMBED} differs from shared.weight; T5 ties them, so "
                            "this checkpoint is not a standard T5 encoder.")
  return sd


def convert(hf_dir: str, out: str, *, overwrite: bool = False, dtype: str = "float32") -> None:
  """Converts hf_dir to out (see the module docstring); raises ConversionError."""
  if not os.path.isdir(hf_dir):
    raise ConversionError(f"--hf_dir {hf_dir!r} is not a directory. Pass the Hugging Face "
                          "model directory (e.g. a download of google/flan-t5-xl) holding "
                          "config.json, spiece.model and the weights.")
  common.check_out_dir(out, overwrite, (hf_dir,))
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConversionError(f"{hf_dir!r} has no config.json; a Hugging Face T5 directory "
                          "holds config.json, spiece.model and the weights.")
  try:
    with open(cfg_path) as fh:
      hf_cfg = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{cfg_path!r} is not valid JSON ({e}); download it again.") from e
  if not isinstance(hf_cfg, dict):
    raise ConversionError(f"{cfg_path!r} is not a Hugging Face config (not a JSON object).")
  cfg = t5_config_from_hf(hf_cfg)
  if not os.path.isfile(os.path.join(hf_dir, "spiece.model")):
    raise ConversionError(f"{hf_dir!r} has no spiece.model (the T5 sentencepiece "
                          "tokenizer), which the converted directory needs for prompts. "
                          "Download it with the model.")
  if dtype not in ("float32", "bfloat16"):
    raise ConversionError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  np_dtype = np.float32
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    np_dtype = ml_dtypes.bfloat16

  sd = load_encoder_state_dict(hf_dir)
  tree = common.apply_rules(sd, t5_rules(cfg), what=f"T5 encoder in {hf_dir!r}",
                            progress=True, dtype=np_dtype)
  del sd
  configs = {"t5": {"type": "T5Config", **cfg}}
  meta = {"source": os.path.abspath(hf_dir), "dtype": dtype,
          "hf_name_or_path": hf_cfg.get("_name_or_path", "")}

  # The tokenizer files land in the same atomic rename as the trees.
  extra = {name: os.path.join(hf_dir, name) for name in TOKENIZER_FILES
           if os.path.isfile(os.path.join(hf_dir, name))}
  common.write_converted(out, {"t5": tree}, configs, meta, overwrite=overwrite,
                         extra_files=extra, inputs=(hf_dir,))
  print(f"wrote {out}", file=sys.stderr)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  common.main_wrapper(lambda: convert(f.hf_dir, f.out, overwrite=f.overwrite, dtype=f.dtype))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("hf_dir", None, "Hugging Face T5 directory (config.json, spiece.model, "
                      "weights).", required=True)
  flags.DEFINE_string("out", None, "output directory", required=True)
  flags.DEFINE_bool("overwrite", False, "replace an existing --out that is a converted "
                    "checkpoint (never any other folder, nor one holding the inputs)")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "stored weight dtype")
  app.run(main)
