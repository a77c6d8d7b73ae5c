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


from absl import app
from absl import flags

from sparvar_jax import cli_flags, runner
from sparvar_jax.runner import RunArgs, UsageError

flags.adopt_module_key_flags(cli_flags)  # --help lists the shared flags with these

_OUT = flags.DEFINE_string("out", "samples", "Output folder (new or empty; see --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out, replacing "
                               "this run's files there (other files are left alone).")
_LABELS = flags.DEFINE_string("labels", None, "VAR only. Comma-separated ImageNet class ids "
                              "in [0, 1000); one id is repeated over the batch. Default: "
                              "drawn uniformly from --seed.")
_BATCH = flags.DEFINE_integer("batch", None, "VAR: images to generate (default: the number "
                              "of labels, or 4). Infinity: prompts per generator call "
                              "(default 1).")
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Also write samples.npz.")
# Infinity only.
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Infinity only. A prompt; repeat the "
                                    "flag for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Infinity only. UTF-8 text file, "
                                    "one prompt per line (blank lines skipped).")

_VAR_ONLY = ("labels",) + cli_flags.VAR_ONLY
_INFINITY_ONLY = cli_flags.INFINITY_ONLY[:1] + ("prompt", "prompts_file") + \
    cli_flags.INFINITY_ONLY[1:]


def _run_args() -> RunArgs:
  return cli_flags.run_args(out=_OUT.value, overwrite=_OVERWRITE.value, batch=_BATCH.value,
                            save_npz=_SAVE_NPZ.value)


def run() -> dict:
  """The CLI body; returns the report dict. Raises UsageError and friends on bad input."""
  args = _run_args()
  cfgs = cli_flags.checkpoint_configs(args.checkpoint)
  kind = cli_flags.model_kind(args, cfgs)
  if kind == "infinity":
    wrong = cli_flags.given(_VAR_ONLY)
    if wrong:
      what = (f"{args.checkpoint!r} is an Infinity (text-to-image) checkpoint"
              if args.checkpoint else "the default demo (no --checkpoint) is a random "
              "Infinity (text-to-image) model; pass --demo var for the random VAR demo")
      raise UsageError(
          f"{', '.join(wrong)} only apply to VAR (class-conditional) models, but {what}. "
          f"Drop {' and '.join(wrong)} and give prompts with --prompt or --prompts_file.")
    from sparvar_jax import sample_infinity  # pylint: disable=g-import-not-at-top
    return sample_infinity.run(args, sample_infinity.InfinityArgs(
        t5=cli_flags.T5.value, prompts=tuple(_PROMPT.value or ()),
        prompts_file=_PROMPTS_FILE.value, negative=cli_flags.NEGATIVE.value,
        aspect=cli_flags.ASPECT.value, pn=cli_flags.PN.value, tau=cli_flags.TAU.value), cfgs)
  wrong = cli_flags.given(_INFINITY_ONLY)
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
                                                 more_smooth=cli_flags.MORE_SMOOTH.value),
                         cfgs)


def main(argv):
  runner.cli_main(argv, run, on_stop="the images finished so far and report.json are in --out.",
                  memory_hint=f"Generate fewer images at a time (--batch, now "
                  f"{_BATCH.value or 'default'}), use --dtype bfloat16 on a GPU, or free memory "
                  "on the device.")


if __name__ == "__main__":
  app.run(main)
