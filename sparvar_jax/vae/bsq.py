"""Infinity's BSQ autoencoder (FoundationVision/Infinity infinity/models/bsq_vae) in Flax NNX.

A Flux-style CNN encoder/decoder (no attention, no quant convs) around a parameter-free
multi-scale binary spherical quantizer. Layout: NHWC; the VAE latent / summed codes are
[B, H, W, d] with d = codebook_dim (32 for d32reg, 14 for d56_f8_14_patchify).

Tokens vs VAE grid. The transformer predicts `bits_per_token` bits per token on its own
(h, w) grid. Without patchify that is the VAE grid and bits_per_token = d. With 2x2
spatial patchify (the 8B model) the VAE grid is (2h, 2w) and a token holds the 4d bits of
a 2x2 cell in PyTorch pixel_unshuffle order: token channel c*4 + a*2 + b is VAE cell
(2i+a, 2j+b), channel c.

Per scale (Infinity `autoregressive_infer_cfg`, bitwise tokens):
  codes  = bits_to_codes(bits)                         [B, H_si, W_si, d]
  summed = add_scale_codes(summed, codes, si, is_last)  bilinear up to the final grid
  x_next = next_scale_input(summed, next_token_hw)      [B, h*w, bits_per_token]
  img    = decode(summed)                               [B, H*s, W*s, 3] in [-1, 1]
All resizes are PyTorch-exact bilinear without antialiasing ('trilinear' on depth 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax.configs import BSQVAEConfig
from sparvar_jax.resize import resize_hw
from sparvar_jax.vae import layers

HW = tuple[int, int]


def pixel_shuffle_nhwc(x_BhwK: jax.Array, r: int = 2) -> jax.Array:
  """torch.nn.functional.pixel_shuffle in NHWC: [B, h, w, C*r*r] -> [B, h*r, w*r, C].

  Input channel c*r*r + a*r + b lands at output (r*i + a, r*j + b), channel c.
  """
  B, h, w, K = x_BhwK.shape
  C = K // (r * r)
  x = x_BhwK.reshape(B, h, w, C, r, r).transpose(0, 1, 4, 2, 5, 3)  # B h a w b C
  return x.reshape(B, h * r, w * r, C)


def pixel_unshuffle_nhwc(x_BHWC: jax.Array, r: int = 2) -> jax.Array:
  """torch.nn.functional.pixel_unshuffle in NHWC: [B, H, W, C] -> [B, H/r, W/r, C*r*r]."""
  B, H, W, C = x_BHWC.shape
  x = x_BHWC.reshape(B, H // r, r, W // r, r, C).transpose(0, 1, 3, 5, 2, 4)  # B h w C a b
  return x.reshape(B, H // r, W // r, C * r * r)


def _l2norm(x: jax.Array) -> jax.Array:
  """F.normalize(x, dim=-1): x / max(|x|_2, 1e-12)."""
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(n, 1e-12)


def codes_from_vae_bits(bits_BHWd: jax.Array) -> jax.Array:
  """`lfq.indices_to_codes(bits, 'bit_label')`: (2*bit - 1)/sqrt(d), then L2-normalised.

  The scale is rounded to float32 first, as torch does with the float64 `codebook_scale`.
  """
  d = bits_BHWd.shape[-1]
  s = np.float32(1 / np.sqrt(d))
  codes = jnp.where(bits_BHWd.astype(jnp.int32) > 0, s, -s).astype(jnp.float32)
  return _l2norm(codes)


def lfq(residual_BhwD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """BSQ's `forward` (new_quant, no projection): (quantized float32, bits int32).

  x = l2norm(residual); zhat = sign(x)/sqrt(d) (x == 0 -> -1); quantized keeps the
  straight-through form x + (zhat - x), whose float32 value is what Infinity adds up.
  """
  d = residual_BhwD.shape[-1]
  x = _l2norm(residual_BhwD.astype(jnp.float32))
  zhat = jnp.where(x > 0, 1.0, -1.0).astype(jnp.float32) * np.float32(1 / d ** 0.5)
  quantized = x + (zhat - x)
  return quantized, (quantized > 0).astype(jnp.int32)


class BSQVAE(nnx.Module):
  """Encoder + decoder of `infinity_vae_d32reg` / `infinity_vae_d56_f8_14_patchify`."""

  def __init__(self, cfg: BSQVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(ch=cfg.base_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              z_channels=cfg.codebook_dim, using_attn=False, rngs=rngs)
    self.encoder = layers.Encoder(**kw)
    self.decoder = layers.Decoder(**kw)

  # ---- token <-> VAE grid ------------------------------------------------------------

  @property
  def patch(self) -> int:
    return 2 if self.cfg.apply_spatial_patchify else 1

  def vae_hw(self, token_hw: HW) -> HW:
    return (token_hw[0] * self.patch, token_hw[1] * self.patch)

  def tokens_to_vae_grid(self, x_BhwK: jax.Array) -> jax.Array:
    """[B, h, w, bits_per_token] -> [B, H, W, d] (pixel_shuffle with patchify)."""
    return pixel_shuffle_nhwc(x_BhwK) if self.cfg.apply_spatial_patchify else x_BhwK

  def vae_grid_to_tokens(self, x_BHWd: jax.Array) -> jax.Array:
    """[B, H, W, d] -> [B, h, w, bits_per_token] (pixel_unshuffle with patchify)."""
    return pixel_unshuffle_nhwc(x_BHWd) if self.cfg.apply_spatial_patchify else x_BHWd

  # ---- sampler helpers ----------------------------------------------------------------

  def bits_to_codes(self, bits_BhwD: jax.Array) -> jax.Array:
    """Transformer bits [B, h, w, bits_per_token] (0/1) -> codes [B, H, W, d] float32."""
    if bits_BhwD.shape[-1] != self.cfg.bits_per_token:
      raise ValueError(f"expected {self.cfg.bits_per_token} bits per token, got "
                       f"{bits_BhwD.shape[-1]}")
    return codes_from_vae_bits(self.tokens_to_vae_grid(bits_BhwD))

  def add_scale_codes(self, summed_BHWd: jax.Array, codes_BhwD: jax.Array, si: int,
                      is_last: bool) -> jax.Array:
    """summed += codes, bilinearly resized to the final grid unless `is_last`.

    summed_BHWd: [B, H, W, d] (zeros before scale 0); codes: [B, H_si, W_si, d] on the VAE
    grid. `si` names the scale for error messages; the arithmetic depends on is_last only.
    """
    H, W = summed_BHWd.shape[1:3]
    if is_last:
      if codes_BhwD.shape[1:3] != (H, W):
        raise ValueError(f"scale {si} is the last but its codes grid {codes_BhwD.shape[1:3]} "
                         f"is not the final grid {(H, W)}")
      return summed_BHWd + codes_BhwD
    return summed_BHWd + resize_hw(codes_BhwD, (H, W), "bilinear")

  def next_scale_input(self, summed_BHWd: jax.Array, next_hw: HW) -> jax.Array:
    """The next scale's transformer input [B, h*w, bits_per_token] (before word_embed).

    next_hw is the next scale's TOKEN grid (h, w); the summed codes are resized (bilinear,
    no antialias) to the VAE grid of that scale, then pixel-unshuffled for patchify.
    """
    x = self.vae_grid_to_tokens(resize_hw(summed_BHWd, self.vae_hw(next_hw), "bilinear"))
    B, h, w, K = x.shape
    return x.reshape(B, h * w, K)

  def decode(self, summed_BHWd: jax.Array) -> jax.Array:
    """decoder(z).clamp(-1, 1): [B, H, W, d] -> [B, H*s, W*s, 3] (no post-quant conv)."""
    return jnp.clip(self.decoder(summed_BHWd), -1.0, 1.0)

  # ---- encoder path ---------------------------------------------------------------------

  def encode(self, img_BHW3: jax.Array) -> jax.Array:
    """`encode_for_raw_features`: image [B, H, W, 3] in [-1, 1] -> raw features [B, H/s, W/s, d]."""
    return self.encoder(img_BHW3).astype(jnp.float32)

  def _residual_scales(self, raw_BHWd: jax.Array, vae_hws: Sequence[HW]):
    """Residual quantisation, small to large; yields (bits_BhwD, cum_BHWd) per scale.

    residual = raw - cum, area-down to the scale (identity at full size); lfq; cum +=
    bilinear-up(quantized). Shared by MultiScaleBSQ.forward and flip_requant.
    """
    H, W = raw_BHWd.shape[1:3]
    if tuple(vae_hws[-1]) != (H, W):
      raise ValueError(f"the last VAE scale {tuple(vae_hws[-1])} must be the latent grid {(H, W)}")
    cum = jnp.zeros_like(raw_BHWd)
    for hw in vae_hws:
      residual = resize_hw(raw_BHWd - cum, tuple(hw), "area")
      quantized, bits = lfq(residual)
      cum = cum + resize_hw(quantized, (H, W), "bilinear")
      yield bits, cum

  def quantize_multiscale(self, raw_BHWd: jax.Array, vae_hws: Sequence[HW]
                          ) -> tuple[list[jax.Array], jax.Array]:
    """`MultiScaleBSQ.forward` (inference): per-scale bits [B, H_si, W_si, d] int32 on the
    VAE grid and the summed quantized latent [B, H, W, d]."""
    bits, cum = [], None
    for b, cum in self._residual_scales(raw_BHWd, vae_hws):
      bits.append(b)
    return bits, cum

  def teacher_forcing_input(self, raw_BHWd: jax.Array, vae_hws: Sequence[HW]
                            ) -> tuple[jax.Array, list[jax.Array]]:
    """`BitwiseSelfCorrection.flip_requant` without bit flips (the training input).

    Returns x_BLC_wo_prefix [B, L - l0, bits_per_token] (next-scale inputs of scales
    1..K-1, bilinear from the running sum) and the clean labels per scale
    [B, h*w, bits_per_token] int32 in token layout.
    """
    xs, labels = [], []
    n = len(vae_hws)
    for si, (bits, cum) in enumerate(self._residual_scales(raw_BHWd, vae_hws)):
      tok = self.vae_grid_to_tokens(bits)
      labels.append(tok.reshape(tok.shape[0], -1, tok.shape[-1]))
      if si < n - 1:
        nh, nw = vae_hws[si + 1]
        xs.append(self.next_scale_input(cum, (nh // self.patch, nw // self.patch)))
    return jnp.concatenate(xs, axis=1), labels
