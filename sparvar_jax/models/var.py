"""VAR, the class-conditional next-scale-prediction transformer (FoundationVision/VAR).

Letters: B batch (2B under CFG), L all tokens of the schedule, l tokens of one scale,
C width, D condition width (= C), V vocabulary, Cv VQVAE latent channels (Cvae),
H heads, c head dim, N layers.

Two modes:
- `teacher_forward(label_B, x_BLCv)`: all scales at once with the block-causal mask
  (official `VAR.forward` with cond_drop_rate=0).
- per-scale inference with a preallocated KV cache (official `autoregressive_infer_cfg`):
  `cond` -> `first_input` -> `scale_step(0)` -> [sample, VQVAE] -> `next_input(1)` ->
  `scale_step(1)` -> ... Each `scale_step(si, ...)` has static shapes for a static si,
  so it is one compiled step per scale (`nnx.jit(VAR.scale_step, static_argnums=1)`).

Precision: parameters in `param_dtype` (fp32 by default); matmuls in `dtype`; the
residual stream, norms, AdaLN modulation, softmax statistics and logits in fp32 (as
under PyTorch autocast, where the residual stays fp32). Embeddings, head_nm and head are
always fp32 parameters and compute.

The layers are stacked (leading axis N) and run under `jax.lax.scan`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax.configs import VARConfig
from sparvar_jax.nn import adaln
from sparvar_jax.nn.attention import block_causal_mask
from sparvar_jax.nn.ffn import FFN
from sparvar_jax.nn.kv_cache import KVCache
from sparvar_jax.nn.self_attention import SelfAttention
from sparvar_jax.nn.attention import DENSE
from sparvar_jax.nn.stack import run_segments, stack_modules

F32 = jnp.float32


@functools.lru_cache(maxsize=None)
def begin_ends(patch_nums: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """Token range [begin, end) of each scale in the flattened schedule."""
  out, cur = [], 0
  for pn in patch_nums:
    out.append((cur, cur + pn * pn))
    cur += pn * pn
  return tuple(out)


@functools.lru_cache(maxsize=None)
def _mask_LL(patch_nums: tuple[int, ...]) -> np.ndarray:
  return block_causal_mask(patch_nums)


class AdaLNSelfAttn(nnx.Module):
  """One VAR block (official `AdaLNSelfAttn`):

    x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gamma2 * FFN (LN(x) * (1 + scale2) + shift2)

  with (gamma1, gamma2, scale1, scale2, shift1, shift2) = ada_lin(cond_BD), or
  ada_gss + shared_gss_B6C when the AdaLN is shared (d36).
  """

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs, dtype=F32, param_dtype=F32,
               attn_impl: str = "xla"):
    C = cfg.embed_dim
    self.shared_aln, self.eps, self.dtype = cfg.shared_aln, cfg.norm_eps, dtype
    self.attn = SelfAttention(C, cfg.num_heads, rngs=rngs, cos_attn=cfg.attn_l2_norm,
                              dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl)
    self.ffn = FFN(C, cfg.mlp_hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.shared_aln:
      self.ada_gss = nnx.Param(
          jax.random.normal(rngs.params(), (6, C), param_dtype) / math.sqrt(C))
    else:
      self.ada_lin = adaln.AdaLin(C, C, 6, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_BLC, cond, *, mask=None, cache: KVCache | None = None, layer=0,
               offset: int = 0, attend=DENSE, attn_state=None):
    """x_BLC fp32; cond: cond_BD, or the shared gss [B, 6, C] when shared_aln.
    `attend` / `attn_state`: the layer's attention kind and sparse state (SelfAttention).

    Returns (x_BLC fp32, cache, attn_out)."""
    if self.shared_aln:
      gss_B6C = self.ada_gss[...].astype(F32)[None] + cond.astype(F32)
    else:
      gss_B6C = self.ada_lin(cond).astype(F32)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = adaln.unbind_chunks(gss_B6C)
    h_BLC = adaln.modulate(x_BLC, scale1, shift1, self.eps).astype(self.dtype)
    a_BLC, cache, attn_out = self.attn(h_BLC, mask=mask, cache=cache, layer=layer,
                                       offset=offset, attend=attend, attn_state=attn_state)
    x_BLC = x_BLC + a_BLC.astype(F32) * gamma1
    h_BLC = adaln.modulate(x_BLC, scale2, shift2, self.eps).astype(self.dtype)
    x_BLC = x_BLC + self.ffn(h_BLC).astype(F32) * gamma2
    return x_BLC, cache, attn_out


class VAR(nnx.Module):
  """The VAR transformer; parameter paths mirror the official state-dict names.

  class_emb/embedding [num_classes+1, C] (row num_classes = null class), pos_start
  [1, 1, C], pos_1LC [1, L, C], lvl_embed/embedding [K, C], word_embed/{kernel [Cv, C],
  bias}, shared_ada_lin/{kernel, bias} (shared AdaLN only), blocks/... [N, ...],
  head_nm/ada_lin/{kernel [C, 2C], bias}, head/{kernel [C, V], bias}.
  """

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs, dtype=F32, param_dtype=F32,
               attn_impl: str = "xla"):
    self.cfg, self.dtype = cfg, dtype
    C, K = cfg.embed_dim, cfg.num_scales
    first_l = cfg.patch_nums[0] ** 2
    std = math.sqrt(1 / C / 3)  # official init_std
    tn = nnx.initializers.truncated_normal(std)
    self.class_emb = nnx.Embed(cfg.num_classes + 1, C, embedding_init=tn, param_dtype=F32,
                               rngs=rngs)
    self.pos_start = nnx.Param(tn(rngs.params(), (1, first_l, C), F32))
    self.pos_1LC = nnx.Param(tn(rngs.params(), (1, cfg.seq_len, C), F32))
    self.lvl_embed = nnx.Embed(K, C, embedding_init=tn, param_dtype=F32, rngs=rngs)
    self.word_embed = nnx.Linear(cfg.cvae, C, param_dtype=F32, rngs=rngs)
    if cfg.shared_aln:
      self.shared_ada_lin = adaln.AdaLin(C, C, 6, rngs=rngs, dtype=dtype,
                                         param_dtype=param_dtype)
    self.blocks = stack_modules(
        lambda r: AdaLNSelfAttn(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype,
                                attn_impl=attn_impl), cfg.depth, rngs)
    self.head_nm = adaln.AdaLNBeforeHead(C, C, rngs=rngs, eps=cfg.norm_eps)
    self.head = nnx.Linear(C, cfg.vocab_size, param_dtype=F32,
                           kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  # -- embeddings -----------------------------------------------------------------------

  def cond(self, label_B: jax.Array) -> jax.Array:
    """Class embedding: int [B] (num_classes = null class) -> cond_BD fp32."""
    return self.class_emb(label_B.astype(jnp.int32)).astype(F32)

  def lvl_pos(self) -> jax.Array:
    """lvl_embed(lvl_1L) + pos_1LC -> [1, L, C] fp32."""
    lvl_L = np.concatenate([np.full(pn * pn, i, np.int32)
                            for i, pn in enumerate(self.cfg.patch_nums)])
    return self.lvl_embed.embedding[...][lvl_L][None] + self.pos_1LC[...]

  def first_input(self, cond_BD: jax.Array) -> jax.Array:
    """sos + pos_start + lvl_pos[:, :first_l] -> x_B1C fp32 (input of scale 0)."""
    first_l = self.cfg.patch_nums[0] ** 2
    sos_BlC = jnp.broadcast_to(cond_BD[:, None, :], (cond_BD.shape[0], first_l,
                                                      cond_BD.shape[1]))
    return sos_BlC + self.pos_start[...] + self.lvl_pos()[:, :first_l]

  def next_input(self, si: int, next_BhwCv: jax.Array) -> jax.Array:
    """Input of scale si >= 1 from the area-downsampled f_hat [B, h, w, Cv] (or [B, l, Cv]):
    word_embed(.) + lvl_pos of scale si -> x_BlC fp32."""
    bg, ed = begin_ends(self.cfg.patch_nums)[si]
    B = next_BhwCv.shape[0]
    x_BlCv = next_BhwCv.reshape(B, -1, next_BhwCv.shape[-1]).astype(F32)
    if x_BlCv.shape[1:] != (ed - bg, self.cfg.cvae):
      raise ValueError(f"scale {si} expects {ed - bg} tokens of {self.cfg.cvae} channels, "
                       f"got {next_BhwCv.shape}")
    return self.word_embed(x_BlCv) + self.lvl_pos()[:, bg:ed]

  # -- trunk and head -----------------------------------------------------------------

  def blocks_forward(self, x_BLC, cond_BD, *, mask=None, cache: KVCache | None = None,
                     offset: int = 0, segments=None, sparse=None):
    """All layers, one lax.scan per attention-plan segment -> (x_BLC fp32, cache, sparse).

    segments: the scale's plan segments (`.start`, `.stop`, `.attend`), None = every layer
    dense; sparse: the SparVAR state the segments consume or produce."""
    cond = self.shared_ada_lin(cond_BD) if self.cfg.shared_aln else cond_BD

    def call_block(blk, x, c, i, attend, st):
      return blk(x, cond, mask=mask, cache=c, layer=i, offset=offset, attend=attend,
                 attn_state=st)

    return run_segments(self.blocks, self.cfg.depth, segments, call_block, x_BLC.astype(F32),
                        cache, sparse)

  def logits(self, x_BLC: jax.Array, cond_BD: jax.Array) -> jax.Array:
    """head(head_nm(x, cond)) in fp32 -> logits_BLV."""
    return self.head(self.head_nm(x_BLC.astype(F32), cond_BD.astype(F32)))

  # -- the two modes --------------------------------------------------------------------

  def teacher_forward(self, label_B: jax.Array, x_BLCv: jax.Array) -> jax.Array:
    """label_B int [B], x_BLCv [B, L - first_l, Cv] (VQVAE teacher-forcing input)
    -> logits_BLV fp32 [B, L, V]."""
    cfg = self.cfg
    first_l = cfg.patch_nums[0] ** 2
    B = label_B.shape[0]
    if x_BLCv.shape != (B, cfg.seq_len - first_l, cfg.cvae):
      raise ValueError(f"x_BLCv must be [{B}, {cfg.seq_len - first_l}, {cfg.cvae}], got "
                       f"{x_BLCv.shape}")
    cond_BD = self.cond(label_B)
    sos_BlC = jnp.broadcast_to(cond_BD[:, None, :], (B, first_l, cfg.embed_dim))
    x_BLC = jnp.concatenate([sos_BlC + self.pos_start[...],
                             self.word_embed(x_BLCv.astype(F32))], axis=1)
    x_BLC = x_BLC + self.lvl_pos()
    x_BLC, _, _ = self.blocks_forward(x_BLC, cond_BD, mask=_mask_LL(cfg.patch_nums))
    return self.logits(x_BLC, cond_BD)

  def init_cache(self, batch: int, dtype=None, *, pad_to: int = 128) -> KVCache:
    """Zero KV cache k, v [N, batch, L_pad, H, c] (L_pad = L rounded up to pad_to)."""
    cfg = self.cfg
    return KVCache.zeros(cfg.depth, batch, cfg.seq_len, cfg.num_heads, cfg.head_dim,
                         self.dtype if dtype is None else dtype, pad_to=pad_to)

  def scale_step(self, si: int, x_BlC: jax.Array, cond_BD: jax.Array, cache: KVCache,
                 segments=None, sparse=None):
    """One scale (static si): writes its k/v at the scale's offset, attends to the whole
    prefix [0, end_si) without a mask -> (logits_BlV fp32, cache, sparse state).
    segments / sparse: the scale's attention plan and SparVAR state (`blocks_forward`)."""
    bg, ed = begin_ends(self.cfg.patch_nums)[si]
    if x_BlC.shape[1] != ed - bg:
      raise ValueError(f"scale {si} has {ed - bg} tokens, got x_BlC {x_BlC.shape}")
    x_BlC, cache, sparse = self.blocks_forward(x_BlC, cond_BD, cache=cache, offset=bg,
                                               segments=segments, sparse=sparse)
    return self.logits(x_BlC, cond_BD), cache, sparse


def abstract_var(cfg: VARConfig, dtype=F32, *, param_dtype=F32, attn_impl: str = "xla") -> VAR:
  """A VAR whose parameters are shape/dtype placeholders (no random init, no memory):
  fill it with `sparvar_jax.checkpoint.load_into(model, tree)` before use."""
  return nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                    param_dtype=param_dtype, attn_impl=attn_impl))


def _load_module(make, tree, what: str):
  """Builds `make()` without random init (abstract) where it holds only parameters, then
  fills it strictly from `tree`."""
  from sparvar_jax import checkpoint  # pylint: disable=g-import-not-at-top
  m = nnx.eval_shape(make)
  if jax.tree.leaves(nnx.state(m, nnx.Not(nnx.Param))):
    m = make()  # non-parameter state is computed at construction: build it for real
  return checkpoint.load_into(m, tree, what=what)


def load_var(ckpt_dir: str, dtype=F32, *, param_dtype=F32, attn_impl: str = "xla"):
  """Reads a directory written by `python -m convert.var` -> (VAR, VQVAE).

  dtype: compute dtype of the transformer blocks (bf16 on GPU); param_dtype: storage of
  the block parameters (embeddings, head_nm and head stay fp32).
  """
  from sparvar_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sparvar_jax.vae.var_vqvae import VQVAE  # pylint: disable=g-import-not-at-top

  cfgs, _ = checkpoint.read_config(ckpt_dir)
  var_cfg, vae_cfg = cfgs.get("var"), cfgs.get("vae")
  if not isinstance(var_cfg, VARConfig) or vae_cfg is None:
    raise checkpoint.CheckpointError(
        f"{ckpt_dir!r} is not a converted VAR checkpoint (its config.json lists "
        f"{sorted(cfgs)}); convert with `python -m convert.var`.")
  var = _load_module(lambda: VAR(var_cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                 param_dtype=param_dtype, attn_impl=attn_impl),
                     checkpoint.read_tree(ckpt_dir, "var"), "VAR transformer")
  vae = _load_module(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)),
                     checkpoint.read_tree(ckpt_dir, "vae"), "VQVAE")
  return var, vae
