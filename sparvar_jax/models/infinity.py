"""The Infinity transformer (FoundationVision/Infinity `infinity/models/infinity.py`) in NNX.

Letters: B batch (2B rows with CFG), L tokens of a schedule, l tokens of one scale,
T text tokens (padded), K text width (T5: 2048), C width, H heads, c head dim,
N layers, d bits per token (d_vae), D condition width (= C).

Text path (fp32): text_norm (RMS) -> text_proj_for_sos (attentive pooling; the result
cond_BD is both the sos token and the AdaLN condition) and text_proj_for_ca
(Linear-GELU(tanh)-Linear; the cross-attention source of every block).
Blocks (`CrossAttnBlock`): shared AdaLN (`shared_ada_lin(cond)` + per-block `ada_gss`),
cosine self-attention with 2D RoPE, cross-attention over the masked padded text with
`ca_norm` (affine LayerNorm) before it, tanh-GELU FFN. The level embedding of scale si
is added once before the first block. Head: `head_nm` (AdaLN) and `head` in fp32, giving
2 logits per bit: index 2j is bit j = 0, 2j + 1 is bit j = 1.

Blocks are stacked (parameters with a leading layer axis) and run under `lax.scan`.
Entry points: `forward` (teacher forcing over a whole schedule, block-causal mask) and
`scale_step` (one scale with the KV cache, as the official autoregressive inference).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax.configs import InfinityConfig
from sparvar_jax.nn import AdaLin, AdaLNBeforeHead, FFN, KVCache, SelfAttention
from sparvar_jax.nn import modulate, scan_layers, stack_modules, unbind_chunks
from sparvar_jax.nn.attention import DENSE
from sparvar_jax.nn.stack import run_segments
from sparvar_jax.nn.cross_attention import CrossAttention
from sparvar_jax.nn.rope import apply_rope2d, rope2d_table
from sparvar_jax.schedules import Schedule

_INIT = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
  """`FastRMSNorm`: x * rsqrt(mean(x^2) + eps) * weight, fp32 in and out."""

  def __init__(self, dim: int, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps) * \
        self.weight[...].astype(jnp.float32)


class TextProj(nnx.Module):
  """`text_proj_for_ca`: Linear(K, C) -> GELU(tanh) -> Linear(C, C), fp32.
  Torch keys `text_proj_for_ca.0.*` / `.2.*`; ours `fc0/*`, `fc2/*`."""

  def __init__(self, kv_dim: int, embed_dim: int, *, rngs, param_dtype=jnp.float32):
    kw = dict(dtype=jnp.float32, param_dtype=param_dtype, kernel_init=_INIT, rngs=rngs)
    self.fc0 = nnx.Linear(kv_dim, embed_dim, **kw)
    self.fc2 = nnx.Linear(embed_dim, embed_dim, **kw)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc0(x.astype(jnp.float32)), approximate=True))


class CrossAttnBlock(nnx.Module):
  """One Infinity block; the residual stream x stays fp32, layers compute in `dtype`."""

  def __init__(self, cfg: InfinityConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
               attn_impl: str, bf16_cross_attn: bool):
    C = cfg.embed_dim
    self.eps, self.dtype = cfg.norm_eps, dtype
    # Official init randn / sqrt(C) (random-weight runs only; checkpoints overwrite it).
    self.ada_gss = nnx.Param(jax.random.normal(rngs.params(), (6, C), jnp.float32) / C ** 0.5)
    self.sa = SelfAttention(C, cfg.num_heads, rngs=rngs, cos_attn=True, dtype=dtype,
                            param_dtype=param_dtype, attn_impl=attn_impl)
    self.ca = CrossAttention(C, C, cfg.num_heads, rngs=rngs, bf16_round=bf16_cross_attn,
                             dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl)
    self.ca_norm = nnx.LayerNorm(C, epsilon=cfg.norm_eps, dtype=jnp.float32,
                                 param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)
    self.ffn = FFN(C, cfg.mlp_hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_BLC, gss_B6C, ca_k, ca_v, text_mask_BT, *, rope_2Lk, mask=None,
               cache: KVCache | None = None, layer=0, offset: int = 0, attend=DENSE,
               attn_state=None):
    """-> (x_BLC fp32, cache, attn_out); `attend` / `attn_state` as in SelfAttention."""
    g1, g2, s1, s2, b1, b2 = unbind_chunks(self.ada_gss[...][None] + gss_B6C)

    def rope(q, k):
      return apply_rope2d(q, rope_2Lk), apply_rope2d(k, rope_2Lk)

    h = modulate(x_BLC, s1, b1, self.eps).astype(self.dtype)
    h, cache, attn_out = self.sa(h, mask=mask, cache=cache, layer=layer, offset=offset,
                                 rope=rope, attend=attend, attn_state=attn_state)
    x_BLC = x_BLC + h.astype(jnp.float32) * g1
    h = self.ca(self.ca_norm(x_BLC), ca_k, ca_v, text_mask_BT)
    x_BLC = x_BLC + h.astype(jnp.float32)
    h = self.ffn(modulate(x_BLC, s2, b2, self.eps).astype(self.dtype))
    return x_BLC + h.astype(jnp.float32) * g2, cache, attn_out


class Infinity(nnx.Module):
  """Infinity-2B/8B (and tiny test configs)."""

  def __init__(self, cfg: InfinityConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attn_impl: str = "xla", bf16_cross_attn: bool = True):
    """dtype: compute dtype of the blocks (top-level text/AdaLN/head modules are fp32).
    bf16_cross_attn: round cross-attention q/kv/output to bf16 as the official code does
    even in float32 (default); False gives a pure-float32 model."""
    self.cfg, self.dtype = cfg, dtype
    C, K = cfg.embed_dim, cfg.text_channels
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    # Random init follows the official constructor's distributions (checkpoints overwrite
    # it): cfg_uncond trunc-normal std 1.2 (cut at +-2) / sqrt(K); pos_start and lvl_embed
    # trunc-normal std sqrt(1 / (3C)).
    init_std = (1 / C / 3) ** 0.5
    tn = nnx.initializers.truncated_normal
    self.cfg_uncond = nnx.Param(tn(1.2, lower=-2 / 1.2, upper=2 / 1.2)(
        rngs.params(), (cfg.text_maxlen, K), jnp.float32) / K ** 0.5)
    self.text_norm = RMSNorm(K, cfg.norm_eps)
    self.text_proj_for_sos = CrossAttention(C, K, cfg.pool_heads, rngs=rngs, for_attn_pool=True,
                                            bf16_round=bf16_cross_attn, **f32)
    self.text_proj_for_ca = TextProj(K, C, rngs=rngs)
    self.pos_start = nnx.Param(tn(init_std)(rngs.params(), (C,), jnp.float32))
    self.lvl_embed = nnx.Embed(cfg.num_lvl, C, embedding_init=tn(init_std), rngs=rngs, **f32)
    self.word_embed = nnx.Linear(cfg.d_vae, C, kernel_init=_INIT, rngs=rngs, **f32)
    self.shared_ada_lin = AdaLin(C, C, 6, rngs=rngs)
    self.blocks = stack_modules(
        lambda r: CrossAttnBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype,
                                 attn_impl=attn_impl, bf16_cross_attn=bf16_cross_attn),
        cfg.depth, rngs)
    self.head_nm = AdaLNBeforeHead(C, C, rngs=rngs, eps=cfg.norm_eps)
    self.head = nnx.Linear(C, 2 * cfg.d_vae, kernel_init=_INIT, rngs=rngs, **f32)

  # ---------------------------------------------------------------- text and condition

  def encode_text(self, text_BTK: jax.Array, text_mask_BT: jax.Array):
    """Padded T5 features [B, T, K] + mask -> (cond_BD fp32, ca_kv_BTC fp32)."""
    normed = self.text_norm(text_BTK)
    k, v = self.text_proj_for_sos.kv(normed)
    cond_BD = self.text_proj_for_sos(None, k, v, text_mask_BT)[:, 0].astype(jnp.float32)
    return cond_BD, self.text_proj_for_ca(normed)

  def block_text_kv(self, ca_kv_BTC: jax.Array):
    """Per-layer cross-attention k, v [N, B, T, H, c], computed once per prompt batch."""
    def body(blk, carry, _):
      return carry, blk.ca.kv(ca_kv_BTC)
    _, (k, v) = scan_layers(self.blocks, body, None)
    return k, v

  def cond_gss(self, cond_BD):
    """shared_ada_lin(cond) [B, 6, C] fp32."""
    return self.shared_ada_lin(cond_BD).astype(jnp.float32)

  def sos(self, cond_BD):
    """First-scale input [B, 1, C]: sos + pos_start."""
    return (cond_BD + self.pos_start[...])[:, None, :]

  def embed_input(self, x_BLd):
    """word_embed of next-scale inputs [B, l, d] -> [B, l, C] fp32."""
    return self.word_embed(x_BLd.astype(jnp.float32))

  def logits(self, h_BLC, cond_BD):
    """head(head_nm(h, cond)) in fp32 -> [B, L, 2d]."""
    return self.head(self.head_nm(h_BLC.astype(jnp.float32), cond_BD.astype(jnp.float32)))

  # ---------------------------------------------------------------- blocks

  def _run_blocks(self, x_BLC, gss, ca_k, ca_v, text_mask_BT, rope_2Lk, mask, cache, offset,
                  segments=None, sparse=None):
    """All blocks, one lax.scan per plan segment -> (x_BLC, cache, sparse state).

    segments: the scale's plan segments (`.start`, `.stop`, `.attend`); None runs every
    layer dense. A segment whose attention consumes sparse state scans over `sparse`
    (leading axis = its layers); one that produces it returns the new state."""
    def call_block(blk, x, cache, i, attend, st):
      k = jax.lax.dynamic_index_in_dim(ca_k, i, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(ca_v, i, 0, keepdims=False)
      return blk(x, gss, k, v, text_mask_BT, rope_2Lk=rope_2Lk, mask=mask, cache=cache,
                 layer=i, offset=offset, attend=attend, attn_state=st)

    return run_segments(self.blocks, self.cfg.depth, segments, call_block, x_BLC, cache,
                        sparse)

  def forward(self, text_BTK, text_mask_BT, x_BLd_wo_prefix, schedule: Schedule):
    """Teacher forcing (official `Infinity.forward`): logits [B, L, 2d] fp32.

    x_BLd_wo_prefix: the next-scale inputs of scales 1.. (L - 1 rows of d_vae bits space).
    """
    cond_BD, ca_kv = self.encode_text(text_BTK, text_mask_BT)
    gss = self.cond_gss(cond_BD)
    x = jnp.concatenate([self.sos(cond_BD), self.embed_input(x_BLd_wo_prefix)], axis=1)
    lvl_L = np.concatenate([np.full(n, i) for i, n in enumerate(schedule.lengths)])
    if x.shape[1] != lvl_L.size:
      raise ValueError(f"x_BLd_wo_prefix has {x.shape[1] - 1} tokens; the schedule needs "
                       f"{lvl_L.size - 1}")
    x = x + self.lvl_embed(jnp.asarray(lvl_L))[None]
    mask = lvl_L[:, None] >= lvl_L[None, :]
    rope = rope2d_table(self.cfg.head_dim, schedule.scales, schedule.rope_hw,
                        self.cfg.rope_max_hw, self.cfg.rope_theta)
    ca_k, ca_v = self.block_text_kv(ca_kv)
    x, _, _ = self._run_blocks(x, gss, ca_k, ca_v, text_mask_BT, rope, mask, None, 0)
    return self.logits(x, cond_BD)

  def init_cache(self, batch: int, schedule: Schedule, dtype=None, pad_to: int = 1) -> KVCache:
    return KVCache.zeros(self.cfg.depth, batch, schedule.total_tokens, self.cfg.num_heads,
                         self.cfg.head_dim, dtype or self.dtype, pad_to)

  def scale_step(self, si: int, schedule: Schedule, x_BlC, cond_BD, gss, ca_k, ca_v,
                 text_mask_BT, cache: KVCache, segments=None, sparse=None):
    """One scale with the KV cache (si static): x_BlC (embedded input) -> (logits
    [B, l, 2d] fp32, cache, sparse state). Adds the level embedding itself. segments /
    sparse: the scale's attention plan and SparVAR state (see `_run_blocks`)."""
    start = schedule.offsets[si]
    l = schedule.lengths[si]
    if x_BlC.shape[1] != l:
      raise ValueError(f"scale {si} has {l} tokens, got {x_BlC.shape[1]}")
    rope = rope2d_table(self.cfg.head_dim, schedule.scales, schedule.rope_hw,
                        self.cfg.rope_max_hw, self.cfg.rope_theta)[:, start:start + l]
    x = x_BlC.astype(jnp.float32) + self.lvl_embed.embedding[...][si]
    x, cache, sparse = self._run_blocks(x, gss, ca_k, ca_v, text_mask_BT, rope, None, cache,
                                        start, segments, sparse)
    return self.logits(x, cond_BD), cache, sparse


def abstract_infinity(cfg: InfinityConfig, dtype=jnp.float32, *, param_dtype=jnp.float32,
                      attn_impl: str = "xla", bf16_cross_attn: bool = True) -> Infinity:
  """An Infinity whose parameters are shape/dtype placeholders (no random init, no
  memory): fill it with `sparvar_jax.checkpoint.load_into(model, tree)` before use."""
  return nnx.eval_shape(lambda: Infinity(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                         param_dtype=param_dtype, attn_impl=attn_impl,
                                         bf16_cross_attn=bf16_cross_attn))


def load_infinity(ckpt_dir: str, dtype=jnp.float32, *, param_dtype=jnp.float32,
                  attn_impl: str = "xla", bf16_cross_attn: bool = True, with_vae: bool = True,
                  cfgs: dict | None = None):
  """Reads a directory written by `python -m convert.infinity` -> (Infinity, BSQ VAE or
  None, {name: config}). cfgs: the directory's configs when already read."""
  from sparvar_jax import checkpoint  # pylint: disable=g-import-not-at-top

  if cfgs is None:
    cfgs, _ = checkpoint.read_config(ckpt_dir)
  cfg = cfgs.get("infinity")
  if not isinstance(cfg, InfinityConfig) or "vae" not in cfgs:
    raise checkpoint.CheckpointError(
        f"{ckpt_dir!r} is not a converted Infinity checkpoint (its config.json lists "
        f"{sorted(cfgs)}); convert with `python -m convert.infinity --model ... --vae ...`.")
  model = abstract_infinity(cfg, dtype, param_dtype=param_dtype, attn_impl=attn_impl,
                            bf16_cross_attn=bf16_cross_attn)
  checkpoint.load_into(model, checkpoint.read_tree(ckpt_dir, "infinity"),
                       what="Infinity transformer")
  vae = None
  if with_vae:
    from sparvar_jax.vae import bsq  # pylint: disable=g-import-not-at-top
    vae = nnx.eval_shape(lambda: bsq.BSQVAE(cfgs["vae"], rngs=nnx.Rngs(0)))
    checkpoint.load_into(vae, checkpoint.read_tree(ckpt_dir, "vae"), what="BSQ VAE")
  return model, vae, cfgs
