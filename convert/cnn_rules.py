"""Key maps for the taming/LDM encoder-decoder shared by VAR's VQVAE and Infinity's BSQ VAE.

The JAX tree (sparvar_jax/vae/layers.py) mirrors the official module names, so a torch
key `encoder.down.1.block.0.conv1.weight` fills `encoder/down/1/block/0/conv1/kernel`.
Infinity wraps its convs and norms (`conv1.conv.weight`, `norm1.norm.weight`); `wrapped`
selects that key form. No model code is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from convert.common import Rule, conv_oihw_to_hwio, rule


class KeyStyle:
  """Where the torch tensors of a conv / norm live, relative to the module's key."""

  def __init__(self, wrapped: bool):
    self.conv = ".conv" if wrapped else ""
    self.norm = ".norm" if wrapped else ""


def conv_rules(path: str, key: str, cin: int, cout: int, k: int, style: KeyStyle) -> list[Rule]:
  key = key + style.conv
  return [rule(f"{path}/kernel", f"{key}.weight", (cout, cin, k, k), conv_oihw_to_hwio),
          rule(f"{path}/bias", f"{key}.bias", (cout,))]


def plain_conv_rules(path: str, key: str, cin: int, cout: int, k: int) -> list[Rule]:
  return conv_rules(path, key, cin, cout, k, KeyStyle(False))


def norm_rules(path: str, key: str, c: int, style: KeyStyle) -> list[Rule]:
  key = key + style.norm
  return [rule(f"{path}/scale", f"{key}.weight", (c,)), rule(f"{path}/bias", f"{key}.bias", (c,))]


def _resnet(path: str, key: str, cin: int, cout: int, style: KeyStyle) -> list[Rule]:
  rs = (norm_rules(f"{path}/norm1", f"{key}.norm1", cin, style)
        + conv_rules(f"{path}/conv1", f"{key}.conv1", cin, cout, 3, style)
        + norm_rules(f"{path}/norm2", f"{key}.norm2", cout, style)
        + conv_rules(f"{path}/conv2", f"{key}.conv2", cout, cout, 3, style))
  if cin != cout:
    rs += conv_rules(f"{path}/nin_shortcut", f"{key}.nin_shortcut", cin, cout, 1, style)
  return rs


def _attn(path: str, key: str, c: int, style: KeyStyle) -> list[Rule]:
  return (norm_rules(f"{path}/norm", f"{key}.norm", c, style)
          + conv_rules(f"{path}/qkv", f"{key}.qkv", c, 3 * c, 1, style)
          + conv_rules(f"{path}/proj_out", f"{key}.proj_out", c, c, 1, style))


def _mid(path: str, key: str, c: int, using_attn: bool, style: KeyStyle) -> list[Rule]:
  rs = _resnet(f"{path}/block_1", f"{key}.block_1", c, c, style)
  if using_attn:
    rs += _attn(f"{path}/attn_1", f"{key}.attn_1", c, style)
  return rs + _resnet(f"{path}/block_2", f"{key}.block_2", c, c, style)


def encoder_rules(*, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                  using_attn: bool, wrapped: bool, in_channels: int = 3) -> list[Rule]:
  s, n = KeyStyle(wrapped), len(ch_mult)
  rs = conv_rules("encoder/conv_in", "encoder.conv_in", in_channels, ch, 3, s)
  in_mult = (1,) + tuple(ch_mult)
  cin = ch
  for i in range(n):
    cin, cout = ch * in_mult[i], ch * ch_mult[i]
    p, k = f"encoder/down/{i}", f"encoder.down.{i}"
    for j in range(num_res_blocks):
      rs += _resnet(f"{p}/block/{j}", f"{k}.block.{j}", cin, cout, s)
      cin = cout
      if i == n - 1 and using_attn:
        rs += _attn(f"{p}/attn/{j}", f"{k}.attn.{j}", cin, s)
    if i != n - 1:
      rs += conv_rules(f"{p}/downsample/conv", f"{k}.downsample.conv", cin, cin, 3, s)
  rs += _mid("encoder/mid", "encoder.mid", cin, using_attn, s)
  rs += norm_rules("encoder/norm_out", "encoder.norm_out", cin, s)
  rs += conv_rules("encoder/conv_out", "encoder.conv_out", cin, z_channels, 3, s)
  return rs


def decoder_rules(*, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                  using_attn: bool, wrapped: bool, out_channels: int = 3) -> list[Rule]:
  s, n = KeyStyle(wrapped), len(ch_mult)
  cin = ch * ch_mult[-1]
  rs = conv_rules("decoder/conv_in", "decoder.conv_in", z_channels, cin, 3, s)
  rs += _mid("decoder/mid", "decoder.mid", cin, using_attn, s)
  for i in reversed(range(n)):
    cout = ch * ch_mult[i]
    p, k = f"decoder/up/{i}", f"decoder.up.{i}"
    for j in range(num_res_blocks + 1):
      rs += _resnet(f"{p}/block/{j}", f"{k}.block.{j}", cin, cout, s)
      cin = cout
      if i == n - 1 and using_attn:
        rs += _attn(f"{p}/attn/{j}", f"{k}.attn.{j}", cin, s)
    if i != 0:
      rs += conv_rules(f"{p}/upsample/conv", f"{k}.upsample.conv", cin, cin, 3, s)
  rs += norm_rules("decoder/norm_out", "decoder.norm_out", cin, s)
  rs += conv_rules("decoder/conv_out", "decoder.conv_out", cin, out_channels, 3, s)
  return rs


def count_indexed(sd, template: str) -> int:
  """How many consecutive i from 0 have `template.format(i)` in sd."""
  n = 0
  while template.format(n) in sd:
    n += 1
  return n
