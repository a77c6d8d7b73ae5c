"""CNN pieces shared by VAR's VQVAE and Infinity's BSQ autoencoder (Flax NNX, NHWC).

Both autoencoders are the taming/LDM encoder-decoder: GroupNorm(eps 1e-6) + SiLU,
ResnetBlocks with a 1x1 `nin_shortcut` where channels change, Downsample = pad
(0,1,0,1) + 3x3 stride-2 conv, Upsample = nearest x2 + 3x3 conv. VAR adds single-head
attention blocks at the lowest resolution and in the middle; Infinity has none.
Attribute names follow the official state dicts (`down.{i}.block.{j}.conv1`, ...), so
the converted trees read like the PyTorch keys. Parameters: conv `kernel` HWIO + `bias`,
norm `scale` + `bias`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def norm_groups(channels: int) -> int:
  """GroupNorm group count: 32, or 24 where 32 does not divide (Infinity's Normalize)."""
  if channels % 32 == 0:
    return 32
  if channels % 24 == 0:
    return 24
  raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {channels}")


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm(groups, C, eps=1e-6) over NHWC; statistics in float32, two-pass."""

  def __init__(self, channels: int, *, eps: float = 1e-6):
    self.num_groups = norm_groups(channels)
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    G = self.num_groups
    x = x_BHWC.astype(jnp.float32).reshape(B, H, W, G, C // G)
    mean = x.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x_BHWC.dtype)


def conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding=None) -> nnx.Conv:
  """torch.nn.Conv2d(cin, cout, k, stride, padding=k//2) in NHWC (kernel HWIO)."""
  if padding is None:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
  return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=padding,
                  rngs=rngs)


class ResnetBlock(nnx.Module):
  """norm1 -> silu -> conv1 -> norm2 -> silu -> conv2, plus x (1x1 nin_shortcut if needed)."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(cin)
    self.conv1 = conv(cin, cout, 3, rngs=rngs)
    self.norm2 = GroupNorm(cout)
    self.conv2 = conv(cout, cout, 3, rngs=rngs)
    self.nin_shortcut = conv(cin, cout, 1, rngs=rngs) if cin != cout else None

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.nin_shortcut is not None:
      x_BHWC = self.nin_shortcut(x_BHWC)
    return x_BHWC + h


class AttnBlock(nnx.Module):
  """VAR's single-head spatial self-attention: one 1x1 `qkv` conv, scale C^-0.5, proj_out."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.norm = GroupNorm(channels)
    self.qkv = conv(channels, 3 * channels, 1, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    qkv_BL3C = self.qkv(self.norm(x_BHWC)).reshape(B, H * W, 3, C)  # torch: (B, 3, C, H, W)
    q_BLC, k_BLC, v_BLC = qkv_BL3C[:, :, 0], qkv_BL3C[:, :, 1], qkv_BL3C[:, :, 2]
    w_BQK = jnp.einsum("BQC,BKC->BQK", q_BLC, k_BLC) * (C ** -0.5)
    w_BQK = jax.nn.softmax(w_BQK.astype(jnp.float32), axis=-1).astype(v_BLC.dtype)
    h_BLC = jnp.einsum("BQK,BKC->BQC", w_BQK, v_BLC)
    return x_BHWC + self.proj_out(h_BLC.reshape(B, H, W, C))


class Downsample(nnx.Module):
  """F.pad(x, (0, 1, 0, 1)) then a 3x3 stride-2 conv: one conv with asymmetric padding."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.conv(x_BHWC)


def upsample_nearest2x(x_BHWC: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)


class Upsample(nnx.Module):
  """Nearest x2 then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.conv(upsample_nearest2x(x_BHWC))


class Level(nnx.Module):
  """One resolution level: `block` ResnetBlocks, optional `attn` after each, and a resampler."""

  def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)

  def run_blocks(self, h: jax.Array) -> jax.Array:
    for i, blk in enumerate(self.block):
      h = blk(h)
      if len(self.attn):
        h = self.attn[i](h)
    return h


class Mid(nnx.Module):
  """block_1 -> (attn_1) -> block_2 at the lowest resolution."""

  def __init__(self, channels: int, using_attn: bool, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, rngs=rngs)
    self.attn_1 = AttnBlock(channels, rngs=rngs) if using_attn else None
    self.block_2 = ResnetBlock(channels, channels, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    h = self.block_1(h)
    if self.attn_1 is not None:
      h = self.attn_1(h)
    return self.block_2(h)


class Encoder(nnx.Module):
  """Image [B, H, W, in_ch] -> latent [B, H/2^(n-1), W/2^(n-1), z_channels]."""

  def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
               using_attn: bool, in_channels: int = 3, rngs: nnx.Rngs):
    n = len(ch_mult)
    self.conv_in = conv(in_channels, ch, 3, rngs=rngs)
    in_mult = (1,) + tuple(ch_mult)
    levels = []
    block_in = ch
    for i in range(n):
      block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResnetBlock(block_in, block_out, rngs=rngs))
        block_in = block_out
        if i == n - 1 and using_attn:
          attns.append(AttnBlock(block_in, rngs=rngs))
      level = Level(blocks, attns)
      if i != n - 1:
        level.downsample = Downsample(block_in, rngs=rngs)
      levels.append(level)
    self.down = nnx.List(levels)
    self.mid = Mid(block_in, using_attn, rngs=rngs)
    self.norm_out = GroupNorm(block_in)
    self.conv_out = conv(block_in, z_channels, 3, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = self.conv_in(x_BHWC)
    for i, level in enumerate(self.down):
      h = level.run_blocks(h)
      if i != len(self.down) - 1:
        h = level.downsample(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latent [B, h, w, z_channels] -> image [B, h*2^(n-1), w*2^(n-1), out_ch] (unclamped)."""

  def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
               using_attn: bool, out_channels: int = 3, rngs: nnx.Rngs):
    n = len(ch_mult)
    block_in = ch * ch_mult[-1]
    self.conv_in = conv(z_channels, block_in, 3, rngs=rngs)
    self.mid = Mid(block_in, using_attn, rngs=rngs)
    levels = [None] * n  # `up` is indexed by level, built from the lowest resolution up
    for i in reversed(range(n)):
      block_out = ch * ch_mult[i]
      blocks, attns = [], []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, block_out, rngs=rngs))
        block_in = block_out
        if i == n - 1 and using_attn:
          attns.append(AttnBlock(block_in, rngs=rngs))
      level = Level(blocks, attns)
      if i != 0:
        level.upsample = Upsample(block_in, rngs=rngs)
      levels[i] = level
    self.up = nnx.List(levels)
    self.norm_out = GroupNorm(block_in)
    self.conv_out = conv(block_in, out_channels, 3, rngs=rngs)

  def __call__(self, z_BhwC: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z_BhwC))
    for i in reversed(range(len(self.up))):
      h = self.up[i].run_blocks(h)
      if i != 0:
        h = self.up[i].upsample(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))
