"""Key map for Infinity's BSQ autoencoder (infinity_vae_d32reg.pth, infinity_vae_d56_f8_14_patchify.pth).

The official file is `{'vae': state_dict}` with the model-side (wrapped) names:
`encoder.conv_in.conv.weight`, `...norm1.norm.weight`, `...downsample.conv.conv.weight`.
Infinity's `load_cnn` also accepts the plain names (`encoder.conv_in.weight`,
`...norm1.weight`); so do we: plain keys are renamed to the wrapped form first, and a
tensor given in both forms is an error. The only buffer is the bit mask
`quantizer.lfq.mask` (= 2**arange(d-1..0)), stored twice because the AutoEncoder aliases
`quantize = quantizer`; both copies are checked against d and not converted.

JAX tree (sparvar_jax/vae/bsq.py): `encoder/...`, `decoder/...` as in cnn_rules.
"""

from __future__ import annotations

import numpy as np

from convert.cnn_rules import decoder_rules, encoder_rules
from convert.common import ConversionError, Rule, apply_rules
from sparvar_jax.configs import BSQVAEConfig

IGNORE = (r"quantizer\.lfq\.mask", r"quantize\.lfq\.mask")
MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def unwrap_bsq_state_dict(sd: dict) -> dict[str, np.ndarray]:
  """Accepts `{'vae': sd}`, a dict flattened to `vae.*` keys, or the bare state dict."""
  if "vae" in sd and isinstance(sd["vae"], dict):
    sd = sd["vae"]
  if sd and all(k.startswith("vae.") for k in sd):
    sd = {k[len("vae."):]: v for k, v in sd.items()}
  return sd


def _plain_name(wrapped_key: str) -> str:
  for suffix in (".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias"):
    if wrapped_key.endswith(suffix):
      return wrapped_key[: -len(suffix)] + suffix[suffix.rindex("."):]
  return wrapped_key


def canonical_keys(sd: dict[str, np.ndarray], rules: list[Rule]) -> dict[str, np.ndarray]:
  """Renames plain keys (`x.weight`) to the wrapped form (`x.conv.weight`) the rules use."""
  wrapped = [k for r in rules for k in r.keys]
  plain_to_wrapped = {_plain_name(k): k for k in wrapped}
  out, both = {}, []
  for k, v in sd.items():
    target = k if k in wrapped else plain_to_wrapped.get(k, k)
    if target in out:
      both.append(target)
    out[target] = v
  if both:
    raise ConversionError(
        f"the BSQ VAE state dict holds {len(both)} tensors under both the plain and the "
        f"wrapped name (e.g. {both[0]!r}); keep one form.")
  return out


def _get(sd, key: str) -> np.ndarray | None:
  """A tensor by its wrapped key, or by its plain key."""
  if key in sd:
    return sd[key]
  return sd.get(_plain_name(key))


def infer_bsq_config(sd: dict, apply_spatial_patchify: bool | None = None) -> BSQVAEConfig:
  """codebook_dim, base_ch, ch_mult and num_res_blocks from tensor shapes (either key form).

  apply_spatial_patchify is not stored in the VAE; None infers it from the released
  pairing: stride 8 (4 levels, d56_f8_14_patchify for the 8B) patchifies, stride 16 not.
  """
  sd = unwrap_bsq_state_dict(sd)
  w_in = _get(sd, "encoder.conv_in.conv.weight")
  w_out = _get(sd, "encoder.conv_out.conv.weight")
  if w_in is None or w_out is None:
    raise ConversionError(
        "encoder.conv_in / encoder.conv_out weights are missing, so this is not an Infinity "
        "BSQ VAE state dict. Pass infinity_vae_d32reg.pth (2B) or "
        "infinity_vae_d56_f8_14_patchify.pth (8B).")
  base_ch, d = int(w_in.shape[0]), int(w_out.shape[0])

  def levels(side: str, block: str) -> tuple[int, ...]:
    n = 0
    mult = []
    while (w := _get(sd, f"{side}.{n}.{block}.0.conv1.conv.weight")) is not None:
      mult.append(int(w.shape[0]) // base_ch)
      n += 1
    return tuple(mult)

  ch_mult = levels("encoder.down", "block")
  dec_mult = levels("decoder.up", "block")
  if not ch_mult or ch_mult != dec_mult:
    raise ConversionError(f"encoder levels {ch_mult} and decoder levels {dec_mult} differ or "
                          "are missing; this converter supports encoder_ch_mult == "
                          "decoder_ch_mult (all released tokenizers).")
  num_res_blocks = sum(1 for j in range(64)
                       if _get(sd, f"encoder.down.0.block.{j}.conv1.conv.weight") is not None)
  for key in MASK_KEYS:
    if key in sd:
      mask = np.asarray(sd[key])
      if mask.shape != (d,) or not np.array_equal(mask, 2 ** np.arange(d - 1, -1, -1)):
        raise ConversionError(f"{key!r} is not the bit mask 2**arange({d - 1}..0) of a "
                              f"{d}-bit BSQ (shape {mask.shape}); the file is damaged or not "
                              "an Infinity VAE.")
  if apply_spatial_patchify is None:
    apply_spatial_patchify = len(ch_mult) == 4
  return BSQVAEConfig(codebook_dim=d, base_ch=base_ch, ch_mult=ch_mult,
                      num_res_blocks=num_res_blocks,
                      apply_spatial_patchify=bool(apply_spatial_patchify))


def bsq_rules(cfg: BSQVAEConfig) -> list[Rule]:
  """Every conv/norm tensor (wrapped key form) -> JAX path."""
  arch = dict(ch=cfg.base_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              z_channels=cfg.codebook_dim, using_attn=False, wrapped=True)
  return encoder_rules(**arch) + decoder_rules(**arch)


def convert_bsq_state_dict(sd: dict, cfg: BSQVAEConfig | None = None, *,
                           what: str = "BSQ VAE checkpoint", progress: bool = False) -> dict:
  """JAX pure-dict tree from an official BSQ VAE state dict (either key form); strict."""
  sd = unwrap_bsq_state_dict(sd)
  cfg = cfg or infer_bsq_config(sd)
  rules = bsq_rules(cfg)
  return apply_rules(canonical_keys(sd, rules), rules, ignore=IGNORE, what=what,
                     progress=progress)
