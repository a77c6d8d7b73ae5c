r"""Official Infinity checkpoints -> a sparvar-jax checkpoint directory.

  python -m convert.infinity --model infinity_2b_reg.pth --vae infinity_vae_d32reg.pth --out DIR
  python -m convert.infinity --model infinity_8b_weights/ \
      --vae infinity_vae_d56_f8_14_patchify.pth --out DIR

--model: a single .pth state dict (2B; also a fine-tune file wrapping it under
`trainer.gpt_fsdp` / `gpt_fsdp`) or a directory of shards (8B: *.safetensors or
pytorch_model-*.bin, the layout `transformers.load_sharded_checkpoint` reads).
--vae: the BSQ autoencoder, `{'vae': state_dict}` with either key form (see
convert/bsq_rules.py).

The InfinityConfig is inferred from the tensor shapes: width D and bits d from
`word_embed.weight` [D, d], heads from `sa.scale_mul_1H11` [1, H, 1, 1], depth and
block_chunks from the key names (`block_chunks.{c}.module.{j}.*`, or `blocks.{i}.*` for
block_chunks=1), text width from `cfg_uncond`, pooling heads from the pooling query.

Unlike the official loader (`Infinity.load_state_dict`, strict=False), the key set is
checked strictly: every expected tensor present with its shape, nothing unexpected.
Two official behaviours are kept and recorded in the output's meta:
- `cfg_uncond` is padded or truncated to text_maxlen=512 rows as the official load does
  (missing rows take the model's own initial values: trunc-normal std 1.2 from a
  generator seeded 0, divided by sqrt(text_channels)); released checkpoints hold 512.
- the `zero_k_bias` buffers are dropped after checking that they are zero.
The transformer and the VAE must belong together (32 bits: infinity_vae_d32reg with the
2B family; 56 bits: infinity_vae_d56_f8_14_patchify with the 8B family).
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from convert import common
from convert.common import ConversionError, Rule, linear_t, rule
from sparvar_jax import configs as configs_lib
from sparvar_jax.configs import InfinityConfig

TEXT_MAXLEN = 512
MODEL_WRAPPERS = ("trainer", "gpt_fsdp", "state_dict")
_VAE_FILES = {32: "infinity_vae_d32reg.pth", 56: "infinity_vae_d56_f8_14_patchify.pth"}
_MODEL_NAMES = {32: "Infinity-2B (infinity_2b_reg.pth)", 56: "Infinity-8B (infinity_8b_weights/)"}


def _unwrap_model(sd: dict) -> dict:
  """Accepts plain state dicts and fine-tune files (`trainer.gpt_fsdp.*`, whose other
  entries, e.g. optimizer state, are not model weights and are left out)."""
  if "word_embed.weight" in sd:
    return sd
  for prefix in ("gpt_fsdp.", "trainer.gpt_fsdp.", "module."):
    if prefix + "word_embed.weight" in sd:
      return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  return sd


def _shard_files(path: str) -> list[str]:
  """Shards of a weight directory: those named by an index JSON, else every
  *.safetensors (or, failing that, every .bin/.pth/.pt) file."""
  names = sorted(os.listdir(path))
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    ipath = os.path.join(path, index)
    if os.path.isfile(ipath):
      try:
        with open(ipath) as fh:
          shards = sorted(set(json.load(fh)["weight_map"].values()))
      except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"shard index {ipath!r} is unreadable ({e!r}); download it "
                              "again.") from e
      missing = [n for n in shards if not os.path.isfile(os.path.join(path, n))]
      if missing:
        raise ConversionError(f"{path!r} lacks shards named in {index}: {missing[:10]}. "
                              "Download the whole weights directory.")
      return [os.path.join(path, n) for n in shards]
  shards = [n for n in names if n.endswith(".safetensors")] or [
      n for n in names if n.endswith((".bin", ".pth", ".pt"))]
  if not shards:
    raise ConversionError(f"directory {path!r} holds no .safetensors/.bin/.pth shards; found "
                          f"{names[:20]}")
  return [os.path.join(path, n) for n in shards]


def _read_shard(path: str) -> dict[str, np.ndarray]:
  """One shard as float32/int numpy arrays (bf16/fp16 widened, as for .pth files)."""
  if not path.endswith(".safetensors"):
    return common.load_state_dict(path)
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    out = {}
    with safe_open(path, framework="pt") as fh:
      for k in fh.keys():
        t = fh.get_tensor(k)
        out[k] = (t.float() if t.is_floating_point() else t).numpy()
    return out
  except Exception as e:  # safetensors raises several types for corrupt files
    raise ConversionError(f"could not read safetensors file {path!r}: {e}. The file is "
                          "corrupt or truncated; download it again.") from e


def load_model_state_dict(path: str) -> dict[str, np.ndarray]:
  """A single checkpoint file or a directory of shards -> flat numpy state dict."""
  if not os.path.isdir(path):
    return _unwrap_model(common.load_state_dict(path, wrappers=MODEL_WRAPPERS))
  sd: dict[str, np.ndarray] = {}
  for f in _shard_files(path):
    part = _read_shard(f)
    dup = sorted(set(part) & set(sd))
    if dup:
      raise ConversionError(f"shard {f!r} repeats tensors of earlier shards (e.g. {dup[:3]}); "
                            "the directory mixes two checkpoints.")
    sd.update(part)
  return _unwrap_model(sd)


# --------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------


def _need(sd, key, what):
  if key not in sd:
    raise ConversionError(f"the transformer checkpoint has no {key!r} ({what}); it is not an "
                          "official Infinity state dict. Found keys like "
                          f"{sorted(sd)[:8]}.")
  return sd[key]


def block_layout(sd) -> tuple[int, int]:
  """(depth, block_chunks) from the key names."""
  chunked = {(int(m.group(1)), int(m.group(2))) for k in sd
             if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))}
  flat = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
  if chunked and flat:
    raise ConversionError("the checkpoint mixes 'blocks.{i}' and 'block_chunks.{c}.module.{j}' "
                          "keys; it is not an official Infinity state dict.")
  if flat:
    depth = max(flat) + 1
    if sorted(flat) != list(range(depth)):
      raise ConversionError(f"blocks are not numbered 0..{depth - 1}: {sorted(flat)}")
    return depth, 1
  if not chunked:
    raise ConversionError("the checkpoint has no transformer blocks ('block_chunks.*' or "
                          "'blocks.*' keys); it is not an Infinity state dict.")
  chunks = max(c for c, _ in chunked) + 1
  per = max(j for _, j in chunked) + 1
  if chunked != {(c, j) for c in range(chunks) for j in range(per)}:
    raise ConversionError(f"block_chunks keys are incomplete: expected {chunks} chunks of "
                          f"{per} blocks.")
  return chunks * per, chunks


def infer_infinity_config(sd) -> InfinityConfig:
  """InfinityConfig from the shapes and key names of an official state dict."""
  we = _need(sd, "word_embed.weight", "input embedding [D, d_vae]")
  D, d_vae = int(we.shape[0]), int(we.shape[1])
  depth, chunks = block_layout(sd)
  b0 = "block_chunks.0.module.0." if chunks > 1 else "blocks.0."
  sm = _need(sd, b0 + "sa.scale_mul_1H11", "cosine-attention scales [1, H, 1, 1]")
  if sm.ndim != 4 or sm.shape[0] != 1 or sm.shape[2:] != (1, 1):
    raise ConversionError(f"{b0}sa.scale_mul_1H11 has shape {tuple(sm.shape)}, expected "
                          "[1, H, 1, 1] (checkpoints of the unreleased customized flash-attn "
                          "kernel, [1, 1, H, 1], are not supported).")
  H = int(sm.shape[1])
  K = int(_need(sd, "cfg_uncond", "learned unconditional text [512, Ct5]").shape[1])
  mq = _need(sd, "text_proj_for_sos.ca.mat_q", "pooling query [1, heads, D/heads]")
  pool_heads = int(mq.shape[1])
  if K % pool_heads:
    raise ConversionError(f"text width {K} is not divisible by the {pool_heads} pooling heads")
  hidden = int(_need(sd, b0 + "ffn.fc1.weight", "FFN [hidden, D]").shape[0])
  num_lvl = int(_need(sd, "lvl_embed.weight", "level embedding").shape[0])
  mlp_ratio = 4.0 if round(D * 4.0 / 256) * 256 == hidden else hidden / D
  try:
    cfg = InfinityConfig(depth=depth, embed_dim=D, num_heads=H, d_vae=d_vae,
                         block_chunks=chunks, text_channels=K, text_maxlen=TEXT_MAXLEN,
                         mlp_ratio=mlp_ratio, num_lvl=num_lvl, head_dim_pool=K // pool_heads)
  except ValueError as e:
    raise ConversionError(f"inconsistent transformer shapes: {e}") from e
  if cfg.mlp_hidden != hidden:
    raise ConversionError(f"FFN hidden width {hidden} is not a multiple of 256 of D={D}; not an "
                          "Infinity checkpoint.")
  return cfg


# --------------------------------------------------------------------------------------
# Key map
# --------------------------------------------------------------------------------------


def _block_key(cfg: InfinityConfig, i: int) -> str:
  if cfg.block_chunks == 1:
    return f"blocks.{i}."
  per = cfg.depth // cfg.block_chunks
  return f"block_chunks.{i // per}.module.{i % per}."


def _reshape(shape):
  return lambda x: np.ascontiguousarray(x.reshape(shape))


def infinity_rules(cfg: InfinityConfig) -> list[Rule]:
  D, K, H, d = cfg.embed_dim, cfg.text_channels, cfg.num_heads, cfg.d_vae
  Hp = cfg.pool_heads
  F = cfg.mlp_hidden
  r = [
      rule("cfg_uncond", "cfg_uncond", (cfg.text_maxlen, K)),
      rule("text_norm/weight", "text_norm.weight", (K,)),
      rule("text_proj_for_sos/mat_q", "text_proj_for_sos.ca.mat_q", (1, Hp, D // Hp),
           _reshape((Hp, D // Hp))),
      rule("text_proj_for_sos/mat_kv/kernel", "text_proj_for_sos.ca.mat_kv.weight", (2 * D, K),
           linear_t),
      rule("text_proj_for_sos/v_bias", "text_proj_for_sos.ca.v_bias", (D,)),
      rule("text_proj_for_sos/proj/kernel", "text_proj_for_sos.ca.proj.weight", (D, D), linear_t),
      rule("text_proj_for_sos/proj/bias", "text_proj_for_sos.ca.proj.bias", (D,)),
      rule("text_proj_for_ca/fc0/kernel", "text_proj_for_ca.0.weight", (D, K), linear_t),
      rule("text_proj_for_ca/fc0/bias", "text_proj_for_ca.0.bias", (D,)),
      rule("text_proj_for_ca/fc2/kernel", "text_proj_for_ca.2.weight", (D, D), linear_t),
      rule("text_proj_for_ca/fc2/bias", "text_proj_for_ca.2.bias", (D,)),
      rule("pos_start", "pos_start", (1, 1, D), _reshape((D,))),
      rule("lvl_embed/embedding", "lvl_embed.weight", (cfg.num_lvl, D)),
      rule("word_embed/kernel", "word_embed.weight", (D, d), linear_t),
      rule("word_embed/bias", "word_embed.bias", (D,)),
      rule("shared_ada_lin/kernel", "shared_ada_lin.1.weight", (6 * D, D), linear_t),
      rule("shared_ada_lin/bias", "shared_ada_lin.1.bias", (6 * D,)),
      rule("head_nm/ada_lin/kernel", "head_nm.ada_lin.1.weight", (2 * D, D), linear_t),
      rule("head_nm/ada_lin/bias", "head_nm.ada_lin.1.bias", (2 * D,)),
      rule("head/kernel", "head.weight", (2 * d, D), linear_t),
      rule("head/bias", "head.bias", (2 * d,)),
  ]
  per_block = [  # (our path under blocks/, torch name, torch shape, transform)
      ("ada_gss", "ada_gss", (1, 1, 6, D), _reshape((6, D))),
      ("sa/scale_mul_H", "sa.scale_mul_1H11", (1, H, 1, 1), _reshape((H,))),
      ("sa/q_bias", "sa.q_bias", (D,), common.identity),
      ("sa/v_bias", "sa.v_bias", (D,), common.identity),
      ("sa/mat_qkv/kernel", "sa.mat_qkv.weight", (3 * D, D), linear_t),
      ("sa/proj/kernel", "sa.proj.weight", (D, D), linear_t),
      ("sa/proj/bias", "sa.proj.bias", (D,), common.identity),
      ("ca/mat_q/kernel", "ca.mat_q.weight", (D, D), linear_t),
      ("ca/mat_q/bias", "ca.mat_q.bias", (D,), common.identity),
      ("ca/mat_kv/kernel", "ca.mat_kv.weight", (2 * D, D), linear_t),
      ("ca/v_bias", "ca.v_bias", (D,), common.identity),
      ("ca/proj/kernel", "ca.proj.weight", (D, D), linear_t),
      ("ca/proj/bias", "ca.proj.bias", (D,), common.identity),
      ("ca_norm/scale", "ca_norm.weight", (D,), common.identity),
      ("ca_norm/bias", "ca_norm.bias", (D,), common.identity),
      ("ffn/fc1/kernel", "ffn.fc1.weight", (F, D), linear_t),
      ("ffn/fc1/bias", "ffn.fc1.bias", (F,), common.identity),
      ("ffn/fc2/kernel", "ffn.fc2.weight", (D, F), linear_t),
      ("ffn/fc2/bias", "ffn.fc2.bias", (D,), common.identity),
  ]
  for path, name, shape, tf in per_block:
    keys = tuple(_block_key(cfg, i) + name for i in range(cfg.depth))
    r.append(Rule(tuple(("blocks/" + path).split("/")), keys, tuple(shape), tf, True))
  return r


ZERO_BUFFER = r".*zero_k_bias"


def official_cfg_uncond_init(rows: int, text_channels: int) -> np.ndarray:
  """The official constructor's cfg_uncond (used for rows a checkpoint lacks)."""
  import torch  # pylint: disable=g-import-not-at-top
  t = torch.empty(rows, text_channels)
  g = torch.Generator(device="cpu")
  g.manual_seed(0)
  torch.nn.init.trunc_normal_(t, std=1.2, generator=g)
  return (t / text_channels ** 0.5).numpy()


def prepare_state_dict(sd: dict, cfg: InfinityConfig) -> tuple[dict, dict]:
  """Official load-time fix-ups: cfg_uncond to text_maxlen rows, zero buffers checked.
  Returns (state dict, meta notes)."""
  sd = dict(sd)
  notes = {}
  u = sd["cfg_uncond"]
  n = int(u.shape[0])
  notes["cfg_uncond_rows_in_checkpoint"] = n
  if n > cfg.text_maxlen:
    sd["cfg_uncond"] = u[:cfg.text_maxlen]
  elif n < cfg.text_maxlen:
    init = official_cfg_uncond_init(cfg.text_maxlen, cfg.text_channels)
    sd["cfg_uncond"] = np.concatenate([u, init[n:]], axis=0)
  nonzero = [k for k, v in sd.items() if re.fullmatch(ZERO_BUFFER, k) and np.any(v != 0)]
  if nonzero:
    raise ConversionError(f"buffers that must be zero are not: {nonzero[:10]}. The checkpoint "
                          "is damaged or not an official Infinity state dict.")
  return sd, notes


def pairing_check(cfg: InfinityConfig, vae_bits: int, vae_path: str) -> None:
  if cfg.d_vae == vae_bits:
    return
  right = _VAE_FILES.get(cfg.d_vae)
  hint = (f"Use {right} with this model." if right else
          f"Use a VAE with {cfg.d_vae} bits per token.")
  model = _MODEL_NAMES.get(vae_bits)
  also = f" ({vae_path!r} belongs to {model}.)" if model else ""
  raise ConversionError(
      f"the VAE {vae_path!r} gives {vae_bits} bits per token but the transformer predicts "
      f"{cfg.d_vae}: they do not belong together.{also} {hint} Only "
      "infinity_vae_d32reg pairs with the 2B model and infinity_vae_d56_f8_14_patchify with "
      "the 8B model; nothing was written.")


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _bsq():
  from convert import bsq_rules  # pylint: disable=g-import-not-at-top
  return bsq_rules


def convert_trees(model_path: str, vae_path: str, *, progress: bool = False,
                  dtype: str = "float32"):
  """Loads, validates and maps both checkpoints; returns (trees, configs, meta).
  dtype: storage dtype of the transformer weights ('float32' or 'bfloat16'); the VAE
  stays float32."""
  if dtype not in ("float32", "bfloat16"):
    raise ConversionError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  if not os.path.exists(model_path):
    raise ConversionError(f"--model {model_path!r} does not exist. Pass infinity_2b_reg.pth or "
                          "the infinity_8b_weights/ directory.")
  if not os.path.exists(vae_path):
    raise ConversionError(f"--vae {vae_path!r} does not exist. Pass infinity_vae_d32reg.pth "
                          "(2B) or infinity_vae_d56_f8_14_patchify.pth (8B).")
  if os.path.isdir(vae_path):
    raise ConversionError(f"--vae {vae_path!r} is a directory; pass the VAE .pth file.")
  if progress:
    print(f"reading {model_path}", file=sys.stderr)
  sd = load_model_state_dict(model_path)
  cfg = infer_infinity_config(sd)
  bsq = _bsq()
  if progress:
    print(f"reading {vae_path}", file=sys.stderr)
  vsd = common.load_state_dict(vae_path, wrappers=("vae",))
  vcfg = bsq.infer_bsq_config(vsd)
  pairing_check(cfg, vcfg.bits_per_token, vae_path)
  sd, notes = prepare_state_dict(sd, cfg)
  np_dtype = np.float32
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    np_dtype = ml_dtypes.bfloat16
  tree = common.apply_rules(sd, infinity_rules(cfg), ignore=[ZERO_BUFFER],
                            what=f"Infinity transformer {model_path!r}", progress=progress,
                            dtype=np_dtype)
  del sd
  vtree = bsq.convert_bsq_state_dict(vsd, vcfg, what=f"BSQ VAE {vae_path!r}", progress=progress)
  configs = {"infinity": configs_lib.config_to_dict(cfg), "vae": configs_lib.config_to_dict(vcfg)}
  meta = {"model_source": os.path.abspath(model_path), "vae_source": os.path.abspath(vae_path),
          "strict_keys": True, "dtype": dtype, **notes}
  return {"infinity": tree, "vae": vtree}, configs, meta


def convert(model_path: str, vae_path: str, out: str, *, overwrite: bool = False,
            progress: bool = True, dtype: str = "float32") -> None:
  inputs = (model_path, vae_path)
  common.check_out_dir(out, overwrite, inputs)  # before the slow part
  trees, configs, meta = convert_trees(model_path, vae_path, progress=progress, dtype=dtype)
  common.write_converted(out, trees, configs, meta, overwrite=overwrite, inputs=inputs)
  if progress:
    print(f"wrote {out}", file=sys.stderr)


def main(argv) -> None:
  """absl entry point (flags defined under __main__, as in convert.t5, so importing this
  module next to convert.var does not define the same flag names twice)."""
  if len(argv) > 1:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  common.main_wrapper(lambda: convert(f.model, f.vae, f.out, overwrite=f.overwrite,
                                      dtype=f.dtype))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", None, "infinity_2b_reg.pth, or the 8B shard directory",
                      required=True)
  flags.DEFINE_string("vae", None, "the BSQ VAE .pth paired with the model", required=True)
  flags.DEFINE_string("out", None, "output directory (must not exist unless --overwrite)",
                      required=True)
  flags.DEFINE_bool("overwrite", False, "replace an existing --out that is a converted "
                    "checkpoint (never any other folder, nor one holding the inputs)")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "storage dtype of the transformer weights (bfloat16 halves the 8B output; "
                    "the official inference runs the blocks in bf16)")
  app.run(main)
