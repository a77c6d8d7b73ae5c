"""Our own PyTorch VAR transformer with the official state-dict names (tests only).

Written from the facts of FoundationVision/VAR (models/var.py, models/basic_var.py): the
state dict of `VARTorch(...)` loads the official checkpoints (and the golden
`var_tiny.pth`) with `strict=True`. Two modes: `forward(label_B, x_BLCv_wo_first_l)`
(teacher forcing, block-causal mask, no label dropout) and per-scale inference with a
growing KV cache (`kv_caching(True)`, `first_input`, `next_input`, `scale_forward`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class FFN(nn.Module):

  def __init__(self, C: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(C, hidden)
    self.fc2 = nn.Linear(hidden, C)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
  """q/v biases, zero k bias buffer, cosine attention with clamped per-head scale."""

  def __init__(self, C: int, H: int, attn_l2_norm: bool = True):
    super().__init__()
    self.H, self.c = H, C // H
    self.attn_l2_norm = attn_l2_norm
    if attn_l2_norm:
      self.scale = 1.0
      self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
    else:
      self.scale = 0.25 / math.sqrt(self.c)
    self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
    self.q_bias = nn.Parameter(torch.zeros(C))
    self.v_bias = nn.Parameter(torch.zeros(C))
    self.register_buffer("zero_k_bias", torch.zeros(C))
    self.proj = nn.Linear(C, C)
    self.caching, self.cached_k, self.cached_v = False, None, None

  def kv_caching(self, enable: bool):
    self.caching, self.cached_k, self.cached_v = enable, None, None

  def forward(self, x, attn_bias):
    B, L, C = x.shape
    bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
    qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.H, self.c)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each BHLc
    if self.attn_l2_norm:
      s = self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
      q = F.normalize(q, dim=-1) * s
      k = F.normalize(k, dim=-1)
    if self.caching:
      if self.cached_k is not None:
        k = torch.cat((self.cached_k, k), dim=2)
        v = torch.cat((self.cached_v, v), dim=2)
      self.cached_k, self.cached_v = k, v
    att = (q * self.scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
      att = att + attn_bias
    o = att.softmax(dim=-1) @ v
    return self.proj(o.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):

  def __init__(self, C: int, H: int, mlp_ratio: float, norm_eps: float, shared_aln: bool,
               attn_l2_norm: bool):
    super().__init__()
    self.C, self.shared_aln = C, shared_aln
    self.attn = SelfAttention(C, H, attn_l2_norm)
    self.ffn = FFN(C, round(C * mlp_ratio))
    self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
    if shared_aln:
      self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
    else:
      self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

  def forward(self, x, cond, attn_bias):
    if self.shared_aln:
      g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond).unbind(2)
    else:
      g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
    x = x + self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, attn_bias) * g1
    x = x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2
    return x


class AdaLNBeforeHead(nn.Module):

  def __init__(self, C: int, norm_eps: float):
    super().__init__()
    self.C = C
    self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
    self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

  def forward(self, x, cond):
    scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
    return self.ln_wo_grad(x) * (scale + 1) + shift


class SharedAdaLin(nn.Linear):

  def forward(self, cond):
    return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VARTorch(nn.Module):
  """State-dict compatible with the official VAR (see module docstring)."""

  def __init__(self, *, vocab_size=4096, cvae=32, num_classes=1000, depth=16, embed_dim=1024,
               num_heads=16, mlp_ratio=4.0, norm_eps=1e-6, shared_aln=False,
               attn_l2_norm=True, patch_nums=PATCH_NUMS_256):
    super().__init__()
    C = embed_dim
    self.C, self.V, self.Cvae, self.num_classes = C, vocab_size, cvae, num_classes
    self.patch_nums = tuple(patch_nums)
    self.L = sum(pn * pn for pn in self.patch_nums)
    self.first_l = self.patch_nums[0] ** 2
    self.begin_ends, cur = [], 0
    for pn in self.patch_nums:
      self.begin_ends.append((cur, cur + pn * pn))
      cur += pn * pn
    std = math.sqrt(1 / C / 3)
    self.word_embed = nn.Linear(cvae, C)
    self.class_emb = nn.Embedding(num_classes + 1, C)
    self.pos_start = nn.Parameter(torch.randn(1, self.first_l, C) * std)
    self.pos_1LC = nn.Parameter(torch.randn(1, self.L, C) * std)
    self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
    self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if shared_aln
                           else nn.Identity())
    self.blocks = nn.ModuleList([
        AdaLNSelfAttn(C, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm)
        for _ in range(depth)])
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])
    d = d.view(1, self.L, 1)
    dT = d.transpose(1, 2)
    self.register_buffer("lvl_1L", dT[:, 0].contiguous())
    self.register_buffer("attn_bias_for_masking",
                         torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L))
    self.head_nm = AdaLNBeforeHead(C, norm_eps)
    self.head = nn.Linear(C, vocab_size)

  def get_logits(self, h, cond_BD):
    return self.head(self.head_nm(h.float(), cond_BD).float()).float()

  def lvl_pos(self):
    return self.lvl_embed(self.lvl_1L) + self.pos_1LC

  def forward(self, label_B, x_BLCv_wo_first_l):
    """Teacher forcing -> logits [B, L, V]."""
    B = x_BLCv_wo_first_l.shape[0]
    sos = cond_BD = self.class_emb(label_B)
    sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(
        B, self.first_l, -1)
    x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
    x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
    cond = self.shared_ada_lin(cond_BD)
    for b in self.blocks:
      x = b(x, cond, self.attn_bias_for_masking)
    return self.get_logits(x.float(), cond_BD)

  # -- per-scale inference with a KV cache ---------------------------------------------

  def kv_caching(self, enable: bool):
    for b in self.blocks:
      b.attn.kv_caching(enable)

  def first_input(self, cond_BD):
    B = cond_BD.shape[0]
    return (cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
            + self.pos_start.expand(B, self.first_l, -1) + self.lvl_pos()[:, :self.first_l])

  def next_input(self, si, next_BlCv):
    bg, ed = self.begin_ends[si]
    return self.word_embed(next_BlCv) + self.lvl_pos()[:, bg:ed]

  def scale_forward(self, x_BlC, cond_BD):
    """Runs one scale against the cache (no mask, as the official inference)."""
    cond = self.shared_ada_lin(cond_BD)
    for b in self.blocks:
      x_BlC = b(x_BlC, cond, None)
    return self.get_logits(x_BlC, cond_BD)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
  """Fills every parameter (also the zero/constant-initialised ones: q/v biases, scale_mul,
  LayerNorm-free AdaLN) with seeded random values so parity tests exercise all of them."""
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if name.endswith("scale_mul_1H11"):
      # spread across the clamp at log(100) = 4.6
      p.copy_(torch.rand(p.shape, generator=g) * 4.0 + 1.5)
    elif name.endswith(("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight")):
      p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    else:
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return model
