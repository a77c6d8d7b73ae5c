"""Our own PyTorch reference of VAR's multi-scale VQVAE, with the official state-dict names.

Written from the facts of FoundationVision/VAR (models/vqvae.py, quant.py, basic_vae.py):
same module tree and key names (`encoder.down.{i}.block.{j}.norm1.weight`,
`quantize.quant_resi.qresi_ls.{k}.weight`, `quantize.ema_vocab_hit_SV`, ...), same
arithmetic, NCHW. Used only by tests, never by the library.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _gn(c):
  return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, 1, 1)
    self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.norm, self.qkv, self.proj_out = _gn(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

  def forward(self, x):
    B, C, H, W = x.shape
    q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=-1)
    h = torch.einsum("bij,bcj->bci", attn, v).reshape(B, C, H, W)
    return x + self.proj_out(h)


class Downsample2x(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(c):
  mid = nn.Module()
  mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
  return mid


class Encoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
    super().__init__()
    n = len(ch_mult)
    self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
    in_mult = (1,) + tuple(ch_mult)
    self.down = nn.ModuleList()
    for i in range(n):
      lvl = nn.Module()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      cin = ch * in_mult[i]
      for _ in range(num_res_blocks):
        lvl.block.append(ResnetBlock(cin, ch * ch_mult[i]))
        cin = ch * ch_mult[i]
        if i == n - 1:
          lvl.attn.append(AttnBlock(cin))
      if i != n - 1:
        lvl.downsample = Downsample2x(cin)
      self.down.append(lvl)
    self.mid = _mid(cin)
    self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, z_channels, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for i, lvl in enumerate(self.down):
      for j, blk in enumerate(lvl.block):
        h = blk(h)
        if len(lvl.attn):
          h = lvl.attn[j](h)
      if hasattr(lvl, "downsample"):
        h = lvl.downsample(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
    super().__init__()
    n = len(ch_mult)
    cin = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
    self.mid = _mid(cin)
    ups = []
    for i in reversed(range(n)):
      lvl = nn.Module()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        lvl.block.append(ResnetBlock(cin, ch * ch_mult[i]))
        cin = ch * ch_mult[i]
        if i == n - 1:
          lvl.attn.append(AttnBlock(cin))
      if i != 0:
        lvl.upsample = Upsample2x(cin)
      ups.insert(0, lvl)
    self.up = nn.ModuleList(ups)
    self.norm_out, self.conv_out = _gn(cin), nn.Conv2d(cin, 3, 3, 1, 1)

  def forward(self, z):
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
    for i in reversed(range(len(self.up))):
      lvl = self.up[i]
      for j, blk in enumerate(lvl.block):
        h = blk(h)
        if len(lvl.attn):
          h = lvl.attn[j](h)
      if hasattr(lvl, "upsample"):
        h = lvl.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):

  def __init__(self, c, ratio):
    super().__init__(c, c, 3, 1, 1)
    self.ratio = abs(ratio)

  def forward(self, h):
    return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiPartiallyShared(nn.Module):

  def __init__(self, phis):
    super().__init__()
    self.qresi_ls = nn.ModuleList(phis)
    K = len(phis)
    self.ticks = (np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4
                  else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K))

  def __getitem__(self, at: float):
    return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class VectorQuantizer(nn.Module):

  def __init__(self, vocab_size, cvae, patch_nums, quant_resi, share_quant_resi):
    super().__init__()
    assert share_quant_resi >= 2, "reference covers the partially shared phi only"
    self.patch_nums, self.cvae = tuple(patch_nums), cvae
    self.quant_resi = PhiPartiallyShared([Phi(cvae, quant_resi) for _ in range(share_quant_resi)])
    self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))
    self.embedding = nn.Embedding(vocab_size, cvae)

  def phi(self, si):
    return self.quant_resi[si / (len(self.patch_nums) - 1)]

  def f_to_idxBl(self, f):
    B, C, H, W = f.shape
    f_rest, SN = f.clone(), len(self.patch_nums)
    e = self.embedding.weight
    out = []
    for si, pn in enumerate(self.patch_nums):
      z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
      z = z.permute(0, 2, 3, 1).reshape(-1, C)
      d = z.square().sum(1, keepdim=True) + e.square().sum(1)
      d = torch.addmm(d, z, e.T, alpha=-2, beta=1)
      idx = d.argmin(1)
      h = self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
      if si != SN - 1:
        h = F.interpolate(h, size=(H, W), mode="bicubic")
      f_rest = f_rest - self.phi(si)(h)
      out.append(idx.reshape(B, pn * pn))
    return out

  def idxBl_to_var_input(self, idx_list):
    B, C, H = idx_list[0].shape[0], self.cvae, self.patch_nums[-1]
    f_hat = torch.zeros(B, C, H, H)
    nexts = []
    for si in range(len(self.patch_nums) - 1):
      pn = self.patch_nums[si]
      h = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, C, pn, pn)
      f_hat = f_hat + self.phi(si)(F.interpolate(h, size=(H, H), mode="bicubic"))
      nxt = self.patch_nums[si + 1]
      nexts.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(nexts, 1)

  def idxBl_to_fhat(self, idx_list):
    B, C, H = idx_list[0].shape[0], self.cvae, self.patch_nums[-1]
    f_hat = torch.zeros(B, C, H, H)
    SN = len(self.patch_nums)
    for si, idx in enumerate(idx_list):
      pn = self.patch_nums[si]
      h = self.embedding(idx).transpose(1, 2).reshape(B, C, pn, pn)
      if si < SN - 1:
        h = F.interpolate(h, size=(H, H), mode="bicubic")
      f_hat = f_hat + self.phi(si)(h)
    return f_hat

  def get_next_autoregressive_input(self, si, f_hat, h_BChw):
    H, SN = self.patch_nums[-1], len(self.patch_nums)
    if si != SN - 1:
      f_hat = f_hat + self.phi(si)(F.interpolate(h_BChw, size=(H, H), mode="bicubic"))
      pn = self.patch_nums[si + 1]
      return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
    f_hat = f_hat + self.phi(si)(h_BChw)
    return f_hat, f_hat


class VQVAE(nn.Module):

  def __init__(self, vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4),
               num_res_blocks=2, share_quant_resi=4, quant_resi=0.5,
               patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)):
    super().__init__()
    self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
    self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
    self.quantize = VectorQuantizer(vocab_size, z_channels, patch_nums, quant_resi,
                                    share_quant_resi)
    self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
    self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

  def img_to_idxBl(self, img):
    return self.quantize.f_to_idxBl(self.quant_conv(self.encoder(img)))

  def fhat_to_img(self, f_hat):
    return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

  def idxBl_to_img(self, idx_list):
    return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_list))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Fills every parameter with well-scaled random values (convs N(0,1)/sqrt(fan_in),
  biases N(0, 0.02), norm weights 1 + N(0, 0.1), codebook N(0, 1))."""
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if p.ndim == 4:
      p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    elif name.endswith("embedding.weight"):
      p.copy_(torch.randn(p.shape, generator=g))
    elif "norm" in name and name.endswith("weight"):
      p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    else:
      p.copy_(0.02 * torch.randn(p.shape, generator=g))
  model.requires_grad_(False)
  return model.eval()
