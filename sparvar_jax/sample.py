r"""Generate images with VAR (class-conditional ImageNet) or Infinity (text-to-image).

With no arguments it runs an embedded default: a tiny, randomly initialised Infinity on
the full 13-scale 1024x1024 schedule (where SparVAR acts), with random text features in
place of T5, on the CPU in well under a minute. Its weights are random, so the images
are noise: it shows the whole path works. `--demo var` runs a tiny random VAR instead.
For real images, convert the official checkpoints first:

  python -m convert.var --var var_d16.pth --vae vae_ch160v4096z32.pth --out ckpt/var_d16
  python -m sparvar_jax.sample --checkpoint ckpt/var_d16 --labels 207,360,387,974 \
      --cfg 4 --top_k 900 --top_p 0.95 --seed 0 --out samples/

Infinity (text-to-image): a checkpoint converted with `python -m convert.infinity`
switches to Infinity mode, which needs a converted T5 (`python -m convert.t5`) and prompts:

  python -m sparvar_jax.sample --checkpoint ckpt/infinity_2b --t5 ckpt/flan-t5-xl \
      --prompt "a red fox in the snow" --aspect 1:1 --pn 1M --cfg 3 --tau 1 --seed 0

SparVAR (training-free sparse attention; the authors' setting by default):

  python -m sparvar_jax.sample --checkpoint ckpt/infinity_2b --t5 ckpt/flan-t5-xl \
      --prompt "a red fox in the snow" --attention sparvar [--skip_last_scales 2]

`--sparvar_*` flags change every knob of the policy (decision scale, key budget, layer
split, sinks, windows, bands, group size, mapping, output cache, ablations); settings that do
not fit the schedule are refused with the reason before anything is loaded.

Outputs under --out (refused if it already holds files, unless --overwrite): one PNG per
image, `grid.png`, `report.json` (settings, the attention plan that ran, per-scale timings,
exactly the files written) and with `--save_npz` `samples.npz` (tokens of every scale,
float images). Image i of a run draws from fold_in(key(--seed), i): the same seed and
prompt (or label) give the same image whatever --batch is. Ctrl-C or SIGTERM stops after
the images finished so far, which are complete, with a report that says so.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from sparvar_jax import runner
from sparvar_jax.runner import LoopSettings, RunArgs, Terminated, UsageError
from sparvar_jax.sparse.config import (CS4A_GRANULARITIES, CSLA_GRANULARITIES, MAPPINGS,
                                       SparVARConfig)

_SV = SparVARConfig()  # flag defaults come from the policy's own defaults

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory "
                                  "(python -m convert.var, or python -m convert.infinity for "
                                  "text-to-image). Default: a random tiny model (see --demo).")
_OUT = flags.DEFINE_string("out", "samples", "Output folder (new or empty; see --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out, replacing "
                               "this run's files there (other files are left alone).")
_LABELS = flags.DEFINE_string("labels", None, "VAR only. Comma-separated ImageNet class ids "
                              "in [0, 1000); one id is repeated over the batch. Default: "
                              "drawn uniformly from --seed.")
_BATCH = flags.DEFINE_integer("batch", None, "VAR: images to generate (default: the number "
                              "of labels, or 4). Infinity: prompts per generator call "
                              "(default 1).")
_CFG = flags.DEFINE_string("cfg", None, "Classifier-free guidance ratio (>= 0). VAR: one "
                           "number, default 1.5. Infinity: one number or a comma list with "
                           "one per scale, default 3.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k sampling (0 = off, 1 = greedy). Default "
                              "900 (the official value).")
_TOP_P = flags.DEFINE_float("top_p", None, "Top-p sampling in [0, 1] (0 and 1 keep every "
                            "token). Default: 0.96 (VAR), 0.97 (Infinity).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed, in [0, 2**32).")
_MORE_SMOOTH = flags.DEFINE_bool("more_smooth", False, "VAR only. Gumbel-softmax smoothing "
                                 "(official visualisation option; not for FID).")
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Also write samples.npz.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype of the transformer blocks (auto: bfloat16 on GPU, "
                           "float32 on CPU).")
_ATTN = flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn", "mosaic"],
                          "Dense attention kernel. auto: 'cudnn' on a GPU in bfloat16, 'xla' "
                          "otherwise. 'mosaic': our Hopper flash kernel for the unmasked calls "
                          "(H100/H200).")
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
# Attention plan and loop options.
_ATTENTION = flags.DEFINE_enum("attention", "dense", ["dense", "sparvar"],
                               "dense: every layer attends to every cached key (the official "
                               "models). sparvar: SparVAR's training-free sparse attention "
                               "(see --sparvar_*).")
_SV_DECISION = flags.DEFINE_integer("sparvar_decision_scale", _SV.decision_scale,
                                    "SparVAR: the scale whose dense attention picks the keys "
                                    "(default: the third-last, 10 of 13).")
_SV_TOP_KEYS = flags.DEFINE_float("sparvar_top_keys", _SV.top_keys, "SparVAR: fraction of the "
                                  "decision scale's keys each query group keeps.")
_SV_BOUND = flags.DEFINE_integer("sparvar_bound_layer", _SV.bound_layer, "SparVAR: CS4A in "
                                 "layers 0..bound_layer, CSLA above (-1: no CS4A layer).")
_SV_SINKS = flags.DEFINE_integer("sparvar_sink_scales", _SV.sink_scales, "SparVAR: CSLA's "
                                 "attention sinks, every key of scales 0..N-1.")
_SV_WINDOWS = flags.DEFINE_string("sparvar_csla_windows", None, "SparVAR: CSLA window side "
                                  "per key scale, comma-separated, one per scale (-1: unseen). "
                                  "Default -1,..,-1,1,1,3,5,7.")
_SV_BANDS = flags.DEFINE_string("sparvar_cs4a_bands", None, "SparVAR: CS4A's current-scale "
                                "window of each scale after the decision scale (default "
                                "7,9,...).")
_SV_GROUP = flags.DEFINE_integer("sparvar_group_size", _SV.group_size, "SparVAR: queries per "
                                 "CS4A group.")
_SV_MULTIPLE = flags.DEFINE_integer("sparvar_key_multiple", _SV.key_multiple, "SparVAR: key "
                                    "budgets and bands are multiples of this.")
_SV_BLOCK = flags.DEFINE_integer("sparvar_block_size", _SV.block_size, "SparVAR: CSLA's "
                                 "block side.")
_SV_MAPPING = flags.DEFINE_enum("sparvar_mapping", _SV.mapping, list(MAPPINGS), "SparVAR: "
                                "how later scales reuse the decision (group: the authors'; "
                                "kv_shift: their unevaluated scale-shift variant).")
_SV_OCACHE = flags.DEFINE_bool("sparvar_output_cache", _SV.output_cache, "SparVAR: add the "
                               "decision scale's O_dense - O_sparse, upsampled.")
_SV_CSLA_GRAN = flags.DEFINE_enum("sparvar_csla_granularity", _SV.csla_granularity,
                                  list(CSLA_GRANULARITIES), "SparVAR: block (whole visited "
                                  "blocks, as the authors) or exact (the token rule).")
_SV_CS4A_GRAN = flags.DEFINE_enum("sparvar_cs4a_granularity", _SV.cs4a_granularity,
                                  list(CS4A_GRANULARITIES), "SparVAR: token (the authors': "
                                  "single keys per query group) or block (whole key blocks per "
                                  "query block, the block-sparse kernel).")
_SV_CS4A = flags.DEFINE_bool("sparvar_cs4a", _SV.use_cs4a, "SparVAR: CS4A on (off: those "
                             "layers run dense).")
_SV_CSLA = flags.DEFINE_bool("sparvar_csla", _SV.use_csla, "SparVAR: CSLA on (off: those "
                             "layers run dense).")
_SV_KERNELS = flags.DEFINE_enum("sparvar_kernels", "auto", ["auto", "reference", "interpret"],
                                "SparVAR: Pallas kernels on a GPU, pure-JAX references "
                                "elsewhere (auto), or force one.")
_SKIP = flags.DEFINE_integer("skip_last_scales", 0, "Stop that many scales early and decode "
                             "what was accumulated (the authors' 'skip 2').")
_DROP = flags.DEFINE_integer("drop_uncond_last_scales", 0, "Run the last N computed scales "
                             "without the unconditional branch (no guidance there).")

_VAR_ONLY = ("labels", "more_smooth")
_INFINITY_ONLY = ("t5", "prompt", "prompts_file", "negative_prompt", "aspect", "pn", "tau")
_SPARVAR_ONLY = ("sparvar_decision_scale", "sparvar_top_keys", "sparvar_bound_layer",
                 "sparvar_sink_scales", "sparvar_csla_windows", "sparvar_cs4a_bands",
                 "sparvar_group_size", "sparvar_key_multiple", "sparvar_block_size",
                 "sparvar_mapping", "sparvar_output_cache", "sparvar_csla_granularity",
                 "sparvar_cs4a_granularity",
                 "sparvar_cs4a", "sparvar_csla", "sparvar_kernels")


def _given(names) -> list[str]:
  return ["--" + n for n in names if flags.FLAGS[n].present]


def _int_list(name: str, text: str | None) -> tuple[int, ...] | None:
  if text is None:
    return None
  try:
    return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
  except ValueError:
    raise UsageError(f"--{name} must be comma-separated integers, got {text!r}") from None


def _sparvar_config() -> SparVARConfig | None:
  if _ATTENTION.value != "sparvar":
    wrong = _given(_SPARVAR_ONLY)
    if wrong:
      raise UsageError(f"{', '.join(wrong)} only apply with --attention sparvar; add it or drop "
                       "them.")
    return None
  from sparvar_jax.sparse.config import PlanError  # pylint: disable=g-import-not-at-top
  try:
    return SparVARConfig(
        decision_scale=_SV_DECISION.value, top_keys=_SV_TOP_KEYS.value,
        bound_layer=_SV_BOUND.value, sink_scales=_SV_SINKS.value,
        csla_windows=_int_list("sparvar_csla_windows", _SV_WINDOWS.value),
        cs4a_bands=_int_list("sparvar_cs4a_bands", _SV_BANDS.value),
        group_size=_SV_GROUP.value, key_multiple=_SV_MULTIPLE.value, block_size=_SV_BLOCK.value,
        mapping=_SV_MAPPING.value, output_cache=_SV_OCACHE.value,
        csla_granularity=_SV_CSLA_GRAN.value, cs4a_granularity=_SV_CS4A_GRAN.value,
        use_cs4a=_SV_CS4A.value, use_csla=_SV_CSLA.value)
  except PlanError as e:
    raise UsageError(f"--attention sparvar: {e}") from None


def _run_args() -> RunArgs:
  # JAX keys hold 32-bit seeds: larger ones would silently repeat smaller ones.
  if not 0 <= _SEED.value < 2 ** 32:
    raise UsageError(f"--seed must be in [0, 2**32), got {_SEED.value}")
  if _BATCH.value is not None and _BATCH.value < 1:
    raise UsageError(f"--batch must be >= 1, got {_BATCH.value}")
  if _TOP_K.value is not None and _TOP_K.value < 0:
    raise UsageError(f"top_k must be >= 0 (0 turns it off), got {_TOP_K.value}")
  if _TOP_P.value is not None and not 0.0 <= _TOP_P.value <= 1.0:
    raise UsageError(f"top_p must be in [0, 1] (0 and 1 keep every token), got {_TOP_P.value}")
  for name, v in (("skip_last_scales", _SKIP.value), ("drop_uncond_last_scales", _DROP.value)):
    if v < 0:
      raise UsageError(f"--{name} must be >= 0, got {v}")
  return RunArgs(
      checkpoint=_CHECKPOINT.value, demo=_DEMO.value, out=_OUT.value, overwrite=_OVERWRITE.value,
      seed=_SEED.value, batch=_BATCH.value, cfg=_CFG.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, save_npz=_SAVE_NPZ.value, dtype=_DTYPE.value, attn_impl=_ATTN.value,
      attention=_ATTENTION.value, sparvar=_sparvar_config(), kernels=_SV_KERNELS.value,
      loop=LoopSettings(_SKIP.value, _DROP.value))


def _checkpoint_configs(checkpoint: str | None) -> dict | None:
  """The checkpoint's configs (read once), or None for the demo."""
  if checkpoint is None:
    return None
  if _DEMO.present:
    raise UsageError("--demo picks the random model used when no --checkpoint is given; "
                     "drop --demo or --checkpoint.")
  if os.path.isfile(checkpoint):
    raise UsageError(f"--checkpoint {checkpoint!r} is a file; it must be a directory converted "
                     "from the official weights: `python -m convert.var --var FILE.pth --vae "
                     "VAE.pth --out DIR` (VAR) or `python -m convert.infinity --model FILE.pth "
                     "--vae VAE.pth --out DIR` (Infinity), then pass --checkpoint DIR.")
  from sparvar_jax.checkpoint import read_config  # pylint: disable=g-import-not-at-top
  cfgs, _ = read_config(checkpoint)
  return cfgs


def run() -> dict:
  """The CLI body; returns the report dict. Raises UsageError and friends on bad input."""
  args = _run_args()
  cfgs = _checkpoint_configs(args.checkpoint)
  kind = args.demo if cfgs is None else ("infinity" if "infinity" in cfgs else "var")
  if kind == "infinity":
    wrong = _given(_VAR_ONLY)
    if wrong:
      what = (f"{args.checkpoint!r} is an Infinity (text-to-image) checkpoint"
              if args.checkpoint else "the default demo (no --checkpoint) is a random "
              "Infinity (text-to-image) model; pass --demo var for the random VAR demo")
      raise UsageError(
          f"{', '.join(wrong)} only apply to VAR (class-conditional) models, but {what}. "
          f"Drop {' and '.join(wrong)} and give prompts with --prompt or --prompts_file.")
    from sparvar_jax import sample_infinity  # pylint: disable=g-import-not-at-top
    return sample_infinity.run(args, sample_infinity.InfinityArgs(
        t5=_T5.value, prompts=tuple(_PROMPT.value or ()), prompts_file=_PROMPTS_FILE.value,
        negative=_NEGATIVE.value, aspect=_ASPECT.value, pn=_PN.value, tau=_TAU.value), cfgs)
  wrong = _given(_INFINITY_ONLY)
  if wrong:
    what = (f"checkpoint {args.checkpoint!r} is a VAR (class-conditional ImageNet) model"
            if args.checkpoint else "the demo model (--demo var) is a random VAR "
            "(class-conditional ImageNet) model")
    raise UsageError(
        f"{', '.join(wrong)} only apply to Infinity (text-to-image) checkpoints, but {what}. "
        "Drop them, or pass --checkpoint with a directory converted by `python -m "
        "convert.infinity` (plus --t5 and --prompt).")
  from sparvar_jax import sample_var  # pylint: disable=g-import-not-at-top
  return sample_var.run(args, sample_var.VARArgs(labels=_LABELS.value,
                                                 more_smooth=_MORE_SMOOTH.value), cfgs)


def _out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
      "Out of memory" in text or "out of memory" in text


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; see --help", file=sys.stderr)
    sys.exit(2)
  runner.quiet_unless_asked()
  from sparvar_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from sparvar_jax.outputs import OutputError  # pylint: disable=g-import-not-at-top
  from sparvar_jax.text import T5LoadError  # pylint: disable=g-import-not-at-top
  try:
    run()
  except (UsageError, CheckpointError, OutputError, T5LoadError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted (Ctrl-C): the images finished so far and report.json are in --out.",
          file=sys.stderr)
    sys.exit(130)
  except Terminated:
    print("terminated (SIGTERM): the images finished so far and report.json are in --out.",
          file=sys.stderr)
    sys.exit(143)
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    print(f"error: out of memory ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
          f"Generate fewer images at a time (--batch, now {_BATCH.value or 'default'}), use "
          "--dtype bfloat16 on a GPU, or free memory on the device.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
