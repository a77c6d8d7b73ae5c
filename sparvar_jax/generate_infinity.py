"""Infinity's per-scale sampling loop (official `Infinity.autoregressive_infer_cfg` with
`cfg_insertion_layer=[0]`, as tools/run_infinity.py drives it).

1. CFG doubles the batch (when any cfg != 1): rows B..2B-1 take the learned
   `cfg_uncond[:len_i]` (truncated to each prompt's own length) or a negative prompt.
2. Text: text_norm -> pooled condition cond_BD (sos and AdaLN condition) and the
   cross-attention source; the per-layer text k/v are computed once.
3. For each scale si (one jitted step, KV cache donated from step to step):
   logits = head(...) / tau[si]; logits = cfg[si] * cond + (1 - cfg[si]) * uncond;
   per bit, the 2-way logits are sampled with top-k/top-p (official semantics: top-k >= 2
   does nothing, top-k = 1 is argmax; top-p p forces the majority bit when the minority
   probability is <= 1 - p, e.g. 0.03 for the default 0.97) from a seeded JAX RNG;
   bits -> codes (2b - 1)/sqrt(d) on the VAE grid (2x2 pixel shuffle with patchify) ->
   summed_codes += bilinear up-size (no antialias) -> next input = bilinear resize of
   summed_codes to the next grid (pixel-unshuffled with patchify) -> word_embed.
4. VAE decode of summed_codes.

Bits are returned in the transformer token layout [B, h*w, d] (row-major tokens).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax.schedules import Schedule

ProgressFn = Callable[[int, int, float], None]  # (scale index, num scales, seconds)
Floats = float | Sequence[float]


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


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
    if not 0.0 <= self.top_p < 1.0:
      raise ValueError(f"top_p must be in [0, 1) (0 turns it off), got {self.top_p}")
    return out[0], out[1]


def sample_bits(key: jax.Array, logits_Bld2: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """One bit per (token, bit) from 2-way logits [..., 2] -> int32 [...] in {0, 1}.

  The official `sample_with_top_k_top_p_also_inplace_modifying_logits_` on V = 2:
  top_k >= 2 keeps both, top_k = 1 keeps the larger (argmax, no draw); top_p removes the
  smaller when its probability is <= 1 - top_p; then a categorical draw."""
  l0 = logits_Bld2[..., 0].astype(jnp.float32)
  l1 = logits_Bld2[..., 1].astype(jnp.float32)
  major = (l1 > l0).astype(jnp.int32)
  if top_k == 1:
    return major
  p1 = jax.nn.sigmoid(l1 - l0)
  draw = (jax.random.uniform(key, p1.shape, jnp.float32) < p1).astype(jnp.int32)
  if top_p > 0:
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


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class InfinityResult:
  image_BHW3: np.ndarray | None  # float32 RGB in [0, 1] (None without decode)
  bits_per_scale: list[np.ndarray]  # uint8 [B, h*w, d] per scale
  summed_codes_BHWd: np.ndarray  # fp32 VAE latent fed to the decoder
  logits_per_scale: list[np.ndarray] | None  # fp32 [B, h*w, d, 2] (return_logits)
  scale_seconds: list[float]
  decode_seconds: float
  schedule: Schedule


class InfinityGenerator:
  """Compiled per-scale steps for one model/VAE pair, schedule, batch, text length and
  sampling setting.

  vae: the BSQ VAE (`sparvar_jax.vae.bsq.BSQVAE`): its bits -> codes -> next-input helpers
  drive the loop and `decode` makes the image. A VAE built with `nnx.eval_shape` (no
  weights) is enough when decode=False."""

  def __init__(self, model, vae, schedule: Schedule, batch: int, settings: InfinitySampling,
               *, text_len: int | None = None, cache_dtype=None):
    if batch < 1:
      raise ValueError(f"batch must be >= 1, got {batch}")
    cfg = model.cfg
    n = schedule.num_scales
    if n > cfg.num_lvl:
      raise ValueError(f"the schedule has {n} scales but the model has {cfg.num_lvl} levels")
    self.cfgs, self.taus = settings.per_scale(n)
    self.use_cfg = any(c != 1.0 for c in self.cfgs)
    self.settings, self.schedule, self.batch = settings, schedule, batch
    self.text_len = int(text_len or cfg.text_maxlen)
    if not 1 <= self.text_len <= cfg.text_maxlen:
      raise ValueError(f"text_len must be in [1, {cfg.text_maxlen}], got {text_len}")
    if vae.cfg.bits_per_token != cfg.d_vae:
      raise ValueError(f"the VAE gives {vae.cfg.bits_per_token} bits per token but the "
                       f"transformer predicts {cfg.d_vae}: they do not belong together.")
    self.vae_hw = tuple(vae.vae_hw(hw) for hw in schedule.scales)
    self.cache_dtype = cache_dtype
    self.model, self.vae = model, vae
    self._mdef, self._mstate = nnx.split(model)
    self._vdef, self._vstate = nnx.split(vae)
    self._begin = jax.jit(self._begin_fn)
    self._steps: dict[tuple[int, bool, bool], Callable] = {}
    self._decode = jax.jit(self._decode_fn)
    self._uncond = None  # host copy of cfg_uncond, made on first use

  # -- traced pieces ------------------------------------------------------------------

  def _begin_fn(self, mstate, text_BTK, mask_BT, un_BTK, un_mask_BT):
    model = nnx.merge(self._mdef, mstate)
    if self.use_cfg:
      text_BTK = jnp.concatenate([text_BTK, un_BTK], axis=0)
      mask_BT = jnp.concatenate([mask_BT, un_mask_BT], axis=0)
    cond_BD, ca_kv = model.encode_text(text_BTK, mask_BT)
    gss = model.cond_gss(cond_BD)
    ca_k, ca_v = model.block_text_kv(ca_kv)
    cache = model.init_cache(text_BTK.shape[0], self.schedule, self.cache_dtype)
    H, W = self.vae_hw[-1]
    summed = jnp.zeros((self.batch, H, W, self.vae.cfg.codebook_dim), jnp.float32)
    return model.sos(cond_BD), cond_BD, gss, ca_k, ca_v, mask_BT, cache, summed

  def _make_step(self, si: int, forced: bool, want_logits: bool):
    B, s = self.batch, self.settings
    sch = self.schedule
    last = si == sch.num_scales - 1
    hw = sch.scales[si]

    def step(mstate, x_BlC, cond_BD, gss, ca_k, ca_v, mask_BT, cache, summed, key, cfg, tau,
             forced_bits):
      model = nnx.merge(self._mdef, mstate)
      logits, cache = model.scale_step(si, sch, x_BlC, cond_BD, gss, ca_k, ca_v, mask_BT, cache)
      logits = logits.astype(jnp.float32) * (1.0 / tau)  # official: .mul(1 / tau)
      if self.use_cfg:
        logits = cfg * logits[:B] + (1.0 - cfg) * logits[B:]
      lg = logits.reshape(B, hw[0] * hw[1], -1, 2)
      bits = forced_bits.astype(jnp.int32) if forced else sample_bits(key, lg, s.top_k, s.top_p)
      # The VAE helpers use only the VAE's config (no weights): bits -> codes on the VAE
      # grid, summed += bilinear up-size (plain add at the last scale), next input.
      codes = self.vae.bits_to_codes(bits.reshape(B, hw[0], hw[1], -1))
      summed = self.vae.add_scale_codes(summed, codes, si, last)
      if last:
        x_next = None
      else:
        x_next = model.embed_input(self.vae.next_scale_input(summed, sch.scales[si + 1]))
        if self.use_cfg:
          x_next = jnp.concatenate([x_next, x_next], axis=0)
      return bits.astype(jnp.uint8), (lg if want_logits else None), x_next, cache, summed

    return jax.jit(step, donate_argnums=(7, 8))

  def _step(self, si, forced, want_logits):
    k = (si, forced, want_logits)
    if k not in self._steps:
      self._steps[k] = self._make_step(si, forced, want_logits)
    return self._steps[k]

  def _decode_fn(self, vstate, summed):
    vae = nnx.merge(self._vdef, vstate)
    img = vae.decode(summed)
    return ((img.astype(jnp.float32) + 1.0) * 0.5).clip(0.0, 1.0)

  # -- public -------------------------------------------------------------------------

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

  def __call__(self, text_BLK, lens_B, *, seed: int = 0, negative=None,
               forced_bits: Sequence[np.ndarray] | None = None, return_logits: bool = False,
               decode: bool = True, progress: ProgressFn | None = None,
               sync_each_scale: bool = True, max_scales: int | None = None) -> InfinityResult:
    """text_BLK: T5 features [B, L, K] (rows past each length ignored), lens_B: lengths.
    negative: optional (features [1 or B, L, K], lens) replacing cfg_uncond.
    forced_bits: optional per-scale bits [B, h*w, d] used instead of sampling.
    max_scales: stop after this many scales (diagnostics; no decode then)."""
    B = self.batch
    text, mask, lens = self._pad_text(text_BLK, lens_B, "prompt")
    if text.shape[0] != B:
      raise ValueError(f"the generator was built for batch {B}, got {text.shape[0]} prompts")
    if negative is not None:
      un, un_mask, _ = self._pad_text(negative[0], negative[1], "negative prompt")
      if un.shape[0] == 1:
        un, un_mask = np.repeat(un, B, 0), np.repeat(un_mask, B, 0)
      if un.shape[0] != B:
        raise ValueError(f"give 1 or {B} negative prompts, got {un.shape[0]}")
    else:  # the learned cfg_uncond truncated to each prompt's own length
      if self._uncond is None:
        self._uncond = np.asarray(self.model.cfg_uncond[...], np.float32)
      un = np.zeros_like(text)
      for i, n in enumerate(lens):
        un[i, :n] = self._uncond[:n]
      un_mask = mask.copy()
    n = self.schedule.num_scales
    if max_scales is not None:
      if not 1 <= max_scales <= n:
        raise ValueError(f"max_scales must be in [1, {n}], got {max_scales}")
      n, decode = max_scales, decode and max_scales == self.schedule.num_scales
    if forced_bits is not None and len(forced_bits) < n:
      raise ValueError(f"forced_bits has {len(forced_bits)} scales; the schedule has {n}")
    x, cond_BD, gss, ca_k, ca_v, mask_j, cache, summed = self._begin(
        self._mstate, jnp.asarray(text), jnp.asarray(mask), jnp.asarray(un), jnp.asarray(un_mask))
    key = jax.random.key(seed)
    bits_out, logits_out, times = [], [], []
    for si in range(n):
      t0 = time.perf_counter()
      fb = None if forced_bits is None else jnp.asarray(np.asarray(forced_bits[si]))
      step = self._step(si, fb is not None, return_logits)
      bits, lg, x, cache, summed = step(self._mstate, x, cond_BD, gss, ca_k, ca_v, mask_j, cache,
                                        summed, jax.random.fold_in(key, si),
                                        jnp.float32(self.cfgs[si]), jnp.float32(self.taus[si]), fb)
      bits_out.append(bits)
      if return_logits:
        logits_out.append(lg)
      if sync_each_scale:
        jax.block_until_ready(summed)
      times.append(time.perf_counter() - t0)
      if progress is not None:
        progress(si, n, times[-1])
    img, dec_s = None, 0.0
    if decode:
      t0 = time.perf_counter()
      img = np.asarray(self._decode(self._vstate, summed))
      dec_s = time.perf_counter() - t0
    return InfinityResult(
        image_BHW3=img, bits_per_scale=[np.asarray(b) for b in bits_out],
        summed_codes_BHWd=np.asarray(summed),
        logits_per_scale=[np.asarray(l) for l in logits_out] if return_logits else None,
        scale_seconds=times, decode_seconds=dec_s, schedule=self.schedule)
