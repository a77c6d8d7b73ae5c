"""The per-scale generation loop shared by VAR and Infinity.

`ScaleLoop` owns what both families do the same way: one jitted step per scale (static
shapes; the compiled steps are kept per scale and per what changes the trace), the KV cache,
the latent and SparVAR's state donated from step to step, per-scale timing and progress, and
the VAE decode. A family adapter (`sparvar_jax/families/`) supplies the rest: conditioning,
the transformer call, guidance, the sampler and the next scale's input.

Rows: under classifier-free guidance the batch is doubled, conditional rows first. Once the
unconditional branch is dropped (`LoopOptions.drop_uncond_last_scales`), the KV cache, the
condition and the sparse state keep their first B rows for the remaining scales.

Random numbers: image b draws from `keys[b]` folded with the scale index, so an image
depends on its own key only, never on the batch it was generated in. `row_keys(seed, ids)`
gives image i the key fold_in(key(seed), i).

Devices: with a `mesh` (sparvar_jax/sharding.py) the loop runs data parallel: parameters
replicated (or placed beforehand, e.g. split for model parallelism), the condition, keys,
KV cache, latent and sparse state split by rows over the mesh's `batch` axis, each step's
outputs pinned to that split. Without one, nothing is placed and the steps are traced as
on a single device.

Attention: an `AttnPlan` (sparvar_jax/sparse/plan.py) says what each layer range runs at
each scale; the default is dense everywhere. The decision scale of a SparVAR plan returns
its key lists and output cache as traced arrays that the later steps take as operands, so a
new image (new prompt, new seed) recompiles nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax import sharding
from sparvar_jax.schedules import Schedule
from sparvar_jax.sparse.plan import AttnPlan, dense_plan

ProgressFn = Callable[[int, int, float], None]  # (scale index, scales run, seconds)

KEY_DERIVATION = ("image i of a run with --seed s draws from key_i = jax.random.fold_in("
                  "jax.random.key(s), i) (threefry); scale k draws from fold_in(key_i, k)")


def row_keys(seed: int, indices: Sequence[int]) -> jax.Array:
  """Typed keys [len(indices)]: fold_in(key(seed), i) for each image index i."""
  if not 0 <= int(seed) < 2 ** 32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  ids = np.asarray(list(indices), np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= 2 ** 32):
    raise ValueError(f"image indices must be in [0, 2**32), got {ids.min()}..{ids.max()}")
  base = jax.random.key(int(seed))
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids.astype(np.uint32)))


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """skip_last_scales: stop that many scales early and decode what was accumulated (the
  latent is kept at full resolution, so the image keeps its size and loses detail);
  drop_uncond_last_scales: run the last N computed scales without the unconditional branch
  (no guidance there; half the rows)."""
  skip_last_scales: int = 0
  drop_uncond_last_scales: int = 0

  def check(self, num_scales: int) -> None:
    if not 0 <= self.skip_last_scales < num_scales:
      raise ValueError(f"skip_last_scales must be in [0, {num_scales - 1}] for a schedule of "
                       f"{num_scales} scales, got {self.skip_last_scales}")
    run = num_scales - self.skip_last_scales
    if not 0 <= self.drop_uncond_last_scales < run:
      raise ValueError(f"drop_uncond_last_scales must be in [0, {run - 1}] (the first scale "
                       f"keeps guidance; {run} scales are computed), got "
                       f"{self.drop_uncond_last_scales}")


@dataclasses.dataclass
class Result:
  """One batch. tokens_per_scale: VAR token indices int32 [B, h*w], Infinity bits uint8
  [B, h*w, d], one entry per computed scale; latent: what the VAE decodes (VAR f_hat,
  Infinity summed codes), float32 NHWC; logits_per_scale: what the sampler saw (with
  return_logits); image_BHW3: float32 RGB in [0, 1] (None without decode)."""
  image_BHW3: np.ndarray | None
  tokens_per_scale: list[np.ndarray]
  latent: np.ndarray
  logits_per_scale: list[np.ndarray] | None
  scale_seconds: list[float]
  decode_seconds: float
  schedule: Schedule
  plan: AttnPlan
  sparse_state: Any = None  # the SparVAR state after the last scale (return_state)


class ScaleLoop:
  """Compiled per-scale steps for one adapter (model + VAE + sampling settings), batch size,
  attention plan and loop options. Call it with the family's condition (VAR: labels;
  Infinity: text features and lengths). mesh: run data parallel over its `batch` axis (the
batch must be a multiple of that axis' size; see the module docstring)."""

  def __init__(self, adapter, batch: int, plan: AttnPlan | None = None,
               options: LoopOptions = LoopOptions(), mesh: jax.sharding.Mesh | None = None):
    if batch < 1:
      raise ValueError(f"batch must be >= 1, got {batch}")
    if mesh is not None and batch % sharding.batch_size_of(mesh):
      raise ValueError(f"batch {batch} is not a multiple of the mesh's "
                       f"{sharding.batch_size_of(mesh)} batch devices")
    self.adapter, self.batch, self.options, self.mesh = adapter, batch, options, mesh
    self.schedule = adapter.schedule
    n = self.schedule.num_scales
    self.plan = plan if plan is not None else dense_plan(self.schedule, adapter.depth)
    if self.plan.schedule != self.schedule or self.plan.depth != adapter.depth:
      raise ValueError("the attention plan was built for another schedule or depth "
                       f"({self.plan.schedule.scales}, depth {self.plan.depth}) than this model "
                       f"and schedule ({self.schedule.scales}, depth {adapter.depth})")
    options.check(n)
    self.num_run = n - options.skip_last_scales
    self._mdef, self._mstate = nnx.split(adapter.model)
    self._vdef, self._vstate = nnx.split(adapter.vae)
    if mesh is not None:
      self._mstate = sharding.place_params(self._mstate, mesh)
      self._vstate = sharding.place_params(self._vstate, mesh)
    self._begin = jax.jit(self._begin_fn)
    self._halve = jax.jit(self._halve_fn)  # slices: new buffers, nothing to donate
    self._decode = jax.jit(self._decode_fn)
    self._steps: dict[tuple, Callable] = {}

  def rows_at(self, si: int) -> int:
    """Transformer rows at scale si: 2B under guidance, B once it is dropped."""
    if not self.adapter.uses_cfg:
      return self.batch
    return self.batch if si >= self.num_run - self.options.drop_uncond_last_scales else \
        2 * self.batch

  # -- traced pieces ------------------------------------------------------------------

  def _rows(self, tree):
    """On a mesh, pins the arrays of `tree` to the row split (identity otherwise)."""
    return tree if self.mesh is None else sharding.constrain_rows(tree, self.mesh)

  def _begin_fn(self, mstate, vstate, cond):
    model, vae = nnx.merge(self._mdef, mstate), nnx.merge(self._vdef, vstate)
    return self._rows(self.adapter.begin(model, vae, cond, self.batch))

  def _halve_fn(self, ctx, cache, sparse):
    B = self.batch
    sparse = None if sparse is None else sparse.rows(0, B)
    return self._rows((self.adapter.cond_rows(ctx, B), cache.rows(0, B), sparse))

  def _make_step(self, si: int, forced: bool, want_logits: bool, rows: int):
    ad, B = self.adapter, self.batch
    guided = rows == 2 * B
    has_next = si + 1 < self.num_run
    double_next = has_next and self.rows_at(si + 1) == 2 * B
    schedule_last = si == self.schedule.num_scales - 1
    segments = self.plan.segments(si)

    def step(mstate, vstate, x, ctx, cache, latent, sparse, keys, scalars, forced_tokens):
      model, vae = nnx.merge(self._mdef, mstate), nnx.merge(self._vdef, vstate)
      logits, cache, sparse = ad.transformer(model, si, x, ctx, cache, segments, sparse)
      logits = ad.guide(si, logits, B, guided, scalars)
      if forced:
        tokens, aux = forced_tokens, None
      else:
        keys_si = jax.vmap(lambda k: jax.random.fold_in(k, si))(keys)
        tokens, aux = ad.sample(si, keys_si, logits)
      latent, x_next = ad.advance(model, vae, si, tokens, aux, latent, schedule_last, has_next)
      if double_next:
        x_next = jnp.concatenate([x_next, x_next], axis=0)
      return self._rows((ad.output_tokens(tokens), (logits if want_logits else None), x_next,
                         cache, latent, sparse))

    return jax.jit(step, donate_argnums=(4, 5, 6))

  def _step(self, si, forced, want_logits, rows):
    k = (si, forced, want_logits, rows)
    if k not in self._steps:
      self._steps[k] = self._make_step(*k)
    return self._steps[k]

  def _decode_fn(self, vstate, latent):
    vae = nnx.merge(self._vdef, vstate)
    return self._rows(((self.adapter.decode(vae, latent).astype(jnp.float32) + 1.0) * 0.5)
                      .clip(0.0, 1.0))

  # -- public -------------------------------------------------------------------------

  def __call__(self, *cond: Any, seed: int = 0, keys: jax.Array | None = None,
               forced: Sequence[np.ndarray] | None = None, return_logits: bool = False,
               decode: bool = True, progress: ProgressFn | None = None,
               sync_each_scale: bool = True, max_scales: int | None = None,
               return_state: bool = False, **cond_kw: Any) -> Result:
    """Generates one batch.

    cond / cond_kw: the family's condition (see the adapter's `prepare`). keys: typed keys
    [B] (one per image); default `row_keys(seed, range(B))`. forced: per-scale tokens used
    instead of sampling (teacher forcing through the sampler). max_scales: stop after this
    many scales (diagnostics; no decode then). sync_each_scale: wait for each step so that
    the per-scale times are real (off: one sync at the end, times are dispatch times).
    return_state: also return SparVAR's state (decision lists, output cache) as numpy.
    """
    B = self.batch
    arrays = self.adapter.prepare(B, *cond, **cond_kw)
    if keys is None:
      keys = row_keys(seed, range(B))
    if keys.shape != (B,):
      raise ValueError(f"keys must hold one key per image, shape ({B},); got {keys.shape}")
    n = self.num_run
    if max_scales is not None:
      if not 1 <= max_scales <= n:
        raise ValueError(f"max_scales must be in [1, {n}], got {max_scales}")
      n, decode = max_scales, decode and max_scales == self.num_run
    if forced is not None and len(forced) < n:
      raise ValueError(f"forced has {len(forced)} scales; {n} are computed")
    if self.mesh is not None:
      arrays, keys = sharding.put_rows((arrays, keys), self.mesh)
    ctx, x, cache, latent = self._begin(self._mstate, self._vstate, arrays)
    sparse, rows = None, self.rows_at(0)
    tokens_out, logits_out, times = [], [], []
    for si in range(n):
      t0 = time.perf_counter()
      if self.rows_at(si) < rows:
        ctx, cache, sparse = self._halve(ctx, cache, sparse)
        rows = self.rows_at(si)
      ft = None if forced is None else jnp.asarray(np.asarray(forced[si]))
      step = self._step(si, ft is not None, return_logits, rows)
      tokens, lg, x, cache, latent, sparse = step(
          self._mstate, self._vstate, x, ctx, cache, latent, sparse, keys,
          self.adapter.scalars(si), ft)
      tokens_out.append(tokens)
      if return_logits:
        logits_out.append(lg)
      if sync_each_scale:
        jax.block_until_ready(latent)
      times.append(time.perf_counter() - t0)
      if progress is not None:
        progress(si, n, times[-1])
    if not sync_each_scale:
      t0 = time.perf_counter()
      jax.block_until_ready(latent)
      times[-1] += time.perf_counter() - t0
    img, dec_s = None, 0.0
    if decode:
      t0 = time.perf_counter()
      img = np.asarray(self._decode(self._vstate, latent))
      dec_s = time.perf_counter() - t0
    return Result(image_BHW3=img, tokens_per_scale=[np.asarray(t) for t in tokens_out],
                  latent=np.asarray(latent),
                  logits_per_scale=[np.asarray(l) for l in logits_out] if return_logits
                  else None,
                  scale_seconds=times, decode_seconds=dec_s, schedule=self.schedule,
                  plan=self.plan,
                  sparse_state=jax.tree.map(np.asarray, sparse) if return_state else None)
