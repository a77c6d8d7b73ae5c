r"""Generate many images: one PNG per item, a manifest, resumable, on every local device.

VAR, 50 images per ImageNet class for FID (50,000 PNGs, manifest.jsonl, fid_samples.npz):

  python -m sparvar_jax.generate_many --checkpoint ckpt/var_d16 --classes 0-999 \
      --per_class 50 --cfg 1.5 --top_k 900 --top_p 0.96 --batch 64 --out fid50k/

Infinity, a prompt a line, or JSONL items with their own settings:

  python -m sparvar_jax.generate_many --checkpoint ckpt/infinity_2b --t5 ckpt/flan-t5-xl \
      --input prompts.txt --pn 1M --out many/
  python -m sparvar_jax.generate_many --checkpoint ckpt/infinity_2b --t5 ckpt/flan-t5-xl \
      --input items.jsonl --out many/

Without --checkpoint the random demo models run (`--demo var` or the default Infinity), as
in `python -m sparvar_jax.sample`, whose model, sampling, numerics and attention flags this
CLI shares (--cfg, --top_k, --attention sparvar, --sparvar_*, --dtype, ...).

Items. --input: a UTF-8 text file (Infinity: a prompt a line; VAR: a class id a line) or
JSONL (`*.jsonl`, or --input_format jsonl), one JSON object a line:
  Infinity: {"prompt": "a red fox", "seed": 7, "aspect": "16:9", "pn": "0.25M", "cfg": 3,
             "tau": [1, 1, ...], "top_k": 900, "top_p": 0.97, "attention": "sparvar",
             "negative_prompt": "blurry"}
  VAR:      {"label": 207, "seed": 7, "cfg": 1.5, "top_k": 900, "top_p": 0.96,
             "more_smooth": false, "attention": "dense"}
Only prompt / label is required; the rest default to the flags. --classes A-B,C with
--per_class N: N images of each class, class by class. Blank lines are skipped; a bad
line (malformed JSON, empty prompt, unknown key, unknown aspect or pn, a value out of
range) is reported with its line number and skipped, the run goes on and summary.json
lists it.

Item i is the i-th non-blank line (a bad line keeps its number) or the i-th image of
--classes; its PNG is `{i:06d}.png`. It draws from fold_in(key(--seed), i); an item with its
own "seed" s draws from fold_in(key(s), 0), the key `sample --seed s` gives its first
image (scale k: fold_in(key, k)). An image depends on its item only: not on --batch, the
device count, the process count or the other items (Infinity pads each prompt's text to a
power of two >= 16 of its own length).

Outputs in --out: the PNGs (written to a temporary name, then renamed), manifest.jsonl (a
line per image, appended as it is written: item, line, file, prompt or label, seed, key,
settings, attention, seconds, time), summary.json (counts, bad lines, timing) and, for
VAR, fid_samples.npz (uint8 [N, H, W, 3] under `arr_0`, the official evaluator's input),
built from the PNGs once every item is done (--nofid_npz: not).

Resume: the same command again skips every item whose manifest line is there and whose
PNG decodes. Other settings for an item already made are refused, saying what changed,
unless --allow_changed_settings (those items are made again). --batch, the device count
and the process count may change between runs.

Devices: data parallel over every local device (--batch is rounded up to a multiple of
their count; every call has the full batch). The same rows per device give the same bits
whatever the device count; another per-device batch can round the floats differently
(XLA picks other kernels), not the keys. --model_parallel N (Infinity) splits the weights
over groups of N devices: attention heads and FFN units.

Processes: with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or
--coordinator_address, --num_processes, --process_id) jax.distributed starts; process p
makes the items i with i % N == p, appends to manifest.p{p}-of-{N}.jsonl, and once all
have finished process 0 merges the shards into manifest.jsonl. Without a coordinator,
--num_processes / --process_id still split the items (independent jobs, e.g. an array
job), and `--merge` with the same arguments merges after they all finished. A process
that died resumes its slice when run again with the same arguments.

Throughput without weights: --random_model var_d16 (..., infinity_8b) builds a released
model's size with random weights; scripts/bench_many.py runs it on one GPU and on all.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

from absl import app
from absl import flags

from sparvar_jax import cli_flags, manifest, outputs, runner
from sparvar_jax.items import Item, ItemError, class_items, file_items, number_list
from sparvar_jax.runner import RunArgs, UsageError

flags.adopt_module_key_flags(cli_flags)  # --help lists the shared flags with these

_OUT = flags.DEFINE_string("out", "many", "Output folder; a folder of an earlier run with "
                           "the same arguments is resumed.")
_INPUT = flags.DEFINE_string("input", None, "Items: a UTF-8 text file (Infinity: a prompt "
                             "a line; VAR: a class id a line) or JSONL, one object a line "
                             "(see the module docstring).")
_INPUT_FORMAT = flags.DEFINE_enum("input_format", "auto", ["auto", "text", "jsonl"],
                                  "How to read --input; auto: JSONL for a *.jsonl name.")
_CLASSES = flags.DEFINE_string("classes", None, "VAR only. Class ids and ranges, e.g. "
                               "0-999 or 1,5,10-19; each gets --per_class images.")
_PER_CLASS = flags.DEFINE_integer("per_class", None, "VAR only. Images per class of "
                                  "--classes (default 1).")
_BATCH = flags.DEFINE_integer("batch", None, "Images per generator call over all local "
                              "devices, rounded up to a multiple of the data-parallel device "
                              "count. Default: 8 per device (VAR), 1 per device (Infinity).")
_ALLOW_CHANGED = flags.DEFINE_bool("allow_changed_settings", False, "Resume even where "
                                   "items were made with other settings: make those again.")
_FID_NPZ = flags.DEFINE_bool("fid_npz", True, "VAR: write fid_samples.npz (arr_0: uint8 "
                             "[N, H, W, 3]) from the PNGs once every item is done.")
_MODEL_PARALLEL = flags.DEFINE_integer("model_parallel", 1, "Infinity: split the weights "
                                       "(attention heads, FFN units) over this many devices; "
                                       "the local devices form groups of it, data parallel "
                                       "across groups.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                   "for jax.distributed (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes sharing the items "
                                      "(default $JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, "
                                   "--num_processes) (default $JAX_PROCESS_ID, else 0).")
_MERGE = flags.DEFINE_bool("merge", False, "Generate nothing: merge the manifest shards of "
                           "finished processes into manifest.jsonl (and build the .npz).")
_RANDOM_MODEL = flags.DEFINE_enum("random_model", None, ["var_d16", "var_d20", "var_d24",
                                                          "var_d30", "infinity_2b",
                                                          "infinity_8b"],
                                  "Instead of --checkpoint / --demo: a released model's size "
                                  "with RANDOM weights (Infinity: random text features), to "
                                  "measure throughput without the weights "
                                  "(scripts/bench_many.py).")

_VAR_ONLY = ("classes", "per_class") + cli_flags.VAR_ONLY
_INFINITY_KEYS = frozenset({"prompt", "seed", "aspect", "pn", "cfg", "tau", "top_k", "top_p",
                            "attention", "negative_prompt"})
_VAR_KEYS = frozenset({"label", "seed", "cfg", "top_k", "top_p", "more_smooth", "attention"})

_log = logging.getLogger("sparvar_jax.generate_many")

KEY_DERIVATION = ("item i draws from key_i = jax.random.fold_in(jax.random.key(s), i) "
                  "(threefry) with s = --seed, or from fold_in(key(s), 0) when the item "
                  "gives its own seed s; scale k draws from fold_in(key_i, k). The manifest "
                  "records each item's (s, i).")


@dataclasses.dataclass
class Job:
  """A resolved item: what to generate, the group it batches with, and `settings`, every
  value its image depends on (compared on resume)."""
  item: Item
  file: str
  group: tuple
  settings: dict[str, Any]
  seed: int
  key_index: int
  payload: Any  # VAR: the label; Infinity: the prompt
  image_hw: tuple[int, int]
  truncated: bool = False  # Infinity: the prompt has more than 512 T5 tokens

  @property
  def index(self) -> int:
    return self.item.index

  def record(self, seconds: float, run: dict[str, Any]) -> dict[str, Any]:
    """The manifest line; `run`: where it was made (process, rows per device, model
    parallelism: they can move float rounding, not the item's key or settings)."""
    key = "label" if isinstance(self.payload, int) else "prompt"
    return {"item": self.index, "line": self.item.line, "file": self.file, key: self.payload,
            "seed": self.seed, "key": f"fold_in(key({self.seed}), {self.key_index})",
            "attention": self.settings["attention"], "settings": self.settings,
            "image_hw": list(self.image_hw), **run, "seconds": round(seconds, 4),
            "t": time.time(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------- items


def read_items(kind: str, num_classes: int) -> tuple[list[Item], list[dict[str, Any]]]:
  """(items, bad lines) from --input or --classes."""
  if _CLASSES.value is not None and _INPUT.value is not None:
    raise UsageError("give either --input or --classes, not both")
  if _PER_CLASS.present and _CLASSES.value is None:
    raise UsageError("--per_class needs --classes (e.g. --classes 0-999 --per_class 50)")
  if _CLASSES.value is not None:
    per = 1 if _PER_CLASS.value is None else _PER_CLASS.value
    return class_items(_CLASSES.value, per, num_classes), []
  if _INPUT.value is None:
    what = ("--classes 0-999 --per_class 50, or --input FILE (a class id a line, or JSONL)"
            if kind == "var" else "--input FILE (a prompt a line, or JSONL)")
    raise UsageError(f"nothing to generate: give {what}.")
  return file_items(_INPUT.value, _INPUT_FORMAT.value, kind)


def _common_overrides(args: RunArgs, f: dict[str, Any]) -> tuple[RunArgs, int, int]:
  """The item's RunArgs (cfg, top_k, top_p, attention from its fields) and its key."""
  top_k, top_p = f.get("top_k", args.top_k), f.get("top_p", args.top_p)
  if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
    raise ItemError(f"top_k must be an integer >= 0 (0 turns it off), got {json.dumps(top_k)}")
  if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                            or not 0.0 <= top_p <= 1.0):
    raise ItemError(f"top_p must be a number in [0, 1], got {json.dumps(top_p)}")
  attention = f.get("attention", args.attention)
  if attention not in ("dense", "sparvar"):
    raise ItemError(f"attention must be \"dense\" or \"sparvar\", got {json.dumps(attention)}")
  cfg = number_list("cfg", f["cfg"]) if "cfg" in f else args.cfg
  item_args = dataclasses.replace(
      args, cfg=cfg, top_k=top_k, top_p=None if top_p is None else float(top_p),
      attention=attention, sparvar=args.sparvar if attention == "sparvar" else None)
  if "seed" in f:
    seed = f["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
      raise ItemError(f"seed must be an integer in [0, 2**32), got {json.dumps(seed)}")
    return item_args, seed, 0
  return item_args, args.seed, -1


def _check_plan(item_args: RunArgs, schedule, depth: int) -> None:
  from sparvar_jax import runner  # pylint: disable=g-import-not-at-top
  try:
    runner.check_plan(item_args, schedule, depth)
  except UsageError as e:
    raise ItemError(str(e)) from None


def _sparvar_dict(item_args: RunArgs):
  if item_args.attention != "sparvar":
    return None
  return {**dataclasses.asdict(item_args.sparvar), "kernels": item_args.kernels}


# ---------------------------------------------------------------------------- families


class _Family:
  """What differs between VAR and Infinity: item fields, settings, models, one batch."""
  kind: str
  keys: frozenset
  per_device_batch: int
  fid: bool

  def __init__(self, args: RunArgs, cfgs: dict | None, model_parallel: int = 1):
    self.args, self.cfgs, self.model_parallel = args, cfgs, model_parallel
    self.random_model = _RANDOM_MODEL.value
    self.model_id = (os.path.abspath(args.checkpoint) if args.checkpoint else
                     f"{self.random_model or 'demo ' + self.kind} (random weights from --seed "
                     f"{args.seed})")
    self.loops: dict[tuple, Any] = {}
    self.numerics: dict[str, str] = {}

  def base(self, item_args: RunArgs) -> dict[str, Any]:
    return {"model": self.model_id, **self.numerics, "attention": item_args.attention,
            "sparvar": _sparvar_dict(item_args),
            "loop": dataclasses.asdict(item_args.loop)}

  def resolve(self, item: Item, width: int) -> Job:
    unknown = sorted(set(item.fields) - self.keys)
    if unknown:
      raise ItemError(f"unknown key{'s' if len(unknown) > 1 else ''} {unknown}; known: "
                      f"{sorted(self.keys)}")
    job = self._resolve(item, f"{item.index:0{width}d}.png")
    job.settings = json.loads(json.dumps(job.settings))  # as a manifest line reads back
    return job

  def _resolve(self, item: Item, file: str) -> Job:
    raise NotImplementedError


class VARFamily(_Family):
  kind, keys, per_device_batch, fid = "var", _VAR_KEYS, 8, True

  def __init__(self, args, cfgs, model_parallel=1):
    from sparvar_jax import configs, schedules  # pylint: disable=g-import-not-at-top
    super().__init__(args, cfgs, model_parallel)
    self.cfg = configs.VAR_DEMO if cfgs is None else cfgs["var"]
    self.schedule = schedules.square_schedule(self.cfg.patch_nums)
    self.num_classes = self.cfg.num_classes
    side = self.cfg.patch_nums[-1] * 16
    self.image_hw = (side, side)

  def check_defaults(self) -> None:
    """The flags' own settings, refused as the sample CLI refuses them."""
    from sparvar_jax import runner, sample_var  # pylint: disable=g-import-not-at-top
    sample_var.sampling_settings(self.args, cli_flags.MORE_SMOOTH.value, self.cfg,
                                 self.cfgs is not None)
    runner.check_plan(self.args, self.schedule, self.cfg.depth)

  def _resolve(self, item, file):
    from sparvar_jax import sample_var  # pylint: disable=g-import-not-at-top
    f = item.fields
    label = f.get("label")
    if not isinstance(label, int) or isinstance(label, bool):
      raise ItemError(f"\"label\" (a class id) is required, got {json.dumps(label)}")
    if not 0 <= label < self.num_classes:
      raise ItemError(f"class ids must be in [0, {self.num_classes}), got {label}")
    smooth = f.get("more_smooth", cli_flags.MORE_SMOOTH.value)
    if not isinstance(smooth, bool):
      raise ItemError(f"more_smooth must be true or false, got {json.dumps(smooth)}")
    item_args, seed, key_index = _common_overrides(self.args, f)
    settings = sample_var.sampling_settings(item_args, smooth, self.cfg, self.cfgs is not None,
                                            err=ItemError)
    _check_plan(item_args, self.schedule, self.cfg.depth)
    key_index = item.index if key_index < 0 else key_index
    det = {**self.base(item_args), "label": label, "key": [seed, key_index],
           **dataclasses.asdict(settings)}
    return Job(item, file, ("var", settings, item_args.attention), det, seed, key_index, label,
               self.image_hw)

  def load(self, jax, dtype, attn_impl: str, mesh, model_parallel: int):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparvar_jax import sample_var, sharding  # pylint: disable=g-import-not-at-top
    del model_parallel  # refused for VAR before this point
    self.dtype = dtype
    if self.random_model:
      from sparvar_jax.models.var import VAR  # pylint: disable=g-import-not-at-top
      from sparvar_jax.vae.var_vqvae import VQVAE  # pylint: disable=g-import-not-at-top
      rngs = nnx.Rngs(self.args.seed)
      self.var = VAR(self.cfg, rngs=rngs, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl)
      self.vae = VQVAE(self.cfgs["vae"], rngs=rngs)
      source = f"{self.random_model} with RANDOM weights (throughput only)"
    else:
      self.var, self.vae, source = sample_var.load_models(self.args.checkpoint,
                                                          self.args.seed, dtype, attn_impl)
    if mesh is not None:  # one replicated copy shared by every group's loop
      for m in (self.var, self.vae):
        nnx.update(m, sharding.place_params(nnx.state(m), mesh))
    return source

  def loop(self, group: tuple, batch: int, mesh):
    from sparvar_jax import runner  # pylint: disable=g-import-not-at-top
    from sparvar_jax.families.var import VARAdapter  # pylint: disable=g-import-not-at-top
    from sparvar_jax.generate import ScaleLoop  # pylint: disable=g-import-not-at-top
    if (group, batch) not in self.loops:
      _, settings, attention = group
      args = dataclasses.replace(self.args, attention=attention,
                                 sparvar=self.args.sparvar if attention == "sparvar" else None)
      plan, options = runner.build_plan(args, self.schedule, self.cfg.depth)
      self.loops[group, batch] = ScaleLoop(VARAdapter(self.var, self.vae, settings,
                                                      cache_dtype=self.dtype),
                                           batch, plan, options, mesh=mesh)
    return self.loops[group, batch]

  def generate(self, loop, jobs: list[Job], keys):
    return loop([j.payload for j in jobs], keys=keys).image_BHW3


class InfinityFamily(_Family):
  kind, keys, per_device_batch, fid = "infinity", _INFINITY_KEYS, 1, False

  def __init__(self, args, cfgs, model_parallel=1):
    from sparvar_jax import configs  # pylint: disable=g-import-not-at-top
    super().__init__(args, cfgs, model_parallel)
    self.icfg = configs.INFINITY_DEMO if cfgs is None else cfgs["infinity"]
    self.t5 = cli_flags.T5.value
    self.tok = self.t5_cfg = self.encoder = None
    self.neg_features: dict[str, Any] = {}

  def check_defaults(self) -> None:
    from sparvar_jax import runner, sample_infinity  # pylint: disable=g-import-not-at-top
    err, ckpt = UsageError, self.args.checkpoint
    if ckpt is None and self.t5 is not None:
      raise err("--t5 needs --checkpoint: the default demo model has random weights and uses "
                "random text features instead of T5. Pass --checkpoint with a directory "
                "converted by `python -m convert.infinity` to use a T5.")
    if ckpt is not None and self.t5 is None:
      raise err(f"{ckpt!r} is an Infinity (text-to-image) checkpoint, which needs a T5 text "
                "encoder: pass --t5 DIR, a directory converted with `python -m convert.t5 "
                "--hf_dir flan-t5-xl --out DIR`.")
    neg = cli_flags.NEGATIVE.value
    if neg is not None and not neg.strip():
      raise err("--negative_prompt is empty; drop it to use the model's learned "
                "unconditional text.")
    schedule, _, _, _, pn = sample_infinity.resolve_schedule(err, cli_flags.ASPECT.value,
                                                             cli_flags.PN.value)
    sample_infinity.sampling_settings(err, self.args, cli_flags.TAU.value, schedule.num_scales,
                                      pn)
    runner.check_plan(self.args, schedule, self.icfg.depth)
    self.t5_cfg, self.tok = sample_infinity.open_t5(err, self.t5, self.icfg, ckpt)
    mp, icfg = self.model_parallel, self.icfg
    if mp > 1 and (icfg.num_heads % mp or icfg.mlp_hidden % mp):
      raise err(f"--model_parallel {mp} must divide the model's {icfg.num_heads} attention "
                f"heads and {icfg.mlp_hidden} FFN units")

  def _tokens(self, prompt: str) -> int:
    """Text tokens of a prompt (T5 with </s>, or the demo's word count + 1), before the
    512 limit."""
    if self.tok is None:
      return len(prompt.split()) + 1
    return len(self.tok.encode(prompt))

  def _resolve(self, item, file):
    from sparvar_jax import sample_infinity, text  # pylint: disable=g-import-not-at-top
    f = item.fields
    prompt = f.get("prompt")
    if "prompt" not in f:
      raise ItemError("\"prompt\" is required")
    if not isinstance(prompt, str):
      raise ItemError(f"\"prompt\" must be a string, got {manifest.short(prompt)}")
    if not prompt.strip():
      raise ItemError("empty prompt")
    neg = f.get("negative_prompt", cli_flags.NEGATIVE.value)
    if neg is not None and (not isinstance(neg, str) or not neg.strip()):
      raise ItemError(f"negative_prompt must be a non-empty string, got {json.dumps(neg)}")
    aspect, pn = f.get("aspect", cli_flags.ASPECT.value), f.get("pn", cli_flags.PN.value)
    if aspect is not None and (not isinstance(aspect, (str, int, float)) or
                               isinstance(aspect, bool)):
      raise ItemError(f"aspect must be a string such as \"16:9\" or a number, got "
                      f"{json.dumps(aspect)}")
    if pn is not None and not isinstance(pn, str):
      raise ItemError(f"pn must be one of \"0.06M\", \"0.25M\", \"0.60M\", \"1M\", got "
                      f"{json.dumps(pn)}")
    schedule, _, is_template, aspect, pn = sample_infinity.resolve_schedule(
        ItemError, None if aspect is None else str(aspect), pn)
    item_args, seed, key_index = _common_overrides(self.args, f)
    tau = number_list("tau", f["tau"]) if "tau" in f else cli_flags.TAU.value
    settings, cfgs_ps, taus_ps = sample_infinity.sampling_settings(
        ItemError, item_args, tau, schedule.num_scales, pn)
    _check_plan(item_args, schedule, self.icfg.depth)
    n_tok = min(self._tokens(prompt), text.MAX_LEN)
    n_neg = 0 if neg is None else min(self._tokens(neg), text.MAX_LEN)
    t5_len, text_len = text.bucket_length(n_tok), text.bucket_length(max(n_tok, n_neg))
    key_index = item.index if key_index < 0 else key_index
    det = {**self.base(item_args), "t5": None if self.t5 is None else os.path.abspath(self.t5),
           "prompt": prompt, "negative_prompt": neg, "key": [seed, key_index],
           "template": schedule.template, "pn": pn, "aspect": aspect,
           "cfg": list(cfgs_ps), "tau": list(taus_ps), "top_k": settings.top_k,
           "top_p": settings.top_p, "text_len": text_len, "t5_len": t5_len}
    group = ("infinity", schedule, cfgs_ps, taus_ps, settings.top_k, settings.top_p,
             item_args.attention, t5_len, text_len, neg)
    det["is_template"] = is_template
    return Job(item, file, group, det, seed, key_index, prompt, schedule.image_hw,
               truncated=self._tokens(prompt) > text.MAX_LEN)

  def load(self, jax, dtype, attn_impl: str, mesh, model_parallel: int):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparvar_jax import sample_infinity, sharding  # pylint: disable=g-import-not-at-top
    self.dtype = dtype
    if self.random_model:
      from sparvar_jax.models.infinity import Infinity  # pylint: disable=g-import-not-at-top
      from sparvar_jax.vae.bsq import BSQVAE  # pylint: disable=g-import-not-at-top
      rngs = nnx.Rngs(self.args.seed)
      self.model = Infinity(self.icfg, rngs=rngs, dtype=dtype, param_dtype=dtype,
                            attn_impl=attn_impl)
      self.vae, self.encoder = BSQVAE(self.cfgs["vae"], rngs=rngs), None
      source = (f"{self.random_model} with RANDOM weights and random text features "
                "(throughput only)")
    else:
      self.model, self.vae, self.encoder, source = sample_infinity.load_models(
          self.args.checkpoint, self.t5, self.cfgs, dtype, attn_impl, self.args.seed,
          t5_cfg=self.t5_cfg, tok=self.tok)
    if mesh is not None:
      state = nnx.state(self.model)
      specs = (sharding.infinity_param_specs(state, model_parallel) if model_parallel > 1
               else None)
      nnx.update(self.model, sharding.place_params(state, mesh, specs))
      nnx.update(self.vae, sharding.place_params(nnx.state(self.vae), mesh))
    return source

  def features(self, texts: list[str]):
    """(feats [B, L, K], lens [B]) of prompts, at the T5 length of their own bucket."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from sparvar_jax import sample_infinity  # pylint: disable=g-import-not-at-top
    if self.encoder is None:
      feats, lens = sample_infinity.demo_features(texts, self.icfg.text_channels)
    else:
      with warnings.catch_warnings():  # truncation is reported per item when planning
        warnings.simplefilter("ignore")
        feats, lens = sample_infinity.encode_texts(self.encoder, self.tok, texts)
    return np.asarray(feats), np.asarray(lens)

  def loop(self, group: tuple, batch: int, mesh):
    from sparvar_jax import runner  # pylint: disable=g-import-not-at-top
    from sparvar_jax.families.infinity import InfinityAdapter, InfinitySampling  # pylint: disable=g-import-not-at-top
    from sparvar_jax.generate import ScaleLoop  # pylint: disable=g-import-not-at-top
    if (group, batch) not in self.loops:
      _, schedule, cfgs_ps, taus_ps, top_k, top_p, attention, _, text_len, _ = group
      args = dataclasses.replace(self.args, attention=attention,
                                 sparvar=self.args.sparvar if attention == "sparvar" else None)
      plan, options = runner.build_plan(args, schedule, self.icfg.depth)
      settings = InfinitySampling(cfg=cfgs_ps, tau=taus_ps, top_k=top_k, top_p=top_p)
      self.loops[group, batch] = ScaleLoop(
          InfinityAdapter(self.model, self.vae, schedule, settings, text_len=text_len,
                          cache_dtype=self.dtype), batch, plan, options, mesh=mesh)
    return self.loops[group, batch]

  def generate(self, loop, jobs: list[Job], keys):
    neg_text = jobs[0].group[-1]
    neg = None
    if neg_text is not None:
      if neg_text not in self.neg_features:
        self.neg_features[neg_text] = self.features([neg_text])
      neg = self.neg_features[neg_text]
    feats, lens = self.features([j.payload for j in jobs])
    return loop(feats, lens, keys=keys, negative=neg).image_BHW3


# ---------------------------------------------------------------------------- manifest


# ---------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Processes:
  index: int
  count: int
  coordinator: str | None

  def owns(self, item_index: int) -> bool:
    return item_index % self.count == self.index


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise UsageError(f"${name} must be an integer, got {v!r}") from None


def processes() -> Processes:
  """This process's place among --num_processes (flags, else the JAX_* variables)."""
  count = _NUM_PROCESSES.value
  if count is None:
    count = _env_int("JAX_NUM_PROCESSES") or 1
  index = _PROCESS_ID.value
  if index is None:
    index = _env_int("JAX_PROCESS_ID") or 0
  if count < 1 or not 0 <= index < count:
    raise UsageError(f"the process id must be in [0, {count}) for {count} processes, got "
                     f"{index} (--process_id / $JAX_PROCESS_ID, --num_processes / "
                     "$JAX_NUM_PROCESSES)")
  coord = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  return Processes(index, count, coord if count > 1 else None)


class _Progress:
  """tqdm on a terminal; otherwise a log line per batch (images/s, ETA)."""

  def __init__(self, total: int, label: str):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()
    self.bar = None
    if sys.stderr.isatty() and total > 0:
      import shutil  # pylint: disable=g-import-not-at-top
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      # A terminal that reports no size (a pseudo-terminal nobody sized) would get no bar.
      size = shutil.get_terminal_size()
      self.bar = tqdm(total=total, unit="img", desc=label, file=sys.stderr, smoothing=0.1,
                      ncols=size.columns, nrows=size.lines)

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
      return
    dt = time.perf_counter() - self.t0
    rate = self.done / dt if dt > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    _log.info("%d/%d images, %.2f images/s (first batch includes compilation), ETA %s",
              self.done, self.total, rate,
              "?" if eta != eta else str(datetime.timedelta(seconds=round(eta))))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _item_keys(jobs: list[Job]):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sparvar_jax.generate import row_keys  # pylint: disable=g-import-not-at-top
  return jnp.concatenate([row_keys(j.seed, [j.key_index]) for j in jobs])


class ImageWriter:
  """Writes each PNG and then its manifest line on a few threads while the next batch
  generates (PNG encoding releases the GIL). At most `max_pending` images wait; `close`
  waits for all of them and raises the first error a write met."""

  def __init__(self, out: str, lines: manifest.ManifestWriter, run_info: dict[str, Any],
               workers: int = 4, max_pending: int = 256):
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.out, self.lines, self.run_info = out, lines, run_info
    self.pool = concurrent.futures.ThreadPoolExecutor(workers)
    self.slots = threading.BoundedSemaphore(max_pending)
    self.lock = threading.Lock()
    self.pending: list[Any] = []
    self.done: set[int] = set()

  def _write(self, job: Job, img, secs: float) -> None:
    try:
      outputs.save_png(os.path.join(self.out, job.file), img)
      with self.lock:
        self.lines.append(job.record(secs, self.run_info))
        self.done.add(job.index)
    finally:
      self.slots.release()

  def submit(self, job: Job, img, secs: float) -> None:
    self.slots.acquire()
    self.pending.append(self.pool.submit(self._write, job, img, secs))
    if len(self.pending) > 1024:  # surface errors early; keep the list short
      for f in [f for f in self.pending if f.done()]:
        f.result()
      self.pending = [f for f in self.pending if not f.done()]

  def close(self) -> None:
    try:
      for f in self.pending:
        f.result()
    finally:
      self.pool.shutdown(wait=True)


def generate_jobs(family: _Family, jobs: list[Job], batch: int, mesh, write, progress
                  ) -> list[tuple[int, int, float]]:
  """Generates `jobs` group by group (one schedule and setting per batch), `batch` images a
  call, and calls write(job, uint8 image, seconds) per image. Every call has the full
  batch (a group's last one padded with copies of its last item, which are dropped): the
  rows per device then never change, and with them the float rounding of an image.
  -> per call: (its number within its group, images, seconds including the hand-off)."""
  groups: dict[tuple, list[Job]] = {}
  for j in sorted(jobs, key=lambda j: j.index):
    groups.setdefault(j.group, []).append(j)
  calls = []
  for group, members in groups.items():
    loop = family.loop(group, batch, mesh)
    for k, start in enumerate(range(0, len(members), batch)):
      chunk = members[start:start + batch]
      rows = chunk + [chunk[-1]] * (batch - len(chunk))
      t0 = time.perf_counter()
      images = family.generate(loop, rows, _item_keys(rows))
      secs = (time.perf_counter() - t0) / len(chunk)
      for job, img in zip(chunk, images[:len(chunk)]):
        write(job, outputs.to_uint8(img), secs)
      calls.append((k, len(chunk), time.perf_counter() - t0))
      progress.update(len(chunk))
  return calls


def _png_ok(out: str, job: Job) -> bool:
  img = outputs.read_png(os.path.join(out, job.file))
  return img is not None and img.shape[:2] == tuple(job.image_hw)


def finish(out: str, jobs: list[Job], bad: list[dict], family: _Family, verified: set[int],
           extra: dict[str, Any]) -> dict[str, Any]:
  """Merges the manifest files into manifest.jsonl (`manifest.merge`), builds the FID .npz
  (VAR, once every item is done) and writes summary.json."""
  by_index = {j.index: j for j in jobs}
  chosen, missing = manifest.merge(
      out, [(j.index, j.settings) for j in jobs],
      lambda i, rec: i in verified or _png_ok(out, by_index[i]))
  npz = None
  if family.fid and _FID_NPZ.value and jobs and not missing:
    ordered = sorted(jobs, key=lambda j: j.index)
    npz = manifest.write_fid_npz(out, [j.file for j in ordered], ordered[0].image_hw)
  summary = {"items": len(jobs) + len(bad), "done": len(chosen), "missing": missing[:1000],
             "missing_count": len(missing), "bad_lines": bad, "manifest": manifest.MANIFEST,
             "fid_npz": npz, "key_derivation": KEY_DERIVATION, **extra}
  outputs.save_json(os.path.join(out, manifest.SUMMARY), summary)
  return summary


def _start_distributed(procs: Processes):
  import jax  # pylint: disable=g-import-not-at-top
  if procs.coordinator is None:
    return
  try:  # cross-process barriers on CPU devices need a collectives library
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except
    pass
  jax.distributed.initialize(procs.coordinator, procs.count, procs.index)


def random_model_configs(name: str) -> dict[str, Any]:
  """The configs of a released model (as a converted checkpoint's config.json holds)."""
  from sparvar_jax import configs  # pylint: disable=g-import-not-at-top
  if name.startswith("var_d"):
    return {"var": configs.var_config(int(name[5:])), "vae": configs.VQVAEConfig()}
  return {"infinity_2b": {"infinity": configs.INFINITY_2B, "vae": configs.BSQ_D32REG},
          "infinity_8b": {"infinity": configs.INFINITY_8B,
                          "vae": configs.BSQ_D56_PATCHIFY}}[name]


def _mesh(jax, model_parallel: int):
  from sparvar_jax import sharding  # pylint: disable=g-import-not-at-top
  n = len(jax.local_devices())
  if model_parallel < 1 or n % model_parallel:
    raise UsageError(f"--model_parallel must divide the {n} local devices, got "
                     f"{model_parallel}")
  if n == 1:
    return None
  return sharding.make_mesh(jax.local_devices(), model_parallel)


def _family() -> tuple[_Family, list[Item], list[dict[str, Any]]]:
  """The family (VAR or Infinity) with the run's settings checked, and the items read."""
  cfgs = cli_flags.checkpoint_configs(cli_flags.CHECKPOINT.value)
  if _RANDOM_MODEL.value is not None:
    if cfgs is not None or cli_flags.DEMO.present:
      raise UsageError("--random_model replaces --checkpoint and --demo; give one of them.")
    cfgs = random_model_configs(_RANDOM_MODEL.value)
  kind = cli_flags.DEMO.value if cfgs is None else ("infinity" if "infinity" in cfgs else "var")
  wrong = cli_flags.given(_VAR_ONLY if kind == "infinity" else cli_flags.INFINITY_ONLY)
  if wrong:
    what = ("Infinity (text-to-image)" if kind == "infinity" else
            "VAR (class-conditional ImageNet)")
    source = f"checkpoint {cli_flags.CHECKPOINT.value!r}" if cli_flags.CHECKPOINT.value else \
        "random weights"
    raise UsageError(f"{', '.join(wrong)} do not apply to the {what} model of this run "
                     f"({source}); drop them.")
  mp = _MODEL_PARALLEL.value
  if mp < 1:
    raise UsageError(f"--model_parallel must be >= 1, got {mp}")
  if mp > 1 and kind != "infinity":
    raise UsageError("--model_parallel applies to Infinity; VAR runs data parallel only.")
  num_classes = 0
  if kind == "var":
    from sparvar_jax import configs  # pylint: disable=g-import-not-at-top
    num_classes = (configs.VAR_DEMO if cfgs is None else cfgs["var"]).num_classes
  items, bad = read_items(kind, num_classes)
  sparvar_needed = cli_flags.ATTENTION.value == "sparvar" or any(
      it.fields.get("attention") == "sparvar" for it in items)
  if mp > 1 and sparvar_needed:
    raise UsageError("--model_parallel with SparVAR attention is not supported yet; use "
                     "--attention dense (and no \"attention\": \"sparvar\" items).")
  args = cli_flags.run_args(out=_OUT.value, overwrite=False, batch=_BATCH.value,
                            save_npz=False, sparvar_needed=sparvar_needed)
  family = (VARFamily if kind == "var" else InfinityFamily)(args, cfgs, mp)
  family.check_defaults()
  return family, items, bad


def _jobs(family: _Family, items: list[Item], bad: list[dict], report: bool) -> list[Job]:
  """Resolves every item; the ones that cannot be made join `bad` (printed if `report`)."""
  width = max(6, len(str(max(len(items) + len(bad) - 1, 0))))
  jobs = []
  for item in items:
    try:
      jobs.append(family.resolve(item, width))
    except ItemError as e:
      bad.append({"line": item.line, "item": item.index, "error": str(e)})
  bad.sort(key=lambda b: b["item"])
  if report:
    for b in bad:
      print(f"warning: line {b['line']}: {b['error'].rstrip('.')}; skipped.", file=sys.stderr)
    for j in jobs:
      if j.truncated:
        print(f"warning: line {j.item.line}: the prompt has more than 512 T5 tokens; the rest "
              "is dropped, as the original Infinity pipeline does.", file=sys.stderr)
  if not jobs:
    raise UsageError(f"no item can be made: all {len(bad)} lines of --input are bad (listed "
                     "above).")
  return jobs


def _refuse_changed(out: str, jobs: list[Job], latest: dict[int, dict]) -> list[tuple]:
  """Items whose latest record has other settings: refused unless allowed (every process
  decides alike: they all read the same files)."""
  changed = [(j.index, j.settings, latest[j.index].get("settings") or {}) for j in jobs
             if j.index in latest and latest[j.index].get("settings") != j.settings]
  if changed and not _ALLOW_CHANGED.value:
    raise UsageError(
        f"{out!r} already holds {len(changed)} image{'s' if len(changed) > 1 else ''} made "
        f"with other settings: {manifest.describe_changes(changed)}. To resume, run with the "
        "settings they were made with; to make those items again with these settings, add "
        "--allow_changed_settings; or choose another --out.")
  return changed


def run() -> dict[str, Any]:
  """The CLI body; returns the summary. Raises UsageError and friends on bad input."""
  from sparvar_jax import runner  # pylint: disable=g-import-not-at-top
  procs = processes()
  family, items, bad = _family()
  args, mp = family.args, family.model_parallel
  out = outputs.prepare_dir(args.out)
  # The numerics an image depends on are the device's (auto: bfloat16 on a GPU), so JAX
  # (and jax.distributed, which must come first) starts before the items are resolved.
  if not _MERGE.value:
    _start_distributed(procs)
  jax = runner.setup_jax()
  dtype_name, dtype, attn_impl = runner.resolve_dtype(jax, args.dtype, args.attn_impl)
  family.numerics = {"dtype": dtype_name, "attn_impl": attn_impl}
  jobs = _jobs(family, items, bad, report=procs.index == 0)
  recs = manifest.read_records(out)
  latest = manifest.latest_records(recs)
  changed = _refuse_changed(out, jobs, latest)
  if _MERGE.value:
    summary = finish(out, jobs, bad, family, set(), {"processes": procs.count})
    _print_summary(out, summary, 0)
    return summary

  mine = [j for j in jobs if procs.owns(j.index)]
  mine_idx = {j.index for j in mine}
  own_files = {j.file for j in mine} | ({manifest.MANIFEST, manifest.SUMMARY, manifest.FID_NPZ}
                                       if procs.index == 0 else set())
  manifest.remove_temps(out, None if procs.count == 1 else own_files)
  verified, todo, damaged = set(), [], 0
  for j in mine:
    rec = latest.get(j.index)
    if rec is not None and rec.get("settings") == j.settings:
      if _png_ok(out, j):
        verified.add(j.index)
        continue
      damaged += 1
    todo.append(j)
  remade = sum(1 for i, _, _ in changed if i in mine_idx)
  if verified or damaged or remade:
    print(f"resuming in {out}: {len(verified)} of this process's {len(mine)} images are "
          f"done{f'; {damaged} damaged or missing PNGs are made again' if damaged else ''}"
          f"{f'; {remade} items with changed settings are made again' if remade else ''}.",
          file=sys.stderr)

  # This process's manifest file keeps one record per done item of its slice (cut lines
  # and superseded records go) and whatever else it held; new lines are appended. Its
  # lock is taken first: a second run of the same slice stops before loading anything.
  name = manifest.shard_name(procs.index, procs.count)
  keep = [rec for f, rec in recs if f == name and (
      rec["item"] not in mine_idx or (rec["item"] in verified and rec is latest[rec["item"]]))]
  lines = manifest.ManifestWriter(out, name, keep)
  images = None
  try:
    mesh = _mesh(jax, mp)
    ndev = 1 if mesh is None else int(mesh.shape["batch"])
    per = family.per_device_batch if args.batch is None else -(-args.batch // ndev)
    batch = per * ndev
    if args.batch is not None and batch != args.batch:
      print(f"note: --batch {args.batch} rounded up to {batch}, a multiple of the {ndev} "
            "data-parallel devices.", file=sys.stderr)
    t0 = time.perf_counter()
    source = family.load(jax, dtype, attn_impl, mesh, mp) if todo else "(nothing to load)"
    load_s = time.perf_counter() - t0
    if todo:
      print(f"model: {source}", file=sys.stderr)
      print(f"process {procs.index + 1}/{procs.count}: {len(todo)} images to make on "
            f"{len(jax.local_devices())} device(s) ({jax.local_devices()[0].platform}), "
            f"batch {batch}", file=sys.stderr)
    images = ImageWriter(out, lines, {"process": procs.index, "rows_per_device": per,
                                      "model_parallel": mp})
    progress = _Progress(len(todo), f"process {procs.index}" if procs.count > 1 else "images")
    t0 = time.perf_counter()
    try:
      with runner.sigterm_as_exception():
        calls = generate_jobs(family, todo, batch, mesh, images.submit, progress)
    finally:
      progress.close()
  finally:
    try:
      if images is not None:
        images.close()  # every image handed over is written, with its line
    finally:
      lines.close()
  verified |= images.done
  gen_s = time.perf_counter() - t0
  # Throughput after each group's first call (which compiles): what a long run sustains.
  later = [(n, secs) for k, n, secs in calls if k > 0]
  steady = sum(n for n, _ in later) / sum(s for _, s in later) if later else None
  made = len(images.done)
  this = {"index": procs.index, "made": made, "already_done": len(mine) - len(todo),
          "remade_damaged": damaged, "load_seconds": load_s, "generate_seconds": gen_s,
          "images_per_second": made / gen_s if gen_s > 0 else None,
          "steady_images_per_second": steady, "calls": len(calls),
          "groups": sum(1 for k, *_ in calls if k == 0)}
  if procs.count > 1:
    if procs.coordinator is None:
      npz = f" and {manifest.FID_NPZ}" if family.fid and _FID_NPZ.value else ""
      print(f"process {procs.index}: its {len(mine)} items are done. Once every process has "
            f"finished, run the same command with --merge to write manifest.jsonl{npz}.",
            file=sys.stderr)
      return {"this_process": this}
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("sparvar_generate_many_done")
    if procs.index != 0:
      print(f"process {procs.index}: done; process 0 merges the manifest.", file=sys.stderr)
      return {"this_process": this}
  summary = finish(out, jobs, bad, family, verified, {
      "processes": procs.count, "devices": [str(d) for d in jax.local_devices()],
      "batch": batch, "model_parallel": mp, "this_process": this})
  _print_summary(out, summary, made)
  return summary


def _print_summary(out: str, summary: dict, made: int) -> None:
  bad = summary["bad_lines"]
  lines = [f"{summary['done']} of {summary['items']} items done ({made} made now)"]
  if bad:
    lines.append(f"{len(bad)} bad line{'s' if len(bad) > 1 else ''} skipped: " + "; ".join(
        f"line {b['line']} ({b['error']})" for b in bad[:10]) +
        (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
  if summary["missing_count"]:
    lines.append(f"{summary['missing_count']} items not made yet (items "
                 f"{manifest.ranges(summary['missing'])}): run the same command again")
  files = [manifest.MANIFEST] + ([summary["fid_npz"]] if summary["fid_npz"] else []) + \
      [manifest.SUMMARY]
  lines.append(f"wrote {', '.join(files)} to {out}")
  print("\n".join(lines), file=sys.stderr)


def main(argv):
  _log.setLevel(logging.INFO)  # progress lines; libraries stay at --verbosity
  runner.cli_main(argv, run, on_stop="every image written so far is complete and in the "
                  "manifest; run the same command again to resume.",
                  memory_hint=f"Use a smaller --batch (now {_BATCH.value or 'default'}), --dtype "
                  "bfloat16 on a GPU, or --model_parallel for Infinity.")


if __name__ == "__main__":
  app.run(main)
