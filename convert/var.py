r"""Converts the official VAR transformer + multi-scale VQVAE to an orbax checkpoint.

Usage (CPU is enough; the official files are on huggingface.co/FoundationVision/var):

  python -m convert.var --var var_d16.pth --vae vae_ch160v4096z32.pth --out ckpt/var_d16
  python -m convert.var --var var_d36.pth --vae vae_ch160v4096z32.pth --out ckpt/var_d36 \
      --overwrite

Writes DIR/var/ and DIR/vae/ (orbax trees) and DIR/config.json ({"configs": {"var":
..., "vae": ...}}) atomically: a failed run leaves nothing behind that looks valid.
The transformer's config is read from the tensor shapes: depth (number of blocks), width,
heads (from `scale_mul_1H11`), vocabulary, VQVAE channels, classes, shared AdaLN (key
presence) and the scale schedule (from the length of `pos_1LC`). Load the result with
`sparvar_jax.models.var.load_var(DIR)`.

Key map (torch -> ours; Linear weights [out, in] are transposed to kernels [in, out]):
  class_emb.weight -> class_emb/embedding, lvl_embed.weight -> lvl_embed/embedding,
  pos_start, pos_1LC, word_embed.* -> word_embed/{kernel,bias},
  shared_ada_lin.1.* -> shared_ada_lin/* (d36), head_nm.ada_lin.1.* -> head_nm/ada_lin/*,
  head.* -> head/*, blocks.{i}.X -> blocks/X stacked over i (leading axis = depth), with
  attn.scale_mul_1H11 [1,H,1,1] -> attn/scale_mul_H [H], ada_gss [1,1,6,C] -> ada_gss [6,C].
  Buffers lvl_1L, attn_bias_for_masking and attn.zero_k_bias are recomputed by the model;
  they are checked (when present) rather than copied.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
from absl import app
from absl import flags

from convert import common
from convert.common import ConversionError, linear_t, rule, stacked_rule
from sparvar_jax import configs as configs_lib

VAR_IGNORE = (r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias")


def _supported_lengths() -> dict[int, tuple[int, ...]]:
  return {sum(p * p for p in pns): pns for pns in configs_lib.VAR_PATCH_NUMS.values()}


def _need(sd: dict[str, np.ndarray], key: str, ndim: int, what: str) -> tuple[int, ...]:
  if key not in sd:
    raise ConversionError(f"cannot read the VAR config: the checkpoint has no {key!r} "
                          f"({what}). Is this an official VAR transformer file (var_dXX.pth)? "
                          f"Its first keys are {sorted(sd)[:8]}.")
  shape = tuple(sd[key].shape)
  if len(shape) != ndim:
    raise ConversionError(f"cannot read the VAR config: {key!r} has shape {shape}, expected "
                          f"{ndim} dimensions ({what}).")
  return shape


def infer_var_config(sd: dict[str, np.ndarray]) -> configs_lib.VARConfig:
  """VARConfig from the tensor shapes of an official VAR state dict."""
  idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not idx:
    raise ConversionError("cannot read the VAR config: the checkpoint has no `blocks.N.*` "
                          f"keys. Is this an official VAR transformer file? First keys: "
                          f"{sorted(sd)[:8]}.")
  depth = max(idx) + 1
  gaps = sorted(set(range(depth)) - idx)
  if gaps:
    raise ConversionError(f"the checkpoint has blocks up to {depth - 1} but none for "
                          f"block(s) {gaps}; the file is incomplete.")
  n_cls, C = _need(sd, "class_emb.weight", 2, "class embedding [num_classes + 1, C]")
  V = _need(sd, "head.weight", 2, "head [vocab, C]")[0]
  cvae = _need(sd, "word_embed.weight", 2, "word embedding [C, Cvae]")[1]
  L = _need(sd, "pos_1LC", 3, "position embedding [1, L, C]")[1]
  hidden = _need(sd, "blocks.0.ffn.fc1.weight", 2, "FFN [hidden, C]")[0]
  lengths = _supported_lengths()
  if L not in lengths:
    raise ConversionError(
        f"pos_1LC holds {L} positions, which matches no known scale schedule; supported "
        f"lengths: " + ", ".join(f"{n} (patch_nums {list(p)})" for n, p in lengths.items())
        + ". The file is not an official VAR checkpoint or was trained on another schedule.")
  patch_nums = lengths[L]
  attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
  if attn_l2_norm:
    heads = _need(sd, "blocks.0.attn.scale_mul_1H11", 4, "per-head scale [1, H, 1, 1]")[1]
  else:  # no per-head tensor: VAR always uses head_dim 64
    heads = max(C // 64, 1)
  if C % heads:
    raise ConversionError(f"width {C} is not divisible by the {heads} heads read from "
                          "scale_mul_1H11; the checkpoint is inconsistent.")
  mlp_ratio = hidden / C
  try:
    cfg = configs_lib.VARConfig(
        depth=depth, embed_dim=C, num_heads=heads, vocab_size=V, cvae=cvae,
        num_classes=n_cls - 1, mlp_ratio=mlp_ratio, shared_aln="shared_ada_lin.1.weight" in sd,
        attn_l2_norm=attn_l2_norm, patch_nums=patch_nums)
  except ValueError as e:
    raise ConversionError(f"the VAR checkpoint's shapes give no valid config: {e}") from e
  if cfg.mlp_hidden != hidden:
    raise ConversionError(f"FFN hidden width {hidden} cannot be expressed as a ratio of {C}")
  return cfg


def var_rules(cfg: configs_lib.VARConfig) -> list[common.Rule]:
  """Strict key map for one VAR transformer (see the module docstring)."""
  C, N, H, V, K = cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.vocab_size, cfg.num_scales
  hid = cfg.mlp_hidden
  first_l = cfg.patch_nums[0] ** 2
  b = "blocks.{}."
  rules = [
      rule("class_emb/embedding", "class_emb.weight", (cfg.num_classes + 1, C)),
      rule("pos_start", "pos_start", (1, first_l, C)),
      rule("pos_1LC", "pos_1LC", (1, cfg.seq_len, C)),
      rule("lvl_embed/embedding", "lvl_embed.weight", (K, C)),
      rule("word_embed/kernel", "word_embed.weight", (C, cfg.cvae), linear_t),
      rule("word_embed/bias", "word_embed.bias", (C,)),
      rule("head_nm/ada_lin/kernel", "head_nm.ada_lin.1.weight", (2 * C, C), linear_t),
      rule("head_nm/ada_lin/bias", "head_nm.ada_lin.1.bias", (2 * C,)),
      rule("head/kernel", "head.weight", (V, C), linear_t),
      rule("head/bias", "head.bias", (V,)),
      stacked_rule("blocks/attn/mat_qkv/kernel", b + "attn.mat_qkv.weight", N, (3 * C, C),
                   linear_t),
      stacked_rule("blocks/attn/q_bias", b + "attn.q_bias", N, (C,)),
      stacked_rule("blocks/attn/v_bias", b + "attn.v_bias", N, (C,)),
      stacked_rule("blocks/attn/proj/kernel", b + "attn.proj.weight", N, (C, C), linear_t),
      stacked_rule("blocks/attn/proj/bias", b + "attn.proj.bias", N, (C,)),
      stacked_rule("blocks/ffn/fc1/kernel", b + "ffn.fc1.weight", N, (hid, C), linear_t),
      stacked_rule("blocks/ffn/fc1/bias", b + "ffn.fc1.bias", N, (hid,)),
      stacked_rule("blocks/ffn/fc2/kernel", b + "ffn.fc2.weight", N, (C, hid), linear_t),
      stacked_rule("blocks/ffn/fc2/bias", b + "ffn.fc2.bias", N, (C,)),
  ]
  if cfg.attn_l2_norm:
    # [1, H, 1, 1] -> [H]: our layout is BLHc, the scale broadcasts over heads only.
    rules.append(stacked_rule("blocks/attn/scale_mul_H", b + "attn.scale_mul_1H11", N,
                              (1, H, 1, 1), lambda x: x.reshape(H)))
  if cfg.shared_aln:
    rules += [
        rule("shared_ada_lin/kernel", "shared_ada_lin.1.weight", (6 * C, C), linear_t),
        rule("shared_ada_lin/bias", "shared_ada_lin.1.bias", (6 * C,)),
        stacked_rule("blocks/ada_gss", b + "ada_gss", N, (1, 1, 6, C),
                     lambda x: x.reshape(6, C)),
    ]
  else:
    rules += [
        stacked_rule("blocks/ada_lin/kernel", b + "ada_lin.1.weight", N, (6 * C, C), linear_t),
        stacked_rule("blocks/ada_lin/bias", b + "ada_lin.1.bias", N, (6 * C,)),
    ]
  return rules


def check_buffers(sd: dict[str, np.ndarray], cfg: configs_lib.VARConfig) -> None:
  """The buffers the model recomputes must hold what it recomputes (when present)."""
  lvl_L = np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(cfg.patch_nums)])
  bad = []
  if "lvl_1L" in sd and not np.array_equal(np.asarray(sd["lvl_1L"]).reshape(-1), lvl_L):
    bad.append("lvl_1L (scale id per token)")
  if "attn_bias_for_masking" in sd:
    a = np.asarray(sd["attn_bias_for_masking"])
    want = lvl_L[:, None] >= lvl_L[None, :]
    if a.size != want.size or not (np.array_equal(a.reshape(want.shape) == 0, want)
                                   and np.all(np.isneginf(a.reshape(want.shape)[~want]))):
      bad.append("attn_bias_for_masking (block-causal mask)")
  nz = [k for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.zero_k_bias", k) and np.any(sd[k])]
  if nz:
    bad.append(f"zero_k_bias is not zero in {nz[:4]}")
  if bad:
    raise ConversionError("the VAR checkpoint's buffers differ from what the model uses: "
                          + "; ".join(bad) + ". The file is not a standard VAR checkpoint.")


def convert_var_tree(sd: dict[str, np.ndarray], *, progress: bool = False):
  """Official VAR state dict -> (VARConfig, nested numpy tree for `VAR`)."""
  cfg = infer_var_config(sd)
  tree = common.apply_rules(sd, var_rules(cfg), ignore=VAR_IGNORE, what="VAR checkpoint",
                            progress=progress)
  check_buffers(sd, cfg)
  return cfg, tree


def convert(var_path: str, vae_path: str, out_dir: str, *, overwrite: bool = False,
            progress: bool = True):
  """The CLI body: returns (VARConfig, VQVAEConfig) after writing `out_dir`."""
  common.check_out_dir(out_dir, overwrite, (var_path, vae_path))  # before the slow part
  log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
  log(f"reading {var_path}")
  var_sd = common.load_state_dict(var_path)
  var_cfg = infer_var_config(var_sd)
  log(f"VAR: depth {var_cfg.depth}, width {var_cfg.embed_dim}, {var_cfg.num_heads} heads, "
      f"vocab {var_cfg.vocab_size}, Cvae {var_cfg.cvae}, shared AdaLN {var_cfg.shared_aln}, "
      f"patch_nums {list(var_cfg.patch_nums)}")
  var_tree = common.apply_rules(var_sd, var_rules(var_cfg), ignore=VAR_IGNORE,
                                what="VAR checkpoint", progress=progress)
  check_buffers(var_sd, var_cfg)
  del var_sd
  from convert import vqvae_rules  # the VQVAE key map lives beside this module
  log(f"reading {vae_path}")
  vae_sd = common.load_state_dict(vae_path)
  vae_cfg = vqvae_rules.infer_vqvae_config(vae_sd, var_cfg.patch_nums)
  if (vae_cfg.vocab_size, vae_cfg.z_channels) != (var_cfg.vocab_size, var_cfg.cvae):
    raise ConversionError(
        f"the VQVAE {vae_path!r} does not match the transformer {var_path!r}: the VQVAE has "
        f"vocabulary {vae_cfg.vocab_size} and {vae_cfg.z_channels} latent channels, the "
        f"transformer expects vocabulary {var_cfg.vocab_size} and {var_cfg.cvae} channels. "
        "Pass the VQVAE the transformer was trained with (vae_ch160v4096z32.pth for the "
        "released VAR models).")
  vae_tree = common.apply_rules(vae_sd, vqvae_rules.vqvae_rules(vae_cfg),
                                ignore=vqvae_rules.VQVAE_IGNORE, what="VQVAE checkpoint",
                                progress=progress)
  common.write_converted(
      out_dir, {"var": var_tree, "vae": vae_tree},
      {"var": configs_lib.config_to_dict(var_cfg), "vae": configs_lib.config_to_dict(vae_cfg)},
      meta={"source": {"var": os.path.basename(var_path), "vae": os.path.basename(vae_path)},
            "converter": "convert.var"},
      overwrite=overwrite, inputs=(var_path, vae_path))
  log(f"wrote {os.path.abspath(out_dir)}")
  return var_cfg, vae_cfg


FLAGS = flags.FLAGS
flags.DEFINE_string("var", None, "official VAR transformer checkpoint (var_dXX.pth)")
flags.DEFINE_string("vae", None, "official VQVAE checkpoint (vae_ch160v4096z32.pth)")
flags.DEFINE_string("out", None, "output directory (must not exist unless --overwrite)")
flags.DEFINE_bool("overwrite", False, "replace an existing --out that is a converted "
                  "checkpoint (never any other folder, nor one holding the inputs)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  missing = [f"--{n}" for n in ("var", "vae", "out") if not getattr(FLAGS, n)]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}. Usage: python -m convert.var "
                         "--var var_d16.pth --vae vae_ch160v4096z32.pth --out DIR")
  common.main_wrapper(lambda: convert(FLAGS.var, FLAGS.vae, FLAGS.out,
                                      overwrite=FLAGS.overwrite))


if __name__ == "__main__":
  app.run(main)
