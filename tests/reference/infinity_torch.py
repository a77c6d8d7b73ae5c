"""Our PyTorch reference of the Infinity transformer (FoundationVision/Infinity semantics,
official state-dict names, so official checkpoints load with strict=True).

Written for tests, not speed: text is a list of per-prompt [len_i, Ct5] tensors and
cross-attention loops over prompts (the official code packs them for flash-attn varlen).
`bf16_cross_attn=True` reproduces the official float32 behaviour (q and kv rounded to
bf16 before cross-attention, the output rounded to bf16); False is pure float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FastRMSNorm(nn.Module):

  def __init__(self, c, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(c))

  def forward(self, x):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _attend(q, k, v, scale, bf16):
  """q [H, Lq, c], k/v [H, Lk, c] -> [Lq, H*c]."""
  if bf16:
    q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
  w = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
  o = w @ v
  if bf16:
    o = o.to(torch.bfloat16).float()
  return o.transpose(0, 1).reshape(q.shape[1], -1)


class CrossAttention(nn.Module):

  def __init__(self, for_attn_pool, embed_dim, kv_dim, num_heads):
    super().__init__()
    self.for_attn_pool = for_attn_pool
    self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
    self.scale = 1 / math.sqrt(self.head_dim)
    if for_attn_pool:
      self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
    else:
      self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
    self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
    self.v_bias = nn.Parameter(torch.zeros(embed_dim))
    self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
    self.proj = nn.Linear(embed_dim, embed_dim)
    self.bf16 = True

  def forward(self, q_BLC, kv_list):
    """q_BLC [B, Lq, C] (ignored for pooling); kv_list: B tensors [len_i, kv_dim]."""
    H, c = self.num_heads, self.head_dim
    outs = []
    for b, kv in enumerate(kv_list):
      kv = F.linear(kv, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
      kv = kv.view(-1, 2, H, c)
      k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
      if self.for_attn_pool:
        q = self.mat_q[0].unsqueeze(1)  # [H, 1, c]
      else:
        q = self.mat_q(q_BLC[b]).view(-1, H, c).transpose(0, 1)
      outs.append(_attend(q, k, v, self.scale, self.bf16))
    return self.proj(torch.stack(outs))


class TextAttentivePool(nn.Module):

  def __init__(self, ct5, d, heads):
    super().__init__()
    self.ca = CrossAttention(True, d, ct5, heads)

  def forward(self, kv_list):
    return self.ca(None, kv_list).squeeze(1)


class FFN(nn.Module):

  def __init__(self, c, hidden):
    super().__init__()
    self.fc1 = nn.Linear(c, hidden)
    self.fc2 = nn.Linear(hidden, c)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def rope_table(head_dim, scales, rope_hw, max_hw=128, base=10000.0):
  """[2, L, head_dim/2] cos/sin, the official precompute_rope2d_freqs_grid (mode 2)."""
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
  t = torch.arange(max_hw, dtype=torch.int64).type_as(inv_freq)
  fh, fw = torch.outer(t, inv_freq), torch.outer(t, inv_freq)
  grid = torch.cat([fh[:, None, :].expand(-1, max_hw, -1), fw[None, :, :].expand(max_hw, -1, -1)],
                   dim=-1)
  grid = torch.stack([torch.cos(grid), torch.sin(grid)], dim=0)
  uph, upw = rope_hw
  parts = []
  for ph, pw in scales:
    idx = torch.stack([
        (torch.arange(ph) * (uph / ph)).reshape(ph, 1).expand(ph, pw),
        (torch.arange(pw) * (upw / pw)).reshape(1, pw).expand(ph, pw),
    ], dim=-1).round().int().reshape(-1, 2)
    parts.append(grid[:, idx[:, 0], idx[:, 1], :])
  return torch.cat(parts, dim=1)


def apply_rope(x_BHLc, tab_2Lk):
  x = x_BHLc.reshape(*x_BHLc.shape[:-1], -1, 2)
  cos, sin = tab_2Lk[0], tab_2Lk[1]
  out = torch.stack([cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1]], -1)
  return out.reshape(x_BHLc.shape)


class SelfAttention(nn.Module):

  def __init__(self, embed_dim, num_heads):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
    self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
    self.max_scale_mul = math.log(100)
    self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
    self.q_bias = nn.Parameter(torch.zeros(embed_dim))
    self.v_bias = nn.Parameter(torch.zeros(embed_dim))
    self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
    self.proj = nn.Linear(embed_dim, embed_dim)
    self.cache = None  # (k, v) when caching

  def forward(self, x, mask, rope_2Lk, caching=False):
    B, L, C = x.shape
    qkv = F.linear(x, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
    q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
    q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)
    k = F.normalize(k, dim=-1, eps=1e-12)
    q, k = apply_rope(q, rope_2Lk), apply_rope(k, rope_2Lk)
    if caching:
      if self.cache is not None:
        k = torch.cat((self.cache[0], k), dim=2)
        v = torch.cat((self.cache[1], v), dim=2)
      self.cache = (k, v)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return self.proj(o.transpose(1, 2).reshape(B, L, C))


class CrossAttnBlock(nn.Module):

  def __init__(self, c, heads, hidden, eps=1e-6):
    super().__init__()
    self.C, self.eps = c, eps
    self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
    self.sa = SelfAttention(c, heads)
    self.ca = CrossAttention(False, c, c, heads)
    self.ffn = FFN(c, hidden)
    self.ca_norm = nn.LayerNorm(c, eps=eps)

  def _ada(self, x, scale, shift):
    return F.layer_norm(x.float(), (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)

  def forward(self, x, gss, ca_kv, mask, rope, caching=False):
    g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss).unbind(2)
    x = x + self.sa(self._ada(x, s1, b1), mask, rope, caching).mul(g1)
    x = x + self.ca(self.ca_norm(x), ca_kv).float()
    x = x + self.ffn(self._ada(x, s2, b2)).mul(g2)
    return x


class MultipleLayers(nn.Module):

  def __init__(self, blocks):
    super().__init__()
    self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):

  def __init__(self, c, eps=1e-6):
    super().__init__()
    self.C, self.eps = c, eps
    self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

  def forward(self, x, cond_BD):
    scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
    return F.layer_norm(x.float(), (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)


class InfinityRef(nn.Module):
  """Infinity with the official key names (block_chunks > 1 layout)."""

  def __init__(self, *, depth, embed_dim, num_heads, d_vae, text_channels, block_chunks,
               text_maxlen=512, pool_heads=None, mlp_ratio=4.0, eps=1e-6, num_lvl=15,
               rope_max_hw=128):
    super().__init__()
    C = embed_dim
    self.C, self.d_vae, self.num_heads, self.eps = C, d_vae, num_heads, eps
    self.rope_max_hw = rope_max_hw
    pool_heads = pool_heads or text_channels // (64 if C > 4096 else 128)
    self.cfg_uncond = nn.Parameter(torch.zeros(text_maxlen, text_channels))
    self.text_norm = FastRMSNorm(text_channels, eps)
    self.text_proj_for_sos = TextAttentivePool(text_channels, C, pool_heads)
    self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, C), nn.GELU("tanh"),
                                          nn.Linear(C, C))
    self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
    self.lvl_embed = nn.Embedding(num_lvl, C)
    self.word_embed = nn.Linear(d_vae, C)
    self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
    hidden = round(C * mlp_ratio / 256) * 256
    per = depth // block_chunks
    blocks = [CrossAttnBlock(C, num_heads, hidden, eps) for _ in range(depth)]
    self.block_chunks = nn.ModuleList(
        MultipleLayers(blocks[i * per:(i + 1) * per]) for i in range(block_chunks))
    self.head_nm = AdaLNBeforeHead(C, eps)
    self.head = nn.Linear(C, 2 * d_vae)

  # ------------------------------------------------------------------ helpers
  def set_bf16_cross_attn(self, on: bool):
    for m in self.modules():
      if isinstance(m, CrossAttention):
        m.bf16 = on

  def blocks(self):
    return [m for ch in self.block_chunks for m in ch.module]

  def encode_text(self, kv_list):
    """kv_list: B tensors [len_i, Ct5] -> (cond_BD [B, C], ca_kv list of [len_i, C])."""
    normed = [self.text_norm(t) for t in kv_list]
    cond_BD = self.text_proj_for_sos(normed).float()
    ca_kv = [self.text_proj_for_ca(t) for t in normed]
    return cond_BD, ca_kv

  def get_logits(self, h, cond_BD):
    return self.head(self.head_nm(h.float(), cond_BD.float()))

  def _run_blocks(self, x, gss, ca_kv, mask, rope, caching):
    for b in self.blocks():
      x = b(x, gss, ca_kv, mask, rope, caching)
    return x

  # ------------------------------------------------------------------ teacher forcing
  def forward(self, kv_list, x_BLC_wo_prefix, scales, rope_hw):
    """Teacher-forced logits [B, L, 2*d_vae] over a whole schedule (block-causal mask)."""
    cond_BD, ca_kv = self.encode_text(kv_list)
    gss = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.C)
    B = x_BLC_wo_prefix.shape[0]
    sos = cond_BD.unsqueeze(1) + self.pos_start.expand(B, 1, -1)
    x = torch.cat((sos, self.word_embed(x_BLC_wo_prefix.float())), dim=1)
    lens = [h * w for h, w in scales]
    lvl = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    x = x + self.lvl_embed(lvl)[None]
    d = lvl.view(1, -1, 1)
    mask = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, len(lvl), len(lvl))
    rope = rope_table(self.C // self.num_heads, scales, rope_hw, self.rope_max_hw)
    x = self._run_blocks(x, gss, ca_kv, mask, rope, False)
    return self.get_logits(x, cond_BD)

  # ------------------------------------------------------------------ sampling
  @torch.no_grad()
  def generate(self, kv_list, scales, rope_hw, *, cfg=3.0, tau=1.0, patchify=False,
               forced_bits=None, neg_kv_list=None):
    """Greedy CFG generation (cfg on logits). Returns (logits per scale [B, l, d, 2],
    bits per scale [B, l, d] (token layout), summed_codes [B, dv, H, W]).

    forced_bits: optional list of per-scale [B, l, d] bit arrays used instead of argmax.
    """
    B = len(kv_list)
    un = neg_kv_list or [self.cfg_uncond[:t.shape[0]] for t in kv_list]
    cond_BD, ca_kv = self.encode_text(list(kv_list) + list(un))
    gss = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.C)
    x = cond_BD.unsqueeze(1) + self.pos_start
    rope = rope_table(self.C // self.num_heads, scales, rope_hw, self.rope_max_hw)
    f = 2 if patchify else 1
    vae_scales = [(h * f, w * f) for h, w in scales]
    d = self.d_vae
    dv = d // (4 if patchify else 1)
    summed = torch.zeros(B, dv, *vae_scales[-1])
    for b in self.blocks():
      b.sa.cache = None
    logits_out, bits_out, start = [], [], 0
    n = len(scales)
    for si, (h, w) in enumerate(scales):
      l = h * w
      x = x + self.lvl_embed.weight[si]
      x = self._run_blocks(x, gss, ca_kv, None, rope[:, start:start + l], True)
      start += l
      cf = cfg[si] if isinstance(cfg, (list, tuple)) else cfg
      ta = tau[si] if isinstance(tau, (list, tuple)) else tau
      lg = self.get_logits(x, cond_BD).mul(1 / ta)
      lg = cf * lg[:B] + (1 - cf) * lg[B:]
      lg = lg.reshape(B, l, d, 2)
      logits_out.append(lg)
      bits = forced_bits[si] if forced_bits is not None else (lg[..., 1] > lg[..., 0]).long()
      bits = torch.as_tensor(np.asarray(bits)).long()
      bits_out.append(bits)
      grid = bits.reshape(B, h, w, d).permute(0, 3, 1, 2).float()
      if patchify:
        grid = F.pixel_shuffle(grid, 2)
      codes = (2 * grid - 1) / math.sqrt(dv)
      if si != n - 1:
        summed = summed + F.interpolate(codes, size=vae_scales[-1], mode="bilinear",
                                        align_corners=False)
        nxt = F.interpolate(summed, size=vae_scales[si + 1], mode="bilinear", align_corners=False)
        if patchify:
          nxt = F.pixel_unshuffle(nxt, 2)
        nxt = nxt.reshape(B, d, -1).permute(0, 2, 1)
        x = self.word_embed(nxt).repeat(2, 1, 1)
      else:
        summed = summed + codes
    for b in self.blocks():
      b.sa.cache = None
    return logits_out, bits_out, summed


def init_random_(model: nn.Module, seed: int = 0):
  """Deterministic non-trivial random init (norm weights near 1, biases small)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("scale_mul_1H11"):
        p.copy_(math.log(4.0) + 0.05 * torch.randn(p.shape, generator=g))
      elif name.endswith(("norm.weight", "ca_norm.weight")):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif name == "cfg_uncond":
        p.copy_(0.25 * torch.randn(p.shape, generator=g))
      elif name.endswith(("bias", "ada_gss")):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return model
