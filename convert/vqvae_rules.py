"""Key map for VAR's multi-scale VQVAE (vae_ch160v4096z32.pth): config from shapes, strict rules.

JAX tree (sparvar_jax/vae/var_vqvae.py): `encoder/...`, `decoder/...` (see cnn_rules),
`quant_conv`, `post_quant_conv`, `quantize/codebook` [V, Cvae] and `quantize/phi/{k}/conv`.

`quantize.ema_vocab_hit_SV` is ignored (present or absent): it is a training statistic
(an EMA of code usage per scale) that no inference path reads, and the official loader
itself overwrites it when its scale count differs. Nothing is lost by dropping it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convert.cnn_rules import count_indexed, decoder_rules, encoder_rules, plain_conv_rules
from convert.common import ConversionError, Rule, apply_rules, rule
from sparvar_jax.configs import VQVAEConfig

VQVAE_IGNORE = (r"quantize\.ema_vocab_hit_SV",)

_PHI_KEYS = {  # share_quant_resi -> key template of the k-th phi conv
    "partial": "quantize.quant_resi.qresi_ls.{}.weight",
    "shared": "quantize.quant_resi.qresi.weight",
    "nonshared": "quantize.quant_resi.{}.weight",
}


def _need(sd, key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise ConversionError(
        f"{key!r} is missing, so this is not a VAR VQVAE state dict ({what}). Pass the "
        "official vae_ch160v4096z32.pth (a plain state dict).")
  return sd[key]


def infer_vqvae_config(sd: dict[str, np.ndarray], patch_nums: Sequence[int]) -> VQVAEConfig:
  """Reads vocab, Cvae, ch, ch_mult, num_res_blocks and the phi sharing from tensor shapes."""
  vocab, cvae = _need(sd, "quantize.embedding.weight", "the codebook").shape
  ch = _need(sd, "encoder.conv_in.weight", "the first conv").shape[0]
  n_levels = count_indexed(sd, "encoder.down.{}.block.0.conv1.weight")
  num_res_blocks = count_indexed(sd, "encoder.down.0.block.{}.conv1.weight")
  if n_levels == 0 or num_res_blocks == 0:
    raise ConversionError("no encoder.down.{i}.block.{j}.conv1.weight keys: not a VAR VQVAE "
                          "state dict.")
  ch_mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch
                  for i in range(n_levels))
  n_partial = count_indexed(sd, "quantize.quant_resi.qresi_ls.{}.weight")
  n_nonshared = count_indexed(sd, "quantize.quant_resi.{}.weight")
  quant_resi = 0.5  # the official value; a ratio is not stored in the weights
  if n_partial:
    share = n_partial
  elif _PHI_KEYS["shared"] in sd:
    share = 1
  elif n_nonshared:
    if n_nonshared != len(patch_nums):
      raise ConversionError(f"the VQVAE has {n_nonshared} non-shared phi convs but "
                            f"{len(patch_nums)} scales ({tuple(patch_nums)}); pass the "
                            "patch_nums it was trained with.")
    share = 0
  else:  # quant_resi ~ 0: phi is the identity and has no weights
    share, quant_resi = 4, 0.0
  try:
    return VQVAEConfig(vocab_size=int(vocab), z_channels=int(cvae), ch=int(ch), ch_mult=ch_mult,
                       num_res_blocks=num_res_blocks, share_quant_resi=share,
                       quant_resi=quant_resi, patch_nums=tuple(int(p) for p in patch_nums))
  except ValueError as e:
    raise ConversionError(f"the VQVAE's shapes give an unsupported config: {e}") from e


def vqvae_rules(cfg: VQVAEConfig) -> list[Rule]:
  """Every tensor of the official VQVAE state dict (except ema_vocab_hit_SV) -> JAX path."""
  arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              z_channels=cfg.z_channels, using_attn=True, wrapped=False)
  z = cfg.z_channels
  rs = encoder_rules(**arch) + decoder_rules(**arch)
  rs += plain_conv_rules("quant_conv", "quant_conv", z, z, 3)
  rs += plain_conv_rules("post_quant_conv", "post_quant_conv", z, z, 3)
  rs.append(rule("quantize/codebook", "quantize.embedding.weight", (cfg.vocab_size, z)))
  if abs(cfg.quant_resi) > 1e-6:
    if cfg.share_quant_resi == 1:
      keys = ["quantize.quant_resi.qresi"]
    elif cfg.share_quant_resi == 0:
      keys = [f"quantize.quant_resi.{k}" for k in range(len(cfg.patch_nums))]
    else:
      keys = [f"quantize.quant_resi.qresi_ls.{k}" for k in range(cfg.share_quant_resi)]
    for k, key in enumerate(keys):
      rs += plain_conv_rules(f"quantize/phi/{k}/conv", key, z, z, 3)
  return rs


def convert_vqvae_state_dict(sd: dict[str, np.ndarray], cfg: VQVAEConfig, *,
                             what: str = "VQVAE checkpoint", progress: bool = False) -> dict:
  """JAX pure-dict tree from an official VQVAE state dict; strict (see apply_rules)."""
  return apply_rules(sd, vqvae_rules(cfg), ignore=VQVAE_IGNORE, what=what, progress=progress)
