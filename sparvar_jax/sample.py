r"""Generate images with VAR (class-conditional ImageNet) or Infinity (text-to-image).

With no arguments it runs an embedded default: a tiny, randomly initialised Infinity on
the full 13-scale 1024x1024 schedule (where SparVAR acts), with random text features in
place of T5, on the CPU in well under a minute. Its weights are random, so the images
are noise: it shows the whole path works. `--demo var` runs a tiny random VAR instead.
For real images, convert the official checkpoints first:

  python -m convert.var --var var_d16.pth --vae vae_ch160v4096z32.pth --out ckpt/var_d16
  python -m sparvar_jax.sample --checkpoint ckpt/var_d16 --labels 207,360,387,974 \
      --cfg 4 --top_k 900 --top_p 0.95 --seed 0 --out samples/

Writes `grid.png`, one PNG per image and `report.json` (settings, per-scale timings)
under --out; `--save_npz` adds `samples.npz` (token indices per scale, float image) for
exact comparisons.

Infinity (text-to-image): a checkpoint converted with `python -m convert.infinity`
switches to Infinity mode, which needs a converted T5 (`python -m convert.t5`) and prompts:

  python -m sparvar_jax.sample --checkpoint ckpt/infinity_2b --t5 ckpt/flan-t5-xl \
      --prompt "a red fox in the snow" --aspect 1:1 --pn 1M --cfg 3 --tau 1 --seed 0

Writes one PNG per prompt (index + slug) as each batch finishes, `grid.png` (the first 64,
as 256-px thumbnails past 16) and `report.json`; `--save_npz`
adds `samples.npz` (bits per scale, float image). Prompts over 512 T5 tokens are
truncated as the original pipeline does, with a warning on stderr and in the report.
An aspect ratio that is not one of Infinity's templates uses the nearest one (reported).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory "
                                  "(python -m convert.var, or python -m convert.infinity for "
                                  "text-to-image). Default: a random tiny model (see --demo).")
_OUT = flags.DEFINE_string("out", "samples", "Output folder.")
_LABELS = flags.DEFINE_string("labels", None, "VAR only. Comma-separated ImageNet class ids "
                              "in [0, 1000); one id is repeated over the batch. Default: "
                              "drawn uniformly from --seed.")
_BATCH = flags.DEFINE_integer("batch", None, "VAR: images to generate (default: the number "
                              "of labels, or 4). Infinity: prompts per generator call "
                              "(default 1).")
_CFG = flags.DEFINE_string("cfg", None, "Classifier-free guidance ratio (>= 0). VAR: one "
                           "number, default 1.5. Infinity: one number or a comma list with "
                           "one per scale, default 3.")
_TOP_K = flags.DEFINE_integer("top_k", 900, "Top-k sampling (0 = off, 1 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", None, "Top-p sampling in [0, 1) (0 = off). Default: "
                            "0.96 (VAR), 0.97 (Infinity).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_MORE_SMOOTH = flags.DEFINE_bool("more_smooth", False, "VAR only. Gumbel-softmax smoothing "
                                 "(official visualisation option; not for FID).")
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Also write samples.npz.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype of the transformer blocks (auto: bfloat16 on GPU, "
                           "float32 on CPU).")
_ATTN = flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn", "mosaic"],
                          "Attention kernel. auto: 'cudnn' on a GPU in bfloat16, 'xla' otherwise "
                          "(float32 or CPU). 'mosaic': our Hopper flash kernel for the unmasked "
                          "calls (H100/H200; end-to-end on par with cuDNN for Infinity-2B).")
_DEMO = flags.DEFINE_enum("demo", "infinity", ["infinity", "var"],
                          "The random tiny model used without --checkpoint: 'infinity' "
                          "(text-to-image, full 13-scale 1024x1024 schedule, random text "
                          "features instead of T5) or 'var' (class-conditional, 256x256).")
# Infinity only.
_T5 = flags.DEFINE_string("t5", None, "Infinity only. Converted T5 directory "
                          "(python -m convert.t5): config.json, t5/, spiece.model.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Infinity only. A prompt; repeat the "
                                    "flag for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Infinity only. UTF-8 text file, "
                                    "one prompt per line (blank lines skipped).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Infinity only. Negative prompt "
                                "for classifier-free guidance (default: the model's learned "
                                "unconditional text).")
_ASPECT = flags.DEFINE_string("aspect", None, "Infinity only. Aspect ratio W:H (or WxH, or "
                              "a height/width number); default 1:1. Not a template: the "
                              "nearest template is used.")
_PN = flags.DEFINE_string("pn", None, "Infinity only. Pixel budget: 0.06M, 0.25M, 0.60M or "
                          "1M (default 1M; 1M at 1:1 is 1024x1024).")
_TAU = flags.DEFINE_string("tau", None, "Infinity only. Sampling temperature (> 0): one "
                           "number or a comma list with one per scale; default 1.")

_VAR_ONLY = ("labels", "more_smooth")
_INFINITY_ONLY = ("t5", "prompt", "prompts_file", "negative_prompt", "aspect", "pn", "tau")
_VAR_CFG, _VAR_TOP_P = 1.5, 0.96  # VAR defaults; Infinity's are InfinitySampling's


class UsageError(Exception):
  """Bad command-line input; printed as one paragraph without a traceback."""


def _parse_labels(text: str | None, batch: int | None) -> tuple[list[int] | None, int]:
  labels = None
  if text:
    try:
      labels = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
      raise UsageError(f"--labels must be comma-separated integers, got {text!r}") from e
    if not labels:
      raise UsageError("--labels is empty")
  if batch is not None and batch < 1:
    raise UsageError(f"--batch must be >= 1, got {batch}")
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


def _setup_jax():
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("SPARVAR_COMPILE_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "sparvar_jax", "xla"))
  try:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  except Exception:  # an unwritable cache only costs compile time
    pass
  return jax


def _load_models(checkpoint: str | None, dtype, seed: int, attn_impl: str = "xla"):
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


def _given(names) -> list[str]:
  return ["--" + n for n in names if flags.FLAGS[n].present]


def _checkpoint_kind(checkpoint: str | None) -> tuple[str, dict | None]:
  """'var' or 'infinity' from the checkpoint's config.json (or --demo without one)."""
  if checkpoint is None:
    return _DEMO.value, None
  if _DEMO.present:
    raise UsageError("--demo picks the random model used when no --checkpoint is given; "
                     "drop --demo or --checkpoint.")
  from sparvar_jax.checkpoint import read_config  # pylint: disable=g-import-not-at-top
  cfgs, _ = read_config(checkpoint)
  return ("infinity" if "infinity" in cfgs else "var"), cfgs


def _resolve_dtype(jax):
  """(dtype name, dtype, attention impl) from --dtype and --attn_impl."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype_name = _DTYPE.value
  if dtype_name == "auto":
    dtype_name = "bfloat16" if on_gpu else "float32"
  attn = _ATTN.value
  if attn == "auto":
    # cuDNN stays the default: Mosaic measured equal end-to-end (Infinity-2B 302 vs 304 ms on
    # the H100), and VAR-d16's first call compiles for 64 s with it (one kernel per scale).
    attn = "cudnn" if (on_gpu and dtype_name == "bfloat16") else "xla"
  elif attn in ("cudnn", "mosaic"):
    if not on_gpu or dtype_name != "bfloat16":
      raise UsageError(f"--attn_impl={attn} needs a GPU and bfloat16 (this run: "
                       f"{jax.devices()[0].platform}, {dtype_name}); use --attn_impl=xla or "
                       "leave it on auto.")
    if attn == "mosaic":
      from pallas_kernels import _compat  # pylint: disable=g-import-not-at-top
      if not _compat.on_hopper():
        raise UsageError(f"--attn_impl=mosaic needs an sm_90 GPU (H100/H200); this is "
                         f"{jax.devices()[0].device_kind}. Use --attn_impl=cudnn.")
  return dtype_name, jnp.dtype(dtype_name), attn


def run(argv_flags=None) -> dict:
  """The CLI body; returns the report dict. Raises UsageError and friends on bad input."""
  del argv_flags
  # JAX keys hold 32-bit seeds: larger ones would silently repeat smaller ones.
  if not 0 <= _SEED.value < 2**32:
    raise UsageError(f"--seed must be in [0, 2**32), got {_SEED.value}")
  kind, cfgs = _checkpoint_kind(_CHECKPOINT.value)
  if kind == "infinity":
    wrong = _given(_VAR_ONLY)
    if wrong:
      what = (f"{_CHECKPOINT.value!r} is an Infinity (text-to-image) checkpoint"
              if _CHECKPOINT.value else "the default demo (no --checkpoint) is a random "
              "Infinity (text-to-image) model; pass --demo var for the random VAR demo")
      raise UsageError(
          f"{', '.join(wrong)} only apply to VAR (class-conditional) models, but {what}. "
          f"Drop {' and '.join(wrong)} and give prompts with --prompt or --prompts_file.")
    from sparvar_jax import sample_infinity  # pylint: disable=g-import-not-at-top
    return sample_infinity.run(cfgs, UsageError, _setup_jax, _resolve_dtype)
  wrong = _given(_INFINITY_ONLY)
  if wrong:
    what = (f"checkpoint {_CHECKPOINT.value!r} is a VAR (class-conditional ImageNet) model"
            if _CHECKPOINT.value else "the demo model (--demo var) is a random VAR "
            "(class-conditional ImageNet) model")
    raise UsageError(
        f"{', '.join(wrong)} only apply to Infinity (text-to-image) checkpoints, but {what}. "
        "Drop them, or pass --checkpoint with a directory converted by `python -m "
        "convert.infinity` (plus --t5 and --prompt).")
  return _run_var(cfgs)


def _run_var(cfgs: dict | None) -> dict:
  from sparvar_jax import configs, outputs  # pylint: disable=g-import-not-at-top
  from sparvar_jax.generate import VARGenerator, VARSampling  # pylint: disable=g-import-not-at-top

  labels, batch = _parse_labels(_LABELS.value, _BATCH.value)
  # The class count of the model to be loaded (a converted VAR need not have 1000).
  num_classes = getattr((cfgs or {}).get("var"), "num_classes", configs.VAR_DEMO.num_classes)
  if labels is not None:
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
      raise UsageError(f"class ids must be in [0, {num_classes}) (the model's classes), got "
                       f"{bad}")
  cfg = _VAR_CFG
  if _CFG.value is not None:
    try:
      cfg = float(_CFG.value)
    except ValueError as e:
      raise UsageError(f"--cfg for VAR must be one number (cfg must be >= 0), got "
                       f"{_CFG.value!r}") from e
  top_p = _VAR_TOP_P if _TOP_P.value is None else _TOP_P.value
  settings = VARSampling(cfg=cfg, top_k=_TOP_K.value, top_p=top_p,
                         more_smooth=_MORE_SMOOTH.value)
  try:
    settings.validate(vocab_size=None)
  except ValueError as e:
    raise UsageError(str(e)) from e
  out_dir = outputs.prepare_dir(_OUT.value)

  jax = _setup_jax()
  dtype_name, dtype, attn_impl = _resolve_dtype(jax)

  t0 = time.perf_counter()
  var, vae, source = _load_models(_CHECKPOINT.value, dtype, _SEED.value, attn_impl)
  print(f"model: {source}", file=sys.stderr)
  if _CHECKPOINT.value is None:
    print("note: the default model's weights are random, so its images are noise; pass "
          "--checkpoint for real images.", file=sys.stderr)
  try:
    settings.validate(var.cfg.vocab_size)
  except ValueError as e:
    raise UsageError(str(e)) from e
  gen = VARGenerator(var, vae, batch, settings, cache_dtype=dtype)
  if labels is None:
    labels = gen.sample_labels(_SEED.value).tolist()
  load_s = time.perf_counter() - t0

  def progress(si, k, secs):
    pn = var.cfg.patch_nums[si]
    print(f"scale {si + 1:2d}/{k} ({pn}x{pn}): {secs * 1e3:8.1f} ms", file=sys.stderr)

  res = gen(labels, seed=_SEED.value, progress=progress)
  print(f"decode: {res.decode_seconds * 1e3:.1f} ms", file=sys.stderr)

  for i, img in enumerate(res.image_BHW3):
    outputs.save_png(os.path.join(out_dir, f"{i:03d}_class{labels[i]}.png"), img)
  outputs.save_png(os.path.join(out_dir, "grid.png"), outputs.make_grid(res.image_BHW3))
  if _SAVE_NPZ.value:
    arrays = {f"idx_scale{si}": a for si, a in enumerate(res.idx_per_scale)}
    outputs.save_npz(os.path.join(out_dir, "samples.npz"), image_BHW3=res.image_BHW3,
                     labels_B=res.labels_B, **arrays)
  report = {
      "model": source,
      "random_weights": _CHECKPOINT.value is None,
      "config": {"depth": var.cfg.depth, "embed_dim": var.cfg.embed_dim,
                 "patch_nums": list(var.cfg.patch_nums), "vocab_size": var.cfg.vocab_size},
      "settings": {"labels": labels, "batch": batch, "cfg": settings.cfg,
                   "top_k": settings.top_k, "top_p": settings.top_p,
                   "more_smooth": settings.more_smooth, "seed": _SEED.value,
                   "dtype": dtype_name, "attn_impl": attn_impl},
      "device": str(jax.devices()[0]),
      "seconds": {"load_and_build": load_s, "per_scale_first_run_incl_compile":
                  res.scale_seconds, "decode": res.decode_seconds,
                  "total_generate": sum(res.scale_seconds) + res.decode_seconds},
      "image_shape": list(res.image_BHW3.shape),
      "files": sorted(f for f in os.listdir(out_dir) if not f.startswith(".")),
  }
  outputs.save_json(os.path.join(out_dir, "report.json"), report)
  print(f"wrote {len(res.image_BHW3)} images, grid.png and report.json to {out_dir}",
        file=sys.stderr)
  return report


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; see --help", file=sys.stderr)
    sys.exit(2)
  from sparvar_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from sparvar_jax.outputs import OutputError  # pylint: disable=g-import-not-at-top
  from sparvar_jax.text import T5LoadError  # pylint: disable=g-import-not-at-top
  try:
    run()
  except (UsageError, CheckpointError, OutputError, T5LoadError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
