"""VAR (class-conditional) mode of `python -m sparvar_jax.sample` (the flags live in sample.py).

Order of work: labels, sampling settings, the attention plan and the output folder are
checked before a model is built; then the model is loaded, the batch generated (image i
draws from fold_in(key(seed), i)) and the PNGs, grid and report written.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

from sparvar_jax import runner
from sparvar_jax.runner import RunArgs, UsageError

VAR_CFG, VAR_TOP_K, VAR_TOP_P = 1.5, 900, 0.96  # the official FID settings


@dataclasses.dataclass(frozen=True)
class VARArgs:
  labels: str | None  # comma-separated class ids
  more_smooth: bool


def parse_labels(text: str | None, batch: int | None) -> tuple[list[int] | None, int]:
  labels = None
  if text:
    try:
      labels = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
      raise UsageError(f"--labels must be comma-separated integers, got {text!r}") from e
    if not labels:
      raise UsageError("--labels is empty")
  if labels is None:
    return None, batch or 4
  if batch is None:
    batch = len(labels)
  if len(labels) == 1:
    labels = labels * batch
  if len(labels) != batch:
    raise UsageError(f"--labels gives {len(labels)} ids but --batch is {batch}: give one id "
                     "or exactly --batch ids")
  return labels, batch


def sampling_settings(args: RunArgs, more_smooth: bool, var_cfg, from_checkpoint: bool,
                      err=UsageError):
  """VARSampling from the run's cfg / top_k / top_p (None: the official FID values),
  checked against the model's vocabulary; `err` on bad values."""
  from sparvar_jax.families.var import VARSampling  # pylint: disable=g-import-not-at-top
  cfg = VAR_CFG
  if args.cfg is not None:
    try:
      cfg = float(args.cfg)
    except ValueError as e:
      raise err(f"--cfg for VAR must be one number (cfg must be >= 0), got "
                f"{args.cfg!r}") from e
  top_k = VAR_TOP_K if args.top_k is None else args.top_k
  if top_k > var_cfg.vocab_size:
    raise err(f"top_k={top_k} exceeds the vocabulary size {var_cfg.vocab_size} of "
              f"{'the model' if from_checkpoint else 'the demo model'}; pass --top_k <= "
              f"{var_cfg.vocab_size} (0 turns it off, 1 is greedy).")
  settings = VARSampling(cfg=cfg, top_k=top_k,
                         top_p=VAR_TOP_P if args.top_p is None else args.top_p,
                         more_smooth=more_smooth)
  try:
    settings.validate(var_cfg.vocab_size)
  except ValueError as e:
    raise err(str(e)) from None
  return settings


def load_models(checkpoint: str | None, seed: int, dtype, attn_impl: str):
  """(VAR, VQVAE, description): a converted checkpoint, or the random tiny demo model."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sparvar_jax import configs  # pylint: disable=g-import-not-at-top
  from sparvar_jax.models import var as var_lib  # pylint: disable=g-import-not-at-top
  from sparvar_jax.vae import var_vqvae  # pylint: disable=g-import-not-at-top
  if checkpoint is None:
    rngs = nnx.Rngs(seed)
    var = var_lib.VAR(configs.VAR_DEMO, rngs=rngs, dtype=dtype, attn_impl=attn_impl)
    vae = var_vqvae.VQVAE(configs.VQVAE_DEMO, rngs=rngs)
    return var, vae, "embedded default: tiny VAR (depth 2, width 128) with RANDOM weights"
  var, vae = var_lib.load_var(checkpoint, dtype=dtype, attn_impl=attn_impl)
  return var, vae, f"checkpoint {os.path.abspath(checkpoint)}"


def run(args: RunArgs, vargs: VARArgs, cfgs: dict | None) -> dict:
  from sparvar_jax import configs, outputs, schedules  # pylint: disable=g-import-not-at-top

  labels, batch = parse_labels(vargs.labels, args.batch)
  var_cfg = configs.VAR_DEMO if cfgs is None else cfgs["var"]
  if labels is not None:
    bad = [c for c in labels if not 0 <= c < var_cfg.num_classes]
    if bad:
      raise UsageError(f"class ids must be in [0, {var_cfg.num_classes}) (the model's classes), "
                       f"got {bad}")
  settings = sampling_settings(args, vargs.more_smooth, var_cfg, cfgs is not None)
  schedule = schedules.square_schedule(var_cfg.patch_nums)
  runner.check_plan(args, schedule, var_cfg.depth)
  out = outputs.OutputRun(args.out, args.overwrite)

  jax = runner.setup_jax()
  dtype_name, dtype, attn_impl = runner.resolve_dtype(jax, args.dtype, args.attn_impl)
  from sparvar_jax.families.var import VARAdapter  # pylint: disable=g-import-not-at-top
  from sparvar_jax.generate import ScaleLoop, row_keys  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  var, vae, source = load_models(args.checkpoint, args.seed, dtype, attn_impl)
  print(f"model: {source}", file=sys.stderr)
  if args.checkpoint is None:
    print("note: the default model's weights are random, so its images are noise; pass "
          "--checkpoint for real images.", file=sys.stderr)
  plan, options = runner.build_plan(args, schedule, var.cfg.depth)
  adapter = VARAdapter(var, vae, settings, cache_dtype=dtype)
  loop = ScaleLoop(adapter, batch, plan, options)
  if labels is None:
    labels = adapter.sample_labels(args.seed, batch).tolist()
  load_s = time.perf_counter() - t0

  report = {
      "mode": "var",
      "model": source,
      "random_weights": args.checkpoint is None,
      "config": {"depth": var.cfg.depth, "embed_dim": var.cfg.embed_dim,
                 "patch_nums": list(var.cfg.patch_nums), "vocab_size": var.cfg.vocab_size},
      "settings": {"labels": labels, "batch": batch, "cfg": settings.cfg,
                   "top_k": settings.top_k, "top_p": settings.top_p,
                   "more_smooth": settings.more_smooth, "seed": args.seed,
                   "dtype": dtype_name, "attn_impl": attn_impl},
      **runner.common_report(args, plan, jax, dtype_name, attn_impl),
      "images": [],
      "interrupted": None,
  }
  res = None

  def finalize():
    if res is not None:
      report["seconds"] = {"load_and_build": load_s,
                           "per_scale_first_run_incl_compile": res.scale_seconds,
                           "decode": res.decode_seconds,
                           "total_generate": sum(res.scale_seconds) + res.decode_seconds}
      report["image_shape"] = list(res.image_BHW3.shape)
    report["files"] = out.files + ["report.json"]
    out.json("report.json", report)

  with runner.finishing(out, report, finalize):
    res = loop(labels, keys=row_keys(args.seed, range(batch)),
               progress=runner.progress_printer("", schedule.scales))
    print(f"decode: {res.decode_seconds * 1e3:.1f} ms", file=sys.stderr)
    for i, img in enumerate(res.image_BHW3):
      name = f"{i:03d}_class{labels[i]}.png"
      out.png(name, img)
      report["images"].append({"index": i, "label": labels[i], "file": name})
    out.png("grid.png", outputs.make_grid(res.image_BHW3))
    if args.save_npz:
      arrays = {f"idx_scale{si}": a for si, a in enumerate(res.tokens_per_scale)}
      out.npz("samples.npz", image_BHW3=res.image_BHW3, labels_B=np.asarray(labels, np.int32),
              **arrays)
  print(f"wrote {len(report['images'])} images, grid.png and report.json to {out.path}",
        file=sys.stderr)
  return report
