"""VAR in the scale loop (official `VAR.autoregressive_infer_cfg`, FoundationVision/VAR).

The batch is always doubled for guidance (conditional rows, then the null class 1000);
guidance grows linearly with the scale (t = cfg * si / (K - 1), logits = (1 + t) * cond -
t * uncond); tokens are drawn with top-k/top-p (or the Gumbel-softmax `more_smooth` path),
embedded with the VQVAE codebook and accumulated into f_hat, whose area-downsample feeds the
next scale. VAR's `patch_nums` are a square `Schedule`.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from sparvar_jax import sampling
from sparvar_jax.generate import LoopOptions, ScaleLoop
from sparvar_jax.schedules import square_schedule
from sparvar_jax.sparse.plan import AttnPlan


@dataclasses.dataclass(frozen=True)
class VARSampling:
  """Sampling settings; defaults are the official FID settings (README)."""

  cfg: float = 1.5
  top_k: int = 900
  top_p: float = 0.96
  more_smooth: bool = False

  def validate(self, vocab_size: int | None) -> None:
    if not np.isfinite(self.cfg) or self.cfg < 0:
      raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")
    sampling.validate(self.top_k, self.top_p, vocab_size)


class VARAdapter:
  """VAR + its VQVAE for `ScaleLoop` (see generate.py for the interface)."""

  uses_cfg = True

  def __init__(self, var, vqvae, settings: VARSampling, cache_dtype=jnp.float32):
    cfg = var.cfg
    settings.validate(cfg.vocab_size)
    self.model, self.vae, self.cfg, self.settings = var, vqvae, cfg, settings
    self.cache_dtype = cache_dtype
    self.depth = cfg.depth
    self.schedule = square_schedule(cfg.patch_nums)

  def prepare(self, batch: int, labels_B):
    labels_B = np.asarray(labels_B, np.int32).reshape(-1)
    if labels_B.shape[0] != batch:
      raise ValueError(f"expected {batch} labels, got {labels_B.shape[0]}")
    bad = labels_B[(labels_B < 0) | (labels_B >= self.cfg.num_classes)]
    if bad.size:
      raise ValueError(f"class ids must be in [0, {self.cfg.num_classes}); got {bad.tolist()}")
    return jnp.asarray(labels_B)

  def begin(self, var, vae, labels_B, B: int):
    del vae
    null_B = jnp.full((B,), self.cfg.num_classes, jnp.int32)
    cond_BD = var.cond(jnp.concatenate([labels_B.astype(jnp.int32), null_B]))
    cache = var.init_cache(2 * B, self.cache_dtype)
    pn = self.cfg.patch_nums[-1]
    f_hat = jnp.zeros((B, pn, pn, self.cfg.cvae), jnp.float32)
    return cond_BD, var.first_input(cond_BD), cache, f_hat

  def cond_rows(self, cond_BD, B: int):
    return cond_BD[:B]

  def transformer(self, var, si, x_BlC, cond_BD, cache, segments, sparse):
    return var.scale_step(si, x_BlC, cond_BD, cache, segments, sparse)

  def scalars(self, si: int):
    return ()

  def guide(self, si, logits_BlV, B, guided, scalars):
    del scalars
    logits_BlV = logits_BlV.astype(jnp.float32)
    if not guided:
      return logits_BlV
    K = self.cfg.num_scales
    t = self.settings.cfg * (si / (K - 1) if K > 1 else 0.0)
    return (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]

  def sample(self, si, keys_B, logits_BlV):
    s = self.settings
    split = jax.vmap(jax.random.split)(keys_B)
    k_tok, k_gum = split[:, 0], split[:, 1]
    idx_Bl = jax.vmap(lambda k, lg: sampling.sample_top_k_top_p(k, lg[None], s.top_k,
                                                                s.top_p)[0])(k_tok, logits_BlV)
    if not s.more_smooth:
      return idx_Bl, None
    # The official sampler filters logits_BlV in place (masked_fill_), so the Gumbel weights
    # only cover the codes that survive top-k/top-p.
    K = self.cfg.num_scales
    ratio = si / (K - 1) if K > 1 else 0.0
    kept_BlV = sampling.top_k_top_p_filter(logits_BlV, s.top_k, s.top_p)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # MaskGIT-style annealing, as official
    probs = jax.vmap(lambda k, lg: sampling.gumbel_softmax(k, lg, tau))(k_gum,
                                                                       kept_BlV * (1 + ratio))
    return idx_Bl, probs

  def advance(self, var, vae, si, idx_Bl, probs_BlV, f_hat, schedule_last, has_next):
    del schedule_last  # the VQVAE's own last-scale rule
    B, pn = idx_Bl.shape[0], self.cfg.patch_nums[si]
    if probs_BlV is not None:
      h_BlC = jnp.einsum("blv,vc->blc", probs_BlV, vae.codebook.astype(jnp.float32))
    else:
      h_BlC = vae.embed(idx_Bl)
    h_BhwC = h_BlC.reshape(B, pn, pn, self.cfg.cvae).astype(jnp.float32)
    f_hat, next_BhwC = vae.next_autoregressive_input(si, f_hat, h_BhwC)
    x_next = var.next_input(si + 1, next_BhwC) if has_next else None
    return f_hat, x_next

  def output_tokens(self, idx_Bl):
    return idx_Bl.astype(jnp.int32)

  def decode(self, vae, f_hat):
    return vae.fhat_to_img(f_hat)

  def sample_labels(self, seed: int, batch: int) -> np.ndarray:
    """Uniform class labels from the seed (the official default when none are given)."""
    key = jax.random.fold_in(jax.random.key(seed), 1 << 20)
    return np.asarray(jax.random.randint(key, (batch,), 0, self.cfg.num_classes))


def var_generator(var, vqvae, batch: int, settings: VARSampling = VARSampling(), *,
                  plan: AttnPlan | None = None, options: LoopOptions = LoopOptions(),
                  cache_dtype=jnp.float32) -> ScaleLoop:
  """A `ScaleLoop` for VAR: call it with labels [B] (and seed= or keys=)."""
  return ScaleLoop(VARAdapter(var, vqvae, settings, cache_dtype), batch, plan, options)

