"""Model configs and scale schedules: data only, one place for every variant.

Sizes follow the official repositories (FoundationVision/VAR `build_vae_var`,
FoundationVision/Infinity `load_transformer`, google/flan-t5-xl). Every config is a
frozen dataclass, so it is hashable and can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# --------------------------------------------------------------------------------------
# Scale schedules
# --------------------------------------------------------------------------------------

# VAR `utils/arg_util.py`: side length of the token grid at each scale.
VAR_PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


# --------------------------------------------------------------------------------------
# VAR (class-conditional) and its multi-scale VQVAE
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """VAR's multi-scale VQVAE (`models/vqvae.py`); defaults are vae_ch160v4096z32."""

  vocab_size: int = 4096
  z_channels: int = 32  # Cvae
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  share_quant_resi: int = 4
  quant_resi: float = 0.5
  patch_nums: tuple[int, ...] = VAR_PATCH_NUMS[256]

  def __post_init__(self):
    if self.ch % 32:
      raise ValueError(f"VQVAE ch must be a multiple of 32 (GroupNorm(32)), got {self.ch=}")
    if not self.patch_nums or list(self.patch_nums) != sorted(set(self.patch_nums)):
      raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums=}")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """The VAR transformer. `var_config(depth)` gives the released sizes."""

  depth: int
  embed_dim: int  # C
  num_heads: int
  vocab_size: int = 4096
  cvae: int = 32
  num_classes: int = 1000
  mlp_ratio: float = 4.0
  shared_aln: bool = False
  attn_l2_norm: bool = True
  norm_eps: float = 1e-6
  patch_nums: tuple[int, ...] = VAR_PATCH_NUMS[256]

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"{self.embed_dim=} is not divisible by {self.num_heads=}")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return round(self.embed_dim * self.mlp_ratio)

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def seq_len(self) -> int:
    return sum(pn * pn for pn in self.patch_nums)


def var_config(depth: int, *, resolution: int | None = None, shared_aln: bool | None = None,
               **overrides: Any) -> VARConfig:
  """VAR `build_vae_var`: width 64*depth, heads = depth; d36 is the 512px shared-AdaLN model.

  Any depth works; resolution defaults to 512 for d36 and 256 otherwise.
  """
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}")
  if resolution is None:
    resolution = 512 if depth == 36 else 256
  if resolution not in VAR_PATCH_NUMS:
    raise ValueError(f"resolution {resolution} unsupported; choose one of {sorted(VAR_PATCH_NUMS)}")
  if shared_aln is None:
    shared_aln = depth == 36
  kw = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, shared_aln=shared_aln,
            patch_nums=VAR_PATCH_NUMS[resolution])
  kw.update(overrides)
  return VARConfig(**kw)


VAR_DEPTHS = (16, 20, 24, 30, 36)

# Tiny configs for tests and the embedded CLI default (random weights).
VAR_TINY = VARConfig(depth=2, embed_dim=128, num_heads=2, vocab_size=512)
VQVAE_TINY = VQVAEConfig(vocab_size=512, ch=32)
# The CLI's embedded default: tiny widths, the real 4096-token vocabulary (so the
# official sampling defaults, e.g. top-k 900, apply unchanged).
VAR_DEMO = VARConfig(depth=2, embed_dim=128, num_heads=2)
VQVAE_DEMO = VQVAEConfig(ch=32)


# --------------------------------------------------------------------------------------
# Infinity (text-to-image) and its BSQ autoencoder
# --------------------------------------------------------------------------------------

# Infinity `dynamic_resolution.py` `ratio2hws`: the 13-step (h, w) grids per h/w template.
# 'pn' takes the first N steps of a template.
INFINITY_PN_STEPS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


@dataclasses.dataclass(frozen=True)
class BSQVAEConfig:
  """Infinity's BSQ autoencoder (Flux-style CNN, no attention, no quant convs)."""

  codebook_dim: int = 32  # z_channels; bits per latent position
  base_ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
  num_res_blocks: int = 2
  apply_spatial_patchify: bool = False

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def bits_per_token(self) -> int:
    """d_vae: bits the transformer predicts per token (x4 with 2x2 spatial patchify)."""
    return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)


BSQ_D32REG = BSQVAEConfig(codebook_dim=32, ch_mult=(1, 2, 4, 4, 4))
BSQ_D56_PATCHIFY = BSQVAEConfig(codebook_dim=14, ch_mult=(1, 2, 4, 4), apply_spatial_patchify=True)


@dataclasses.dataclass(frozen=True)
class InfinityConfig:
  """The Infinity transformer (`infinity/models/infinity.py`) with inference kwargs."""

  depth: int
  embed_dim: int  # D
  num_heads: int
  d_vae: int = 32  # bits per token the head predicts
  block_chunks: int = 8
  text_channels: int = 2048
  text_maxlen: int = 512
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  num_lvl: int = 15
  head_dim_pool: int = 128  # TextAttentivePool heads = text_channels // head_dim_pool
  rope_max_hw: int = 128
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"{self.embed_dim=} is not divisible by {self.num_heads=}")
    if self.depth % self.block_chunks:
      raise ValueError(f"{self.depth=} must be a multiple of {self.block_chunks=}")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return round(self.embed_dim * self.mlp_ratio / 256) * 256

  @property
  def pool_heads(self) -> int:
    return self.text_channels // self.head_dim_pool


INFINITY_2B = InfinityConfig(depth=32, embed_dim=2048, num_heads=16, d_vae=32)
INFINITY_8B = InfinityConfig(depth=40, embed_dim=3584, num_heads=28, d_vae=56)
# Tiny configs (tests, golden fixtures): the 2B family (32 bits) and the 8B family
# (56 bits = 14-channel VAE with 2x2 patchify); pool heads = text_channels // 128.
INFINITY_TINY_D32 = InfinityConfig(depth=2, embed_dim=256, num_heads=2, d_vae=32, block_chunks=2,
                                   text_channels=256)
INFINITY_TINY_D56 = InfinityConfig(depth=2, embed_dim=256, num_heads=2, d_vae=56, block_chunks=2,
                                   text_channels=512)


# The CLI's embedded default (`python -m sparvar_jax.sample` with no checkpoint): a tiny,
# randomly initialised Infinity on the full 13-scale 1M schedule (1024x1024), with a
# small BSQ VAE so the CPU decode takes seconds.
INFINITY_DEMO = INFINITY_TINY_D32
BSQ_DEMO = BSQVAEConfig(codebook_dim=32, base_ch=32, ch_mult=(1, 1, 2, 2, 2))


# --------------------------------------------------------------------------------------
# T5 text encoder
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 v1.1 encoder (gated-GELU FFN, untied relative position buckets)."""

  vocab_size: int = 32128
  d_model: int = 2048
  d_kv: int = 64
  d_ff: int = 5120
  num_layers: int = 24
  num_heads: int = 32
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"


FLAN_T5_XL = T5Config()


# --------------------------------------------------------------------------------------
# (De)serialisation: converted checkpoints carry their config as JSON
# --------------------------------------------------------------------------------------

_CONFIG_TYPES = {c.__name__: c for c in (VARConfig, VQVAEConfig, InfinityConfig, BSQVAEConfig,
                                         T5Config)}


def config_to_dict(cfg) -> dict[str, Any]:
  return {"type": type(cfg).__name__, **dataclasses.asdict(cfg)}


# Integer fields for which 0 means something (VQVAE: one phi conv per scale); every other
# integer field is a size or a count of at least 1.
_ZERO_INT_FIELDS = frozenset({"share_quant_resi"})


def _field_value(kind: str, name: str, annotation: str, v: Any) -> Any:
  """`v` (from JSON) as the field's type; ValueError naming the field otherwise. A config
  read from a file is checked here, so a hand-edited "depth": 2.5 is refused in one line
  instead of failing deep inside model construction."""
  def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)

  ok = {"int": is_int(v) and (v >= 1 or (v == 0 and name in _ZERO_INT_FIELDS)),
        "float": (is_int(v) or isinstance(v, float)) and math.isfinite(v),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "tuple[int, ...]": isinstance(v, (list, tuple)) and all(is_int(x) and x > 0 for x in v)}
  if annotation not in ok:
    raise AssertionError(f"{kind}.{name}: no JSON check for the type {annotation!r}")
  if not ok[annotation]:
    want = {"int": "a non-negative integer" if name in _ZERO_INT_FIELDS else "a positive integer",
            "float": "a finite number", "bool": "true or false",
            "str": "a string", "tuple[int, ...]": "a list of positive integers"}[annotation]
    raise ValueError(f"{kind}.{name} must be {want}, got {v!r}")
  if annotation == "float":
    return float(v)
  # JSON turns tuples into lists; configs must stay hashable.
  return tuple(v) if annotation.startswith("tuple") else v


def config_from_dict(d: dict[str, Any]):
  """The config dataclass a `config_to_dict` dict describes; ValueError for an unknown
  type, unknown fields, or a value of the wrong type."""
  if not isinstance(d, dict):
    raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
  d = dict(d)
  kind = d.pop("type", None)
  if kind not in _CONFIG_TYPES:
    raise ValueError(f"unknown config type {kind!r}; expected one of {sorted(_CONFIG_TYPES)}")
  cls = _CONFIG_TYPES[kind]
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f"{kind}: unknown fields {unknown}")
  d = {k: _field_value(kind, k, str(fields[k].type), v) for k, v in d.items()}
  return cls(**d)


def config_to_json(cfg) -> str:
  return json.dumps(config_to_dict(cfg), indent=1)
