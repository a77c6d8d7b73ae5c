r"""Fidelity of SparVAR (and its options) against dense attention, same seeds and prompts.

For every prompt (Infinity) or class label (VAR) and every seed, the dense image and each
variant's image are generated with the same per-image key, then compared: PSNR and SSIM of
the images (dm-pix; identical images report PSNR_CAP), per-scale token agreement of the free-running runs, and, with the
dense tokens forced as history, the relative error of every sparse layer's attention output
against dense attention on the same queries and keys. Writes `fidelity.png` (one row per
item: dense, then each variant) and `fidelity.json` (per item, and means per variant).

  python scripts/compare_sparse_dense.py --checkpoint ckpt/infinity_2b --t5 ckpt/flan-t5-xl \
      --prompt "a red fox in the snow" --prompt "a lighthouse at dusk" --seeds 0,1 \
      --variants sparvar,sparvar_skip2,sparvar_drop2 --out fidelity/

Without --checkpoint it runs on the random tiny demo model (`--demo infinity|var`): the
numbers then say nothing about trained models, but the tool runs unchanged on converted
checkpoints. Variants: see VARIANTS below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from sparvar_jax.sparse.config import SparVARConfig  # pylint: disable=wrong-import-position

PSNR_CAP = 100.0  # dB, reported for identical images (PSNR is infinite there)

# name -> (SparVAR setting or None for dense, skip_last_scales, drop_uncond_last_scales)
VARIANTS = {
    "sparvar": (SparVARConfig(), 0, 0),
    "sparvar_skip1": (SparVARConfig(), 1, 0),
    "sparvar_skip2": (SparVARConfig(), 2, 0),
    "sparvar_drop2": (SparVARConfig(), 0, 2),
    "no_output_cache": (SparVARConfig(output_cache=False), 0, 0),
    "cs4a_only": (SparVARConfig(use_csla=False), 0, 0),
    "csla_only": (SparVARConfig(use_cs4a=False), 0, 0),
    "csla_exact": (SparVARConfig(csla_granularity="exact"), 0, 0),
    "kv_shift": (SparVARConfig(mapping="kv_shift"), 0, 0),
    "cs4a_blocks": (SparVARConfig(cs4a_granularity="block"), 0, 0),
    "dense_skip2": (None, 2, 0),
}

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Converted VAR or Infinity checkpoint; "
                                  "default: the random tiny demo model (--demo).")
_DEMO = flags.DEFINE_enum("demo", "infinity", ["infinity", "var"], "Demo model without "
                          "--checkpoint.")
_T5 = flags.DEFINE_string("t5", None, "Converted T5 (Infinity checkpoints).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Infinity: a prompt (repeat).")
_LABELS = flags.DEFINE_string("labels", "207,360", "VAR: comma-separated class ids.")
_SEEDS = flags.DEFINE_string("seeds", "0", "Comma-separated seeds; each item runs with each.")
_PN = flags.DEFINE_string("pn", "1M", "Infinity pixel budget.")
_ASPECT = flags.DEFINE_string("aspect", "1:1", "Infinity aspect W:H.")
_CFG = flags.DEFINE_float("cfg", None, "Guidance (default: the family's: VAR 1.5, Infinity 3).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k (default 900; 1 = greedy).")
_VARIANTS = flags.DEFINE_string("variants", "sparvar,sparvar_skip2,sparvar_drop2",
                                f"Comma-separated, from: {', '.join(VARIANTS)}.")
_KERNELS = flags.DEFINE_enum("sparvar_kernels", "auto", ["auto", "reference", "interpret"],
                             "SparVAR kernels (auto: Pallas on a GPU, references elsewhere).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Compute dtype.")
_OUT = flags.DEFINE_string("out", "fidelity", "Output folder (new or empty).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out.")
_PROBE = flags.DEFINE_bool("probe_layers", True, "Also measure each sparse layer's attention "
                           "error with the dense tokens forced (one more run per variant).")


class Family:
  """What the comparison needs from VAR or Infinity: items, a loop per plan, the call."""

  def __init__(self, dtype, attn_impl):
    from sparvar_jax import sample_infinity, sample_var, schedules  # pylint: disable=g-import-not-at-top
    from sparvar_jax.checkpoint import read_config  # pylint: disable=g-import-not-at-top
    cfgs = read_config(_CHECKPOINT.value)[0] if _CHECKPOINT.value else None
    self.kind = _DEMO.value if cfgs is None else ("infinity" if "infinity" in cfgs else "var")
    if self.kind == "infinity":
      from sparvar_jax.families.infinity import InfinitySampling  # pylint: disable=g-import-not-at-top
      model, vae, encoder, self.source = sample_infinity.load_models(
          _CHECKPOINT.value, _T5.value, cfgs, dtype, attn_impl, 0)
      tok = None
      if encoder is not None:
        from sparvar_jax import text  # pylint: disable=g-import-not-at-top
        tok = text.T5Tokenizer.from_dir(_T5.value)
      self.items = list(_PROMPT.value or [sample_infinity.DEMO_PROMPT])
      feats, lens = sample_infinity.text_features(encoder, tok, model.cfg, self.items)
      self.cond = [(feats[i:i + 1], lens[i:i + 1]) for i in range(len(self.items))]
      self.schedule = schedules.get_schedule(schedules.parse_aspect(_ASPECT.value), _PN.value)
      d = InfinitySampling()
      self.settings = InfinitySampling(cfg=d.cfg if _CFG.value is None else _CFG.value,
                                       top_k=d.top_k if _TOP_K.value is None else _TOP_K.value)
      from sparvar_jax.families.infinity import InfinityAdapter, bucket_text_len  # pylint: disable=g-import-not-at-top
      self.adapter = lambda: InfinityAdapter(model, vae, self.schedule, self.settings,
                                             text_len=bucket_text_len(lens), cache_dtype=dtype)
    else:
      from sparvar_jax.families.var import VARAdapter, VARSampling  # pylint: disable=g-import-not-at-top
      var, vae, self.source = sample_var.load_models(_CHECKPOINT.value, 0, dtype, attn_impl)
      labels = [int(x) for x in _LABELS.value.split(",") if x]
      self.items = [f"class {c}" for c in labels]
      self.cond = [([c],) for c in labels]
      self.schedule = schedules.square_schedule(var.cfg.patch_nums)
      d = VARSampling()
      self.settings = VARSampling(cfg=d.cfg if _CFG.value is None else _CFG.value,
                                  top_k=d.top_k if _TOP_K.value is None else _TOP_K.value)
      self.adapter = lambda: VARAdapter(var, vae, self.settings, cache_dtype=dtype)
    self.depth = self.adapter().depth


def main(argv):
  del argv
  from sparvar_jax.runner import quiet_unless_asked  # pylint: disable=g-import-not-at-top
  quiet_unless_asked()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import dm_pix  # pylint: disable=g-import-not-at-top
  from sparvar_jax import outputs, runner  # pylint: disable=g-import-not-at-top
  from sparvar_jax.generate import LoopOptions, ScaleLoop, row_keys  # pylint: disable=g-import-not-at-top
  from sparvar_jax.sparse import plan as plan_lib, probe  # pylint: disable=g-import-not-at-top

  names = [v for v in _VARIANTS.value.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown or not names:
    sys.exit(f"error: unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
  seeds = [int(s) for s in _SEEDS.value.split(",") if s]
  out = outputs.OutputRun(_OUT.value, _OVERWRITE.value)
  jax = runner.setup_jax()
  _, dtype, attn_impl = runner.resolve_dtype(jax, _DTYPE.value, "auto")
  fam = Family(dtype, attn_impl)
  sch, n = fam.schedule, fam.schedule.num_scales

  def loop_for(name):
    if name == "dense":
      return ScaleLoop(fam.adapter(), 1, plan_lib.dense_plan(sch, fam.depth))
    sv, skip, drop = VARIANTS[name]
    plan = (plan_lib.dense_plan(sch, fam.depth) if sv is None else
            plan_lib.sparvar_plan(sch, fam.depth, sv, kernels=_KERNELS.value))
    return ScaleLoop(fam.adapter(), 1, plan, LoopOptions(skip, drop))

  loops = {name: loop_for(name) for name in ["dense"] + names}
  probes = {name: ScaleLoop(fam.adapter(), 1, probe.probe_plan(loops[name].plan, name))
            for name in names if loops[name].plan.sparvar is not None and _PROBE.value}
  print(f"model: {fam.source}; {len(fam.items)} items x {len(seeds)} seeds; variants {names}",
        file=sys.stderr)
  rows, records = [], []
  for i, item in enumerate(fam.items):
    for seed in seeds:
      keys = row_keys(seed, [i])
      t0 = time.perf_counter()
      dense = loops["dense"](*fam.cond[i], keys=keys)
      row, rec = [dense.image_BHW3[0]], {"item": item, "seed": seed, "variants": {}}
      for name in names:
        res = loops[name](*fam.cond[i], keys=keys)
        a, b = dense.image_BHW3[0], res.image_BHW3[0]
        agree = [float(np.mean(x == y)) for x, y in zip(dense.tokens_per_scale,
                                                         res.tokens_per_scale)]
        entry = {"psnr": min(float(dm_pix.psnr(a, b)), PSNR_CAP),
                 "ssim": float(dm_pix.ssim(a, b)),
                 "token_agreement_per_scale": agree,
                 "seconds": sum(res.scale_seconds) + res.decode_seconds}
        if name in probes:
          probes[name](*fam.cond[i], keys=keys, forced=dense.tokens_per_scale, decode=False)
          entry["attention_rel_error"] = {str(k): [v[l] for l in sorted(v)]
                                          for k, v in probe.take(name).items()}
        rec["variants"][name] = entry
        row.append(b)
      rows.append(row)
      records.append(rec)
      print(f"{item!r} seed {seed}: " + ", ".join(
          f"{v} PSNR {rec['variants'][v]['psnr']:.2f} SSIM {rec['variants'][v]['ssim']:.3f}"
          for v in names) + f" ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
  summary = {}
  for name in names:
    vals = [r["variants"][name] for r in records]
    summary[name] = {"psnr_mean": float(np.mean([v["psnr"] for v in vals])),
                     "ssim_mean": float(np.mean([v["ssim"] for v in vals])),
                     "token_agreement_per_scale_mean": np.mean(
                         [v["token_agreement_per_scale"] + [np.nan] * (
                             n - len(v["token_agreement_per_scale"])) for v in vals],
                         axis=0).tolist()}
  ncol = 1 + len(names)
  out.png("fidelity.png", outputs.make_grid(np.stack([im for r in rows for im in r]), ncol=ncol))
  out.json("fidelity.json", {
      "model": fam.source, "random_weights": _CHECKPOINT.value is None, "family": fam.kind,
      "schedule": [list(hw) for hw in sch.scales], "settings": dataclasses.asdict(fam.settings),
      "columns": ["dense"] + names,
      "variants": {name: {"plan": loops[name].plan.describe(),
                          "loop": dataclasses.asdict(loops[name].options)} for name in names},
      "summary": summary, "items": records, "files": out.files + ["fidelity.json"]})
  print(json.dumps(summary, indent=1), file=sys.stderr)
  print(f"wrote fidelity.png and fidelity.json to {out.path}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
