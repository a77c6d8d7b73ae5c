"""Infinity in the scale loop (official `Infinity.autoregressive_infer_cfg` with
`cfg_insertion_layer=[0]`, as tools/run_infinity.py drives it).

1. Guidance doubles the batch (when any cfg != 1): rows B..2B-1 take the learned
   `cfg_uncond[:len_i]` (truncated to each prompt's own length) or a negative prompt.
2. Text: text_norm -> pooled condition cond_BD (sos and AdaLN condition) and the
   cross-attention source; the per-layer text k/v are computed once.
3. Each scale: logits = head(...) / tau[si]; logits = cfg[si] * cond + (1 - cfg[si]) * uncond;
   per bit, the 2-way logits are sampled with top-k/top-p (official semantics: top-k >= 2
   does nothing, top-k = 1 is argmax; top-p p forces the majority bit when the minority
   probability is <= 1 - p, e.g. 0.03 for the default 0.97); bits -> codes (2b - 1)/sqrt(d)
   on the VAE grid (2x2 pixel shuffle with patchify) -> summed_codes += bilinear up-size (no
   antialias; a plain add at the schedule's last scale) -> next input = bilinear resize of
   summed_codes to the next grid (pixel-unshuffled with patchify) -> word_embed.
4. VAE decode of summed_codes.

Bits are in the transformer token layout [B, h*w, d] (row-major tokens).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparvar_jax.generate import LoopOptions, ScaleLoop
from sparvar_jax.schedules import Schedule
from sparvar_jax.sparse.plan import AttnPlan

Floats = float | Sequence[float]


@dataclasses.dataclass(frozen=True)
class InfinitySampling:
  """Sampling settings; cfg and tau are one number or one per scale.

  Defaults follow tools/run_infinity.py `gen_one_img` (top_k=900, top_p=0.97), the 8B
  notebook (cfg=3, tau=1). top_k=1 is greedy (argmax per bit)."""

  cfg: Floats = 3.0
  tau: Floats = 1.0
  top_k: int = 900
  top_p: float = 0.97

  def per_scale(self, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    out = []
    for name, v in (("cfg", self.cfg), ("tau", self.tau)):
      vals = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * n))
      if len(vals) < n:
        raise ValueError(f"{name} has {len(vals)} values but the schedule has {n} scales; give "
                         "one number or one per scale.")
      vals = vals[:n]
      if not all(math.isfinite(x) for x in vals):
        raise ValueError(f"{name} values must be finite, got {vals}")
      if name == "tau" and any(x <= 0 for x in vals):
        raise ValueError(f"tau must be > 0, got {vals}")
      out.append(vals)
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
    if not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"top_p must be in [0, 1] (0 or 1 keeps every bit), got {self.top_p}")
    return out[0], out[1]


def sample_bits(key: jax.Array, logits_ld2: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """One bit per (token, bit) from 2-way logits [..., 2] -> int32 [...] in {0, 1}.

  The official `sample_with_top_k_top_p_also_inplace_modifying_logits_` on V = 2:
  top_k >= 2 keeps both, top_k = 1 keeps the larger (argmax, no draw); top_p removes the
  smaller when its probability is <= 1 - top_p (top_p 0 or 1 removes nothing); then a
  categorical draw."""
  l0 = logits_ld2[..., 0].astype(jnp.float32)
  l1 = logits_ld2[..., 1].astype(jnp.float32)
  major = (l1 > l0).astype(jnp.int32)
  if top_k == 1:
    return major
  p1 = jax.nn.sigmoid(l1 - l0)
  draw = (jax.random.uniform(key, p1.shape, jnp.float32) < p1).astype(jnp.int32)
  if 0 < top_p < 1:
    minority = jnp.minimum(p1, 1.0 - p1)
    draw = jnp.where(minority <= 1.0 - top_p, major, draw)
  return draw


def bucket_text_len(lens: Sequence[int], multiple: int = 64, maxlen: int = 512) -> int:
  """A padded text length for the generator: max(lens) rounded up to `multiple` (few
  distinct compiled shapes; padded keys are masked, so the result does not change)."""
  n = max(int(x) for x in lens)
  if not 1 <= n <= maxlen:
    raise ValueError(f"prompt lengths must be in [1, {maxlen}], got max {n}")
  return min(-(-n // multiple) * multiple, maxlen)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TextContext:
  """Per-row conditioning of one batch (rows: 2B under guidance)."""
  cond_BD: jax.Array  # pooled text: sos and AdaLN condition
  gss_B6C: jax.Array  # shared_ada_lin(cond)
  ca_k: jax.Array  # [N, B, T, H, c] per-layer cross-attention keys
  ca_v: jax.Array
  mask_BT: jax.Array  # valid text tokens
  SHARD_AXES = {"ca_k": (1, 3), "ca_v": (1, 3)}  # (rows, heads); the rest: rows first


class InfinityAdapter:
  """Infinity + BSQ VAE for `ScaleLoop` (see generate.py for the interface).

  vae: the BSQ VAE (`sparvar_jax.vae.bsq.BSQVAE`): its bits -> codes -> next-input helpers
  drive the loop and `decode` makes the image. A VAE built with `nnx.eval_shape` (no
  weights) is enough when nothing is decoded."""

  def __init__(self, model, vae, schedule: Schedule, settings: InfinitySampling, *,
               text_len: int | None = None, cache_dtype=None):
    cfg = model.cfg
    n = schedule.num_scales
    if n > cfg.num_lvl:
      raise ValueError(f"the schedule has {n} scales but the model has {cfg.num_lvl} levels")
    self.cfgs, self.taus = settings.per_scale(n)
    self.uses_cfg = any(c != 1.0 for c in self.cfgs)
    self.settings, self.schedule = settings, schedule
    self.model, self.vae, self.depth = model, vae, cfg.depth
    self.text_len = int(text_len or cfg.text_maxlen)
    if not 1 <= self.text_len <= cfg.text_maxlen:
      raise ValueError(f"text_len must be in [1, {cfg.text_maxlen}], got {text_len}")
    if vae.cfg.bits_per_token != cfg.d_vae:
      raise ValueError(f"the VAE gives {vae.cfg.bits_per_token} bits per token but the "
                       f"transformer predicts {cfg.d_vae}: they do not belong together.")
    self.vae_hw = tuple(vae.vae_hw(hw) for hw in schedule.scales)
    self.cache_dtype = cache_dtype
    self._uncond = None  # host copy of cfg_uncond, made on first use

  # -- host side ------------------------------------------------------------------------

  def _pad_text(self, feats, lens, what):
    feats = np.asarray(feats, np.float32)
    lens = np.asarray(lens, np.int64).reshape(-1)
    K = self.model.cfg.text_channels
    if feats.ndim != 3 or feats.shape[-1] != K:
      raise ValueError(f"{what} features must be [B, L, {K}], got {feats.shape}")
    if feats.shape[0] != lens.shape[0]:
      raise ValueError(f"{what}: {feats.shape[0]} feature rows but {lens.shape[0]} lengths")
    if np.any(lens < 1) or np.any(lens > min(feats.shape[1], self.text_len)):
      raise ValueError(f"{what} lengths must be in [1, {min(feats.shape[1], self.text_len)}] "
                       f"(the generator's text_len is {self.text_len}), got {lens.tolist()}")
    out = np.zeros((feats.shape[0], self.text_len, K), np.float32)
    mask = np.zeros((feats.shape[0], self.text_len), bool)
    for i, n in enumerate(lens):
      out[i, :n] = feats[i, :n]
      mask[i, :n] = True
    return out, mask, lens

  def prepare(self, batch: int, text_BLK, lens_B, negative=None):
    """text_BLK: T5 features [B, L, K] (rows past each length ignored), lens_B: lengths.
    negative: optional (features [1 or B, L, K], lens) replacing cfg_uncond."""
    text, mask, lens = self._pad_text(text_BLK, lens_B, "prompt")
    if text.shape[0] != batch:
      raise ValueError(f"the generator was built for batch {batch}, got {text.shape[0]} prompts")
    if negative is not None:
      un, un_mask, _ = self._pad_text(negative[0], negative[1], "negative prompt")
      if un.shape[0] == 1:
        un, un_mask = np.repeat(un, batch, 0), np.repeat(un_mask, batch, 0)
      if un.shape[0] != batch:
        raise ValueError(f"give 1 or {batch} negative prompts, got {un.shape[0]}")
    else:  # the learned cfg_uncond truncated to each prompt's own length
      if self._uncond is None:
        self._uncond = np.asarray(self.model.cfg_uncond[...], np.float32)
      un = np.zeros_like(text)
      for i, n in enumerate(lens):
        un[i, :n] = self._uncond[:n]
      un_mask = mask.copy()
    return tuple(jnp.asarray(a) for a in (text, mask, un, un_mask))

  def scalars(self, si: int):
    return jnp.float32(self.cfgs[si]), jnp.float32(self.taus[si])

  # -- traced ---------------------------------------------------------------------------

  def begin(self, model, vae, cond, B: int):
    del vae
    text_BTK, mask_BT, un_BTK, un_mask_BT = cond
    if self.uses_cfg:
      text_BTK = jnp.concatenate([text_BTK, un_BTK], axis=0)
      mask_BT = jnp.concatenate([mask_BT, un_mask_BT], axis=0)
    cond_BD, ca_kv = model.encode_text(text_BTK, mask_BT)
    ca_k, ca_v = model.block_text_kv(ca_kv)
    ctx = TextContext(cond_BD, model.cond_gss(cond_BD), ca_k, ca_v, mask_BT)
    cache = model.init_cache(text_BTK.shape[0], self.schedule, self.cache_dtype)
    H, W = self.vae_hw[-1]
    summed = jnp.zeros((B, H, W, self.vae.cfg.codebook_dim), jnp.float32)
    return ctx, model.sos(cond_BD), cache, summed

  def cond_rows(self, ctx: TextContext, B: int) -> TextContext:
    return TextContext(ctx.cond_BD[:B], ctx.gss_B6C[:B], ctx.ca_k[:, :B], ctx.ca_v[:, :B],
                       ctx.mask_BT[:B])

  def transformer(self, model, si, x_BlC, ctx: TextContext, cache, segments, sparse):
    return model.scale_step(si, self.schedule, x_BlC, ctx.cond_BD, ctx.gss_B6C, ctx.ca_k,
                            ctx.ca_v, ctx.mask_BT, cache, segments, sparse)

  def guide(self, si, logits, B, guided, scalars):
    cfg, tau = scalars
    logits = logits.astype(jnp.float32) * (1.0 / tau)  # official: .mul(1 / tau)
    if guided:
      logits = cfg * logits[:B] + (1.0 - cfg) * logits[B:]
    h, w = self.schedule.scales[si]
    return logits.reshape(logits.shape[0], h * w, -1, 2)

  def sample(self, si, keys_B, logits_Bld2):
    s = self.settings
    return jax.vmap(lambda k, lg: sample_bits(k, lg, s.top_k, s.top_p))(keys_B,
                                                                       logits_Bld2), None

  def advance(self, model, vae, si, bits, aux, summed, schedule_last, has_next):
    # The VAE helpers use only the VAE's config (no weights): bits -> codes on the VAE grid,
    # summed += bilinear up-size (plain add at the schedule's last scale), next input.
    del vae, aux
    h, w = self.schedule.scales[si]
    B = bits.shape[0]
    codes = self.vae.bits_to_codes(bits.astype(jnp.int32).reshape(B, h, w, -1))
    summed = self.vae.add_scale_codes(summed, codes, si, schedule_last)
    if not has_next:
      return summed, None
    nxt = self.vae.next_scale_input(summed, self.schedule.scales[si + 1])
    return summed, model.embed_input(nxt)

  def output_tokens(self, bits):
    return bits.astype(jnp.uint8)

  def decode(self, vae, summed):
    return vae.decode(summed)


def infinity_generator(model, vae, schedule: Schedule, batch: int,
                       settings: InfinitySampling = InfinitySampling(), *,
                       text_len: int | None = None, cache_dtype=None,
                       plan: AttnPlan | None = None,
                       options: LoopOptions = LoopOptions()) -> ScaleLoop:
  """A `ScaleLoop` for Infinity: call it with (text features [B, L, K], lengths [B]) and
  optionally negative=(features, lengths), seed= or keys=."""
  return ScaleLoop(InfinityAdapter(model, vae, schedule, settings, text_len=text_len,
                                   cache_dtype=cache_dtype), batch, plan, options)
