"""The flags `python -m sparvar_jax.sample` and `python -m sparvar_jax.generate_many` share:
the model, sampling, numerics, the attention plan and the loop options, with the checks
that turn them into a `RunArgs`.

absl flags are process-wide, so importing this module defines them: only the two CLI
modules import it (scripts with flags of the same names import the runners instead).
"""

from __future__ import annotations

import os

from absl import flags

from sparvar_jax.runner import LoopSettings, RunArgs, UsageError
from sparvar_jax.sparse.config import (CS4A_GRANULARITIES, CSLA_GRANULARITIES, MAPPINGS,
                                       SparVARConfig)

_SV = SparVARConfig()  # flag defaults come from the policy's own defaults

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory "
                                 "(python -m convert.var, or python -m convert.infinity for "
                                 "text-to-image). Default: a random tiny model (see --demo).")
CFG = flags.DEFINE_string("cfg", None, "Classifier-free guidance ratio (>= 0). VAR: one "
                          "number, default 1.5. Infinity: one number or a comma list with "
                          "one per scale, default 3.")
TOP_K = flags.DEFINE_integer("top_k", None, "Top-k sampling (0 = off, 1 = greedy). Default "
                             "900 (the official value).")
TOP_P = flags.DEFINE_float("top_p", None, "Top-p sampling in [0, 1] (0 and 1 keep every "
                           "token). Default: 0.96 (VAR), 0.97 (Infinity).")
SEED = flags.DEFINE_integer("seed", 0, "Random seed, in [0, 2**32).")
MORE_SMOOTH = flags.DEFINE_bool("more_smooth", False, "VAR only. Gumbel-softmax smoothing "
                                "(official visualisation option; not for FID).")
DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                          "Compute dtype of the transformer blocks (auto: bfloat16 on GPU, "
                          "float32 on CPU).")
ATTN = flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn", "mosaic"],
                         "Dense attention kernel. auto: 'cudnn' on a GPU in bfloat16, 'xla' "
                         "otherwise. 'mosaic': our Hopper flash kernel for the unmasked calls "
                         "(H100/H200).")
DEMO = flags.DEFINE_enum("demo", "infinity", ["infinity", "var"],
                         "The random tiny model used without --checkpoint: 'infinity' "
                         "(text-to-image, full 13-scale 1024x1024 schedule, random text "
                         "features instead of T5) or 'var' (class-conditional, 256x256).")
# Infinity only.
T5 = flags.DEFINE_string("t5", None, "Infinity only. Converted T5 directory "
                         "(python -m convert.t5): config.json, t5/, spiece.model.")
NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Infinity only. Negative prompt "
                               "for classifier-free guidance (default: the model's learned "
                               "unconditional text).")
ASPECT = flags.DEFINE_string("aspect", None, "Infinity only. Aspect ratio W:H (or WxH, or "
                             "a height/width number); default 1:1. Not a template: the "
                             "nearest template is used.")
PN = flags.DEFINE_string("pn", None, "Infinity only. Pixel budget: 0.06M, 0.25M, 0.60M or "
                         "1M (default 1M; 1M at 1:1 is 1024x1024).")
TAU = flags.DEFINE_string("tau", None, "Infinity only. Sampling temperature (> 0): one "
                          "number or a comma list with one per scale; default 1.")
# Attention plan and loop options.
ATTENTION = flags.DEFINE_enum("attention", "dense", ["dense", "sparvar"],
                              "dense: every layer attends to every cached key (the official "
                              "models). sparvar: SparVAR's training-free sparse attention "
                              "(see --sparvar_*).")
SV_DECISION = flags.DEFINE_integer("sparvar_decision_scale", _SV.decision_scale,
                                   "SparVAR: the scale whose dense attention picks the keys "
                                   "(default: the third-last, 10 of 13).")
SV_TOP_KEYS = flags.DEFINE_float("sparvar_top_keys", _SV.top_keys, "SparVAR: fraction of the "
                                 "decision scale's keys each query group keeps.")
SV_BOUND = flags.DEFINE_integer("sparvar_bound_layer", _SV.bound_layer, "SparVAR: CS4A in "
                                "layers 0..bound_layer, CSLA above (-1: no CS4A layer).")
SV_SINKS = flags.DEFINE_integer("sparvar_sink_scales", _SV.sink_scales, "SparVAR: CSLA's "
                                "attention sinks, every key of scales 0..N-1.")
SV_WINDOWS = flags.DEFINE_string("sparvar_csla_windows", None, "SparVAR: CSLA window side "
                                 "per key scale, comma-separated, one per scale (-1: unseen). "
                                 "Default -1,..,-1,1,1,3,5,7.")
SV_BANDS = flags.DEFINE_string("sparvar_cs4a_bands", None, "SparVAR: CS4A's current-scale "
                               "window of each scale after the decision scale (default "
                               "7,9,...).")
SV_GROUP = flags.DEFINE_integer("sparvar_group_size", _SV.group_size, "SparVAR: queries per "
                                "CS4A group.")
SV_MULTIPLE = flags.DEFINE_integer("sparvar_key_multiple", _SV.key_multiple, "SparVAR: key "
                                   "budgets and bands are multiples of this.")
SV_BLOCK = flags.DEFINE_integer("sparvar_block_size", _SV.block_size, "SparVAR: CSLA's "
                                "block side.")
SV_MAPPING = flags.DEFINE_enum("sparvar_mapping", _SV.mapping, list(MAPPINGS), "SparVAR: "
                               "how later scales reuse the decision (group: the authors'; "
                               "kv_shift: their unevaluated scale-shift variant).")
SV_OCACHE = flags.DEFINE_bool("sparvar_output_cache", _SV.output_cache, "SparVAR: add the "
                              "decision scale's O_dense - O_sparse, upsampled.")
SV_CSLA_GRAN = flags.DEFINE_enum("sparvar_csla_granularity", _SV.csla_granularity,
                                 list(CSLA_GRANULARITIES), "SparVAR: block (whole visited "
                                 "blocks, as the authors) or exact (the token rule).")
SV_CS4A_GRAN = flags.DEFINE_enum("sparvar_cs4a_granularity", _SV.cs4a_granularity,
                                 list(CS4A_GRANULARITIES), "SparVAR: token (the authors': "
                                 "single keys per query group) or block (whole key blocks per "
                                 "query block, the block-sparse kernel).")
SV_CS4A = flags.DEFINE_bool("sparvar_cs4a", _SV.use_cs4a, "SparVAR: CS4A on (off: those "
                            "layers run dense).")
SV_CSLA = flags.DEFINE_bool("sparvar_csla", _SV.use_csla, "SparVAR: CSLA on (off: those "
                            "layers run dense).")
SV_KERNELS = flags.DEFINE_enum("sparvar_kernels", "auto", ["auto", "reference", "interpret"],
                               "SparVAR: Pallas kernels on a GPU, pure-JAX references "
                               "elsewhere (auto), or force one.")
SKIP = flags.DEFINE_integer("skip_last_scales", 0, "Stop that many scales early and decode "
                            "what was accumulated (the authors' 'skip 2').")
DROP = flags.DEFINE_integer("drop_uncond_last_scales", 0, "Run the last N computed scales "
                            "without the unconditional branch (no guidance there).")

VAR_ONLY = ("more_smooth",)
INFINITY_ONLY = ("t5", "negative_prompt", "aspect", "pn", "tau")
SPARVAR_ONLY = ("sparvar_decision_scale", "sparvar_top_keys", "sparvar_bound_layer",
                "sparvar_sink_scales", "sparvar_csla_windows", "sparvar_cs4a_bands",
                "sparvar_group_size", "sparvar_key_multiple", "sparvar_block_size",
                "sparvar_mapping", "sparvar_output_cache", "sparvar_csla_granularity",
                "sparvar_cs4a_granularity",
                "sparvar_cs4a", "sparvar_csla", "sparvar_kernels")


def given(names) -> list[str]:
  """The flags among `names` that the command line sets, as '--name'."""
  return ["--" + n for n in names if flags.FLAGS[n].present]


def int_list(name: str, text: str | None) -> tuple[int, ...] | None:
  if text is None:
    return None
  try:
    return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
  except ValueError:
    raise UsageError(f"--{name} must be comma-separated integers, got {text!r}") from None


def sparvar_config(needed: bool | None = None) -> SparVARConfig | None:
  """The SparVAR setting of the --sparvar_* flags: with --attention sparvar (or `needed`,
  when items ask for it one by one), else None (and --sparvar_* flags are refused)."""
  if needed is None:
    needed = ATTENTION.value == "sparvar"
  if not needed:
    wrong = given(SPARVAR_ONLY)
    if wrong:
      raise UsageError(f"{', '.join(wrong)} only apply with --attention sparvar; add it or drop "
                       "them.")
    return None
  from sparvar_jax.sparse.config import PlanError  # pylint: disable=g-import-not-at-top
  try:
    return SparVARConfig(
        decision_scale=SV_DECISION.value, top_keys=SV_TOP_KEYS.value,
        bound_layer=SV_BOUND.value, sink_scales=SV_SINKS.value,
        csla_windows=int_list("sparvar_csla_windows", SV_WINDOWS.value),
        cs4a_bands=int_list("sparvar_cs4a_bands", SV_BANDS.value),
        group_size=SV_GROUP.value, key_multiple=SV_MULTIPLE.value, block_size=SV_BLOCK.value,
        mapping=SV_MAPPING.value, output_cache=SV_OCACHE.value,
        csla_granularity=SV_CSLA_GRAN.value, cs4a_granularity=SV_CS4A_GRAN.value,
        use_cs4a=SV_CS4A.value, use_csla=SV_CSLA.value)
  except PlanError as e:
    raise UsageError(f"--attention sparvar: {e}") from None


def run_args(*, out: str, overwrite: bool, batch: int | None, save_npz: bool,
             sparvar_needed: bool | None = None) -> RunArgs:
  """RunArgs from the shared flags plus the CLI's own output settings, checked."""
  # JAX keys hold 32-bit seeds: larger ones would silently repeat smaller ones.
  if not 0 <= SEED.value < 2 ** 32:
    raise UsageError(f"--seed must be in [0, 2**32), got {SEED.value}")
  if batch is not None and batch < 1:
    raise UsageError(f"--batch must be >= 1, got {batch}")
  if TOP_K.value is not None and TOP_K.value < 0:
    raise UsageError(f"top_k must be >= 0 (0 turns it off), got {TOP_K.value}")
  if TOP_P.value is not None and not 0.0 <= TOP_P.value <= 1.0:
    raise UsageError(f"top_p must be in [0, 1] (0 and 1 keep every token), got {TOP_P.value}")
  for name, v in (("skip_last_scales", SKIP.value), ("drop_uncond_last_scales", DROP.value)):
    if v < 0:
      raise UsageError(f"--{name} must be >= 0, got {v}")
  return RunArgs(
      checkpoint=CHECKPOINT.value, demo=DEMO.value, out=out, overwrite=overwrite,
      seed=SEED.value, batch=batch, cfg=CFG.value, top_k=TOP_K.value,
      top_p=TOP_P.value, save_npz=save_npz, dtype=DTYPE.value, attn_impl=ATTN.value,
      attention=ATTENTION.value, sparvar=sparvar_config(sparvar_needed),
      kernels=SV_KERNELS.value, loop=LoopSettings(SKIP.value, DROP.value))


def checkpoint_configs(checkpoint: str | None) -> dict | None:
  """The checkpoint's configs (read once), or None for the demo."""
  if checkpoint is None:
    return None
  if DEMO.present:
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


def model_kind(args: RunArgs, cfgs: dict | None) -> str:
  """'infinity' or 'var': the checkpoint's family, or the demo's."""
  return args.demo if cfgs is None else ("infinity" if "infinity" in cfgs else "var")
