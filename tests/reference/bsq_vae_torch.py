"""Our own PyTorch reference of Infinity's BSQ autoencoder, with the official state-dict names.

Written from the facts of FoundationVision/Infinity (infinity/models/bsq_vae/flux_vqgan.py,
multiscale_bsq.py, conv.py; bitwise_self_correction.py; the bit path of
`Infinity.autoregressive_infer_cfg`): Conv and GroupNorm wrappers give the keys
`*.conv.weight` / `*.norm.weight`, the quantizer holds `lfq.mask`, exposed as both
`quantizer` and `quantize`. Resizes are called on 5-D (B, C, 1, H, W) tensors with
'trilinear' / 'area' as the official code does. NCHW; tests only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Conv(nn.Module):

  def __init__(self, cin, cout, k, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

  def forward(self, x):
    return self.conv(x)


class Normalize(nn.Module):

  def __init__(self, c):
    super().__init__()
    groups = 32 if c % 32 == 0 else 24
    self.norm = nn.GroupNorm(groups, c, eps=1e-6, affine=True)

  def forward(self, x):
    return self.norm(x)


class ResnetBlock(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = Normalize(cin), Conv(cin, cout, 3, padding=1)
    self.norm2, self.conv2 = Normalize(cout), Conv(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = Conv(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = Conv(c, c, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = Conv(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(c):
  mid = nn.Module()
  mid.block_1, mid.block_2 = ResnetBlock(c, c), ResnetBlock(c, c)
  return mid


class Encoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks, z_channels, patch_size):
    super().__init__()
    max_down = np.log2(patch_size)
    self.conv_in = Conv(3, ch, 3, padding=1)
    in_mult = (1,) + tuple(ch_mult)
    self.down = nn.ModuleList()
    for i in range(len(ch_mult)):
      lvl = nn.Module()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      cin = ch * in_mult[i]
      for _ in range(num_res_blocks):
        lvl.block.append(ResnetBlock(cin, ch * ch_mult[i]))
        cin = ch * ch_mult[i]
      if i < max_down:
        lvl.downsample = Downsample(cin)
      self.down.append(lvl)
    self.mid = _mid(cin)
    self.norm_out, self.conv_out = Normalize(cin), Conv(cin, z_channels, 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for lvl in self.down:
      for blk in lvl.block:
        h = blk(h)
      if hasattr(lvl, "downsample"):
        h = lvl.downsample(h)
    h = self.mid.block_2(self.mid.block_1(h))
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks, z_channels, patch_size):
    super().__init__()
    max_up = np.log2(patch_size)
    cin = ch * ch_mult[-1]
    self.conv_in = Conv(z_channels, cin, 3, padding=1)
    self.mid = _mid(cin)
    ups = []
    for i in reversed(range(len(ch_mult))):
      lvl = nn.Module()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        lvl.block.append(ResnetBlock(cin, ch * ch_mult[i]))
        cin = ch * ch_mult[i]
      if 1 <= i <= max_up:
        lvl.upsample = Upsample(cin)
      ups.insert(0, lvl)
    self.up = nn.ModuleList(ups)
    self.norm_out, self.conv_out = Normalize(cin), Conv(cin, 3, 3, padding=1)

  def forward(self, z):
    h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
    for i in reversed(range(len(self.up))):
      for blk in self.up[i].block:
        h = blk(h)
      if hasattr(self.up[i], "upsample"):
        h = self.up[i].upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class LFQ(nn.Module):
  """BSQ with new_quant and no projections: only the bit-mask buffer."""

  def __init__(self, d):
    super().__init__()
    self.d = d
    self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1))

  def indices_to_codes(self, bits_B1HWd):
    """'bit_label' codes [B, d, 1, H, W]."""
    s = 1 / np.sqrt(self.d)
    codes = F.normalize(bits_B1HWd * s * 2 - s, dim=-1)
    return codes.permute(0, 4, 1, 2, 3)

  def forward(self, z_BdThw):
    x = F.normalize(z_BdThw.permute(0, 2, 3, 4, 1), dim=-1)
    zhat = torch.where(x > 0, torch.tensor(1.0), torch.tensor(-1.0)) * (1.0 / self.d ** 0.5)
    q = x + (zhat - x)
    return q.permute(0, 4, 1, 2, 3), (q > 0).int()  # [B,d,T,h,w], bits [B,T,h,w,d]


class MultiScaleBSQ(nn.Module):

  def __init__(self, d):
    super().__init__()
    self.lfq = LFQ(d)


class AutoEncoder(nn.Module):

  def __init__(self, codebook_dim=32, base_ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2,
               patch_size=16):
    super().__init__()
    args = (base_ch, ch_mult, num_res_blocks, codebook_dim, patch_size)
    self.encoder, self.decoder = Encoder(*args), Decoder(*args)
    self.quantizer = MultiScaleBSQ(codebook_dim)
    self.quantize = self.quantizer

  def decode(self, z):
    return self.decoder(z).clamp(-1, 1)


def sampler_accumulate(vae, bits_list, vae_hws, patchify):
  """The bit path of autoregressive_infer_cfg: transformer bits [B, h*w, K] per scale ->
  (summed codes [B, d, H, W], next-scale inputs [B, h*w, K] per scale but the last)."""
  B = bits_list[0].shape[0]
  final = (1, *vae_hws[-1])
  summed, nexts = 0, []
  for si, bits in enumerate(bits_list):
    h, w = vae_hws[si]
    if patchify:
      x = bits.reshape(B, h // 2, w // 2, -1).permute(0, 3, 1, 2)
      x = F.pixel_shuffle(x, 2).permute(0, 2, 3, 1)
    else:
      x = bits.reshape(B, h, w, -1)
    codes = vae.quantizer.lfq.indices_to_codes(x.unsqueeze(1))
    if si != len(bits_list) - 1:
      summed = summed + F.interpolate(codes, size=final, mode="trilinear")
      nxt = F.interpolate(summed, size=(1, *vae_hws[si + 1]), mode="trilinear").squeeze(-3)
      if patchify:
        nxt = F.pixel_unshuffle(nxt, 2)
      nexts.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
    else:
      summed = summed + codes
  return summed.squeeze(2), nexts


def flip_requant(vae, vae_hws, raw_BdHW, patchify):
  """BitwiseSelfCorrection.flip_requant with noise off: (x_BLC_wo_prefix, labels per scale)."""
  codes_out = raw_BdHW.unsqueeze(2)
  B, d = raw_BdHW.shape[:2]
  cum, xs, labels = 0, [], []
  n = len(vae_hws)
  for si, (h, w) in enumerate(vae_hws):
    residual = codes_out - cum
    if si != n - 1:
      residual = F.interpolate(residual, size=(1, h, w), mode="area")
    quantized, bits = vae.quantizer.lfq(residual)
    cum = cum + F.interpolate(quantized, size=(1, *vae_hws[-1]), mode="trilinear")
    if patchify:
      lab = F.pixel_unshuffle(bits.squeeze(1).permute(0, 3, 1, 2), 2)
      labels.append(lab.permute(0, 2, 3, 1).reshape(B, -1, 4 * d))
    else:
      labels.append(bits.reshape(B, -1, d))
    if si < n - 1:
      nxt = F.interpolate(cum, size=(1, *vae_hws[si + 1]), mode="trilinear").squeeze(-3)
      if patchify:
        nxt = F.pixel_unshuffle(nxt, 2)
      xs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
  return torch.cat(xs, 1), labels


def multiscale_bsq_quantized(vae, vae_hws, raw_BdHW):
  """MultiScaleBSQ.forward's summed output (no projections, no flips/drops): [B, d, H, W]."""
  x = raw_BdHW.unsqueeze(2)
  full = tuple(x.shape[2:])
  residual, out = x, 0
  for h, w in vae_hws:
    r = F.interpolate(residual, size=(1, h, w), mode="area") if (1, h, w) != full else residual
    q, _ = vae.quantizer.lfq(r)
    if (1, h, w) != full:
      q = F.interpolate(q, size=full, mode="trilinear")
    residual = residual - q
    out = out + q
  return out.squeeze(2)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Convs N(0,1)/sqrt(fan_in), conv biases N(0, 0.02), norm weights 1 + N(0, 0.1)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if p.ndim == 4:
      p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    elif ".norm." in name and name.endswith("weight"):
      p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    else:
      p.copy_(0.02 * torch.randn(p.shape, generator=g))
  model.requires_grad_(False)
  return model.eval()
