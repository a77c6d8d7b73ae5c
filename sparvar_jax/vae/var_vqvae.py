"""VAR's multi-scale VQVAE (FoundationVision/VAR models/vqvae.py, quant.py) in Flax NNX.

Layout: images are NHWC in [-1, 1]; the latent f / f_hat is [B, H, W, Cvae] at the last
scale's grid (H = W = patch_nums[-1]); per-scale token indices are raster order
[B, pn*pn] int32, so `x_BhwC.reshape(B, h*w, C)` is PyTorch's `x_BChw.flatten(2).mT`.

The quantizer keeps the official arithmetic: nearest code by |z|^2 + |e|^2 - 2 z.e
(first index on ties), 'area' down / 'bicubic' up with PyTorch-exact matrices, and
phi_k(h) = (1-r) h + r conv_k(h) with the conv chosen per scale by the official
tick rule (`phi_index`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax.configs import VQVAEConfig
from sparvar_jax.resize import resize_hw
from sparvar_jax.vae import layers

# The released 10-scale models with share_quant_resi=4. Scales 2 and 7 are exact ties in
# real arithmetic (|2/9 - 1/4| = |2/9 - 7/36|); float64 argmin resolves them as here.
PHI_INDEX_10_SCALES_4 = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def num_phi(cfg: VQVAEConfig) -> int:
  """Number of phi convs: 0 if quant_resi is ~0 (identity), else per share_quant_resi."""
  if abs(cfg.quant_resi) <= 1e-6:
    return 0
  if cfg.share_quant_resi == 0:  # PhiNonShared: one per scale (default_qresi_counts=0)
    return len(cfg.patch_nums)
  return cfg.share_quant_resi  # 1: PhiShared; >= 2: PhiPartiallyShared


@functools.lru_cache(maxsize=None)
def phi_index(si: int, num_scales: int, k: int) -> int:
  """Which of k phi convs scale si uses: official argmin |ticks - si/(SN-1)| in float64.

  ticks = linspace(1/(3K), 1-1/(3K), K) for K == 4, else linspace(1/(2K), 1-1/(2K), K)
  (quant.py PhiPartiallyShared / PhiNonShared); PhiShared (K == 1) always uses conv 0.
  """
  if k <= 1:
    return 0
  if num_scales < 2:
    raise ValueError("the phi schedule needs at least 2 scales (si / (SN-1))")
  if k == 4 and num_scales == 10:
    return PHI_INDEX_10_SCALES_4[si]
  ticks = (np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4
           else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k))
  return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class Phi(nnx.Module):
  """phi(h) = (1 - r) h + r conv3x3(h), r = |quant_resi|."""

  def __init__(self, channels: int, ratio: float, *, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, rngs=rngs)
    self.ratio = abs(ratio)

  def __call__(self, h_BHWC: jax.Array) -> jax.Array:
    return h_BHWC * (1 - self.ratio) + self.conv(h_BHWC) * self.ratio


class Quantizer(nnx.Module):
  """VectorQuantizer2's inference state: the codebook and the phi convs."""

  def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
    self.codebook = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.z_channels), jnp.float32)
        / cfg.vocab_size)
    self.phi = nnx.List([Phi(cfg.z_channels, cfg.quant_resi, rngs=rngs)
                         for _ in range(num_phi(cfg))])

  def apply_phi(self, si: int, num_scales: int, h_BHWC: jax.Array) -> jax.Array:
    if not len(self.phi):
      return h_BHWC
    return self.phi[phi_index(si, num_scales, len(self.phi))](h_BHWC)


class VQVAE(nnx.Module):
  """Encoder, decoder, quant_conv/post_quant_conv and the multi-scale quantizer."""

  def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              z_channels=cfg.z_channels, using_attn=True, rngs=rngs)
    self.encoder = layers.Encoder(**kw)
    self.decoder = layers.Decoder(**kw)
    self.quant_conv = layers.conv(cfg.z_channels, cfg.z_channels, 3, rngs=rngs)
    self.post_quant_conv = layers.conv(cfg.z_channels, cfg.z_channels, 3, rngs=rngs)
    self.quantize = Quantizer(cfg, rngs=rngs)

  # ---- small pieces ------------------------------------------------------------------

  @property
  def codebook(self) -> jax.Array:
    """[V, Cvae] float32; `probs_BlV @ codebook` is the Gumbel (more_smooth) embedding."""
    return self.quantize.codebook[...]

  @property
  def num_scales(self) -> int:
    return len(self.cfg.patch_nums)

  def embed(self, idx_Bl: jax.Array) -> jax.Array:
    """Codebook lookup: [B, l] int -> [B, l, Cvae]."""
    return jnp.take(self.codebook, idx_Bl, axis=0)

  def _grid(self, h_BlC: jax.Array) -> jax.Array:
    B, l, C = h_BlC.shape
    pn = round(l ** 0.5)
    if pn * pn != l:
      raise ValueError(f"token count {l} is not a square grid")
    return h_BlC.reshape(B, pn, pn, C)

  def _up(self, h_BhwC: jax.Array) -> jax.Array:
    H = self.cfg.patch_nums[-1]
    return resize_hw(h_BhwC, (H, H), "bicubic")

  # ---- encoding ------------------------------------------------------------------------

  def img_to_f(self, img_BHW3: jax.Array) -> jax.Array:
    """quant_conv(encoder(img)): [B, H*16, W*16, 3] in [-1, 1] -> f [B, H, W, Cvae]."""
    return self.quant_conv(self.encoder(img_BHW3))

  def f_to_idx(self, f_BHWC: jax.Array) -> list[jax.Array]:
    """Official `f_to_idxBl_or_fhat(to_fhat=False)`: residual quantisation, small to large."""
    pns = self.cfg.patch_nums
    SN = len(pns)
    B, H, W, C = f_BHWC.shape
    if (H, W) != (pns[-1], pns[-1]):
      raise ValueError(f"latent grid {(H, W)} != last patch_num {pns[-1]}: the image must be "
                       f"{pns[-1] * self.cfg.downsample}px square")
    e_VC = self.codebook
    e_sq_V = jnp.sum(jnp.square(e_VC), axis=1)
    f_rest = f_BHWC
    idx_list = []
    for si, pn in enumerate(pns):
      z_BhwC = resize_hw(f_rest, (pn, pn), "area") if si != SN - 1 else f_rest
      z_NC = z_BhwC.reshape(-1, C)
      d_NV = (jnp.sum(jnp.square(z_NC), axis=1, keepdims=True) + e_sq_V
              - 2 * jnp.einsum("NC,VC->NV", z_NC, e_VC, precision=jax.lax.Precision.HIGHEST))
      idx_N = jnp.argmin(d_NV, axis=1).astype(jnp.int32)
      h_BhwC = jnp.take(e_VC, idx_N, axis=0).reshape(B, pn, pn, C)
      if si != SN - 1:
        h_BhwC = self._up(h_BhwC)
      f_rest = f_rest - self.quantize.apply_phi(si, SN, h_BhwC)
      idx_list.append(idx_N.reshape(B, pn * pn))
    return idx_list

  def img_to_idx(self, img_BHW3: jax.Array) -> list[jax.Array]:
    """Official `img_to_idxBl`: image [B, H, W, 3] in [-1, 1] -> per scale [B, pn*pn] int32."""
    return self.f_to_idx(self.img_to_f(img_BHW3))

  # ---- from indices ----------------------------------------------------------------------

  def idx_to_var_input(self, idx_list: list[jax.Array]) -> jax.Array:
    """Official `idxBl_to_var_input`: teacher-forcing input [B, L - pn0^2, Cvae] float32.

    For si < SN-1: f_hat += phi(bicubic_up(embed(idx_si))), then area-down f_hat to the
    next scale; the first scale (the class token's slot) has no input.
    """
    pns = self.cfg.patch_nums
    SN = len(pns)
    B = idx_list[0].shape[0]
    H = pns[-1]
    f_hat = jnp.zeros((B, H, H, self.cfg.z_channels), jnp.float32)
    nexts = []
    for si in range(SN - 1):
      h_BHWC = self._up(self._grid(self.embed(idx_list[si])))
      f_hat = f_hat + self.quantize.apply_phi(si, SN, h_BHWC)
      nxt = resize_hw(f_hat, (pns[si + 1], pns[si + 1]), "area")
      nexts.append(nxt.reshape(B, -1, self.cfg.z_channels))
    return jnp.concatenate(nexts, axis=1)

  def idx_to_fhat(self, idx_list: list[jax.Array]) -> jax.Array:
    """Official `embed_to_fhat(all_to_max_scale=True, last_one=True)`: f_hat [B, H, W, C]."""
    SN = len(idx_list)
    if SN != self.num_scales:
      raise ValueError(f"got {SN} scales of indices, the VQVAE has {self.num_scales}")
    f_hat = None
    for si, idx_Bl in enumerate(idx_list):
      h = self._grid(self.embed(idx_Bl))
      if si < SN - 1:
        h = self._up(h)
      h = self.quantize.apply_phi(si, SN, h)
      f_hat = h if f_hat is None else f_hat + h
    return f_hat

  def idx_to_img(self, idx_list: list[jax.Array]) -> jax.Array:
    """Official `idxBl_to_img(same_shape=True, last_one=True)`: image [B, H, W, 3] in [-1, 1]."""
    return self.fhat_to_img(self.idx_to_fhat(idx_list))

  def next_autoregressive_input(self, si: int, f_hat_BHWC: jax.Array, h_BhwC: jax.Array
                                ) -> tuple[jax.Array, jax.Array | None]:
    """Official `get_next_autoregressive_input` (si static).

    Not last: f_hat += phi(bicubic_up(h)); next = area_down(f_hat, pn_{si+1}) [B, pn, pn, C].
    Last: f_hat += phi(h) (no resize) and next is None.
    """
    SN = self.num_scales
    if si != SN - 1:
      f_hat = f_hat_BHWC + self.quantize.apply_phi(si, SN, self._up(h_BhwC))
      pn = self.cfg.patch_nums[si + 1]
      return f_hat, resize_hw(f_hat, (pn, pn), "area")
    return f_hat_BHWC + self.quantize.apply_phi(si, SN, h_BhwC), None

  def fhat_to_img(self, f_hat_BHWC: jax.Array) -> jax.Array:
    """decoder(post_quant_conv(f_hat)).clamp(-1, 1): [B, H*16, W*16, 3]."""
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BHWC)), -1.0, 1.0)
