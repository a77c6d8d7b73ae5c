"""VAR's per-scale generation loop: KV cache, classifier-free guidance, one jit per scale.

Mirrors `VAR.autoregressive_infer_cfg` (FoundationVision/VAR models/var.py): the batch
is doubled (conditional first, null class 1000 second), guidance grows linearly with
the scale (t = cfg * si / (K - 1), logits = (1 + t) * cond - t * uncond), tokens are
drawn with top-k/top-p (or the Gumbel-softmax `more_smooth` path), embedded with the
VQVAE codebook and accumulated into f_hat, whose area-downsample feeds the next scale.

Each scale has static shapes, so each is one jitted step; the KV cache is allocated
once and donated from step to step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax import sampling


@dataclasses.dataclass(frozen=True)
class VARSampling:
  """Sampling settings; defaults are the official FID settings (README)."""

  cfg: float = 1.5
  top_k: int = 900
  top_p: float = 0.96
  more_smooth: bool = False

  def validate(self, vocab_size: int) -> None:
    if not np.isfinite(self.cfg) or self.cfg < 0:
      raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")
    sampling.validate(self.top_k, self.top_p, vocab_size)


@dataclasses.dataclass
class VARResult:
  image_BHW3: np.ndarray  # float32 in [0, 1]
  labels_B: np.ndarray
  idx_per_scale: list[np.ndarray]  # int32 [B, pn*pn] per scale
  scale_seconds: list[float]
  decode_seconds: float


ProgressFn = Callable[[int, int, float], None]  # (scale index, num scales, seconds)


class VARGenerator:
  """Compiled per-scale steps for one model pair, batch size and sampling setting."""

  def __init__(self, var, vqvae, batch: int, settings: VARSampling,
               cache_dtype=jnp.float32):
    if batch < 1:
      raise ValueError(f"batch must be >= 1, got {batch}")
    cfg = var.cfg
    settings.validate(cfg.vocab_size)
    self.cfg, self.batch, self.settings, self.cache_dtype = cfg, batch, settings, cache_dtype
    self._var_def, self._var_state = nnx.split(var)
    self._vae_def, self._vae_state = nnx.split(vqvae)
    self._steps = [self._make_step(si) for si in range(cfg.num_scales)]
    self._begin = jax.jit(self._begin_fn)
    self._decode = jax.jit(self._decode_fn)

  # -- traced pieces ------------------------------------------------------------------

  def _begin_fn(self, var_state, labels_B):
    var = nnx.merge(self._var_def, var_state)
    B = self.batch
    null_B = jnp.full((B,), self.cfg.num_classes, jnp.int32)
    cond_BD = var.cond(jnp.concatenate([labels_B.astype(jnp.int32), null_B]))
    x_BlC = var.first_input(cond_BD)
    cache = var.init_cache(2 * B, self.cache_dtype)
    pn = self.cfg.patch_nums[-1]
    f_hat = jnp.zeros((B, pn, pn, self.cfg.cvae), jnp.float32)
    return cond_BD, x_BlC, cache, f_hat

  def _make_step(self, si: int):
    cfg, s, B = self.cfg, self.settings, self.batch
    K = cfg.num_scales
    ratio = si / (K - 1) if K > 1 else 0.0
    pn = cfg.patch_nums[si]
    last = si == K - 1

    def step(var_state, vae_state, x_BlC, cond_BD, cache, f_hat, key):
      var = nnx.merge(self._var_def, var_state)
      vae = nnx.merge(self._vae_def, vae_state)
      logits_BlV, cache = var.scale_step(si, x_BlC, cond_BD, cache)
      logits_BlV = logits_BlV.astype(jnp.float32)
      t = s.cfg * ratio
      logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
      k_tok, k_gum = jax.random.split(key)
      idx_Bl = sampling.sample_top_k_top_p(k_tok, logits_BlV, s.top_k, s.top_p)
      if s.more_smooth:
        # The official sampler filters logits_BlV in place (masked_fill_), so the Gumbel
        # weights only cover the codes that survive top-k/top-p.
        kept_BlV = sampling.top_k_top_p_filter(logits_BlV, s.top_k, s.top_p)
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # MaskGIT-style annealing, as official
        probs = sampling.gumbel_softmax(k_gum, kept_BlV * (1 + ratio), tau)
        h_BlC = jnp.einsum("blv,vc->blc", probs, vae.codebook.astype(jnp.float32))
      else:
        h_BlC = vae.embed(idx_Bl)
      h_BhwC = h_BlC.reshape(B, pn, pn, cfg.cvae).astype(jnp.float32)
      f_hat, next_BhwC = vae.next_autoregressive_input(si, f_hat, h_BhwC)
      if last:
        x_next = None
      else:
        x_next = var.next_input(si + 1, next_BhwC)
        x_next = jnp.concatenate([x_next, x_next], axis=0)
      return idx_Bl, x_next, cache, f_hat

    return jax.jit(step, donate_argnums=(4, 5))

  def _decode_fn(self, vae_state, f_hat):
    vae = nnx.merge(self._vae_def, vae_state)
    img = vae.fhat_to_img(f_hat)
    return ((img.astype(jnp.float32) + 1.0) * 0.5).clip(0.0, 1.0)

  # -- public -------------------------------------------------------------------------

  def sample_labels(self, seed: int) -> np.ndarray:
    """Uniform class labels from the seed (the official default when none are given)."""
    key = jax.random.fold_in(jax.random.key(seed), 1 << 20)
    return np.asarray(jax.random.randint(key, (self.batch,), 0, self.cfg.num_classes))

  def __call__(self, labels_B: Sequence[int] | np.ndarray, seed: int = 0,
               progress: ProgressFn | None = None, sync_each_scale: bool = True) -> VARResult:
    labels_B = np.asarray(labels_B, np.int32).reshape(-1)
    if labels_B.shape[0] != self.batch:
      raise ValueError(f"expected {self.batch} labels, got {labels_B.shape[0]}")
    bad = labels_B[(labels_B < 0) | (labels_B >= self.cfg.num_classes)]
    if bad.size:
      raise ValueError(f"class ids must be in [0, {self.cfg.num_classes}); got {bad.tolist()}")
    key = jax.random.key(seed)
    cond_BD, x_BlC, cache, f_hat = self._begin(self._var_state, jnp.asarray(labels_B))
    idx_list, times = [], []
    K = self.cfg.num_scales
    for si, step in enumerate(self._steps):
      t0 = time.perf_counter()
      idx_Bl, x_BlC, cache, f_hat = step(self._var_state, self._vae_state, x_BlC, cond_BD,
                                         cache, f_hat, jax.random.fold_in(key, si))
      idx_list.append(idx_Bl)
      if sync_each_scale:
        jax.block_until_ready(f_hat)
      times.append(time.perf_counter() - t0)
      if progress is not None:
        progress(si, K, times[-1])
    t0 = time.perf_counter()
    img = np.asarray(self._decode(self._vae_state, f_hat))
    decode_s = time.perf_counter() - t0
    return VARResult(image_BHW3=img, labels_B=labels_B,
                     idx_per_scale=[np.asarray(i) for i in idx_list], scale_seconds=times,
                     decode_seconds=decode_s)
