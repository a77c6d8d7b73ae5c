"""Infinity text-to-image mode of `python -m sparvar_jax.sample` (the flags live in sample.py).

Order of work: every flag, the prompts, the schedule, the sampling settings, the attention
plan and the T5 directory are checked before the output folder is touched or a model is
built, so bad input costs a second and leaves --out empty. Then: T5 + Infinity + VAE load,
prompts encoded once (over-long ones truncated to 512 tokens with a warning), one compiled
generator for all prompts (the text length is bucketed over all of them), prompts run in
chunks of --batch (the last chunk padded with copies, which are dropped). Prompt i draws
from fold_in(key(--seed), i), whatever chunk it runs in.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import unicodedata
import warnings
import zlib

import numpy as np

from sparvar_jax import runner, schedules
from sparvar_jax.runner import RunArgs, UsageError

_TEMPLATE_TOL = 1e-3  # templates are h/w truncated to 3 decimals (2:3 -> 0.666)
# Prompts per T5 call: the encoder's attention tensors are [B, heads, L, L], so a prompts
# file of thousands of long prompts in one call would not fit in accelerator memory.
T5_CHUNK = 32


DEMO_PROMPT = "a photo of a cat sitting on a sunny windowsill"


def demo_features(texts, channels: int):
  """The demo's stand-in for T5: per prompt, one random feature row per word (+1, like
  `</s>`), seeded from the prompt's text, so equal prompts give equal features."""
  rows = []
  for t in texts:
    n = min(len(t.split()) + 1, 512)
    rng = np.random.default_rng(zlib.crc32(t.encode("utf-8")))
    rows.append(rng.standard_normal((n, channels)).astype(np.float32))
  lens = np.array([len(r) for r in rows], np.int32)
  feats = np.zeros((len(rows), int(lens.max()), channels), np.float32)
  for i, r in enumerate(rows):
    feats[i, :len(r)] = r
  return feats, lens


@dataclasses.dataclass(frozen=True)
class InfinityArgs:
  t5: str | None
  prompts: tuple[str, ...]
  prompts_file: str | None
  negative: str | None
  aspect: str | None
  pn: str | None
  tau: str | None


def _read_prompts(err, iargs: InfinityArgs, default: str | None = None) -> list[str]:
  prompts = []
  for p in iargs.prompts:
    if not p.strip():
      raise err("--prompt is empty; give the text to draw, e.g. --prompt \"a red fox\".")
    prompts.append(p)
  path = iargs.prompts_file
  if path is not None:
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except FileNotFoundError:
      raise err(f"--prompts_file {path!r} does not exist; give a UTF-8 text file with one "
                "prompt per line.") from None
    except OSError as e:
      raise err(f"cannot read --prompts_file {path!r}: {e.strerror or e}. Give a readable "
                "UTF-8 text file with one prompt per line.") from None
    try:
      text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      raise err(f"--prompts_file {path!r} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} "
                f"at offset {e.start}); save it as UTF-8, one prompt per line.") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
      raise err(f"--prompts_file {path!r} holds no prompts (it is empty or only blank "
                "lines); write one prompt per line.")
    prompts.extend(lines)
  if not prompts and default is not None:
    prompts = [default]
  if not prompts:
    raise err("no prompt given: an Infinity checkpoint draws from text. Pass --prompt \"...\" "
              "(repeat it for several) and/or --prompts_file FILE (one prompt per line).")
  return prompts


def _per_scale(err, name: str, text: str | None, default: float, n: int, pn: str):
  """One number or a comma list of exactly n numbers -> float or list of floats."""
  if text is None:
    return default
  parts = [t.strip() for t in str(text).split(",")]
  try:
    vals = [float(t) for t in parts]
  except ValueError:
    raise err(f"--{name} must be a number or a comma-separated list of numbers (one per "
              f"scale), got {text!r}") from None
  if len(vals) not in (1, n):
    raise err(f"--{name} gives {len(vals)} values but the {pn} schedule has {n} scales: give "
              f"one number or exactly {n}, comma-separated.")
  if not all(math.isfinite(v) for v in vals):
    raise err(f"--{name} values must be finite numbers, got {text!r}")
  if name == "cfg" and any(v < 0 for v in vals):
    raise err(f"--cfg must be >= 0 (1 turns guidance off), got {text!r}")
  return vals[0] if len(vals) == 1 else vals


def encode_texts(encoder, tok, texts, chunk: int = T5_CHUNK):
  """T5 features of any number of prompts, at most `chunk` per encoder call:
  (feats [N, L, K] fp32 numpy, lens [N] int32). All calls share one padded length L
  (and one batch size: the last chunk is padded with copies), so one shape compiles.
  Over-long prompts warn once each (PromptTruncatedWarning naming the prompt's index)."""
  from sparvar_jax import text  # pylint: disable=g-import-not-at-top
  ids = [tok.truncate(tok.encode(p), i) for i, p in enumerate(texts)]  # tokenized once
  lens = np.array([len(r) for r in ids], np.int32)
  length = text.bucket_length(int(lens.max()), tok.max_len)
  parts = []
  for start in range(0, len(texts), chunk):
    rows = ids[start:start + chunk]
    n = len(rows)
    if len(texts) > chunk:
      rows += [rows[-1]] * (chunk - n)
    parts.append(np.asarray(text.encode_token_rows(encoder, rows, length), np.float32)[:n])
  return np.concatenate(parts), lens


def _width_error(err, t5_dir, width, want, ckpt):
  return err(f"the T5 in {t5_dir!r} gives {width}-wide text features but the Infinity "
             f"checkpoint {ckpt!r} expects text_channels={want}. Infinity "
             "2B/8B use flan-t5-xl (d_model 2048): convert that one with `python -m "
             "convert.t5 --hf_dir flan-t5-xl --out DIR` and pass it as --t5.")


def resolve_schedule(err, aspect: str | None, pn: str | None):
  """(schedule, requested h/w, whether it is a template, aspect, pn) for --aspect / --pn
  (None: 1:1 and 1M); `err` on an unknown pn or an unreadable aspect."""
  pn = pn or "1M"
  if pn not in schedules.PN_VALUES:
    raise err(f"unknown --pn {pn!r}; choose one of {', '.join(schedules.PN_VALUES)} (pixel "
              "budget: 1M is 1024x1024 at 1:1).")
  aspect = aspect or "1:1"
  try:
    h_div_w = schedules.parse_aspect(aspect)
  except ValueError as e:
    raise err(f"--aspect: {e}") from None
  schedule = schedules.get_schedule(h_div_w, pn)
  return schedule, h_div_w, abs(schedule.template - h_div_w) <= _TEMPLATE_TOL, aspect, pn


def sampling_settings(err, args: RunArgs, tau: str | None, n: int, pn: str):
  """(InfinitySampling, cfg per scale, tau per scale) from the run's cfg / top_k / top_p
  and tau (None: Infinity's defaults) for a schedule of n scales; `err` on bad values."""
  from sparvar_jax.families.infinity import InfinitySampling  # pylint: disable=g-import-not-at-top
  d = InfinitySampling()  # Infinity's defaults: cfg 3, tau 1, top-k 900, top-p 0.97
  settings = InfinitySampling(
      cfg=_per_scale(err, "cfg", args.cfg, d.cfg, n, pn),
      tau=_per_scale(err, "tau", tau, d.tau, n, pn),
      top_k=d.top_k if args.top_k is None else args.top_k,
      top_p=d.top_p if args.top_p is None else args.top_p)
  try:
    cfgs_ps, taus_ps = settings.per_scale(n)
  except ValueError as e:
    raise err(str(e)) from None
  return settings, cfgs_ps, taus_ps


def open_t5(err, t5_dir: str | None, icfg, ckpt: str | None):
  """(T5 config, tokenizer) of a converted T5 directory, its width checked against the
  Infinity config (T5LoadError: one paragraph); (None, None) for the demo (t5_dir None)."""
  from sparvar_jax import text  # pylint: disable=g-import-not-at-top
  if t5_dir is None:
    return None, None
  t5_cfg = text.read_t5_config(t5_dir)
  tok = text.T5Tokenizer.from_dir(t5_dir)
  if t5_cfg.d_model != icfg.text_channels:
    raise _width_error(err, t5_dir, t5_cfg.d_model, icfg.text_channels, ckpt)
  return t5_cfg, tok


def slug(prompt: str, n: int = 40) -> str:
  s = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
  s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:n].rstrip("-")
  return s or "prompt"


def load_models(ckpt: str | None, t5_dir: str | None, cfgs: dict | None, dtype, attn_impl: str,
                seed: int, *, t5_cfg=None, tok=None):
  """(Infinity, BSQ VAE, T5 encoder or None, description): a converted checkpoint and T5,
  or without ckpt the random tiny demo model (no T5: `text_features` makes random ones)."""
  from sparvar_jax import configs, text  # pylint: disable=g-import-not-at-top
  if ckpt is None:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparvar_jax.models.infinity import Infinity  # pylint: disable=g-import-not-at-top
    from sparvar_jax.vae.bsq import BSQVAE  # pylint: disable=g-import-not-at-top
    icfg = configs.INFINITY_DEMO
    rngs = nnx.Rngs(seed)
    model = Infinity(icfg, rngs=rngs, dtype=dtype, attn_impl=attn_impl)
    vae = BSQVAE(configs.BSQ_DEMO, rngs=rngs)
    return model, vae, None, (
        f"embedded default: tiny Infinity (depth {icfg.depth}, width {icfg.embed_dim}) and BSQ "
        "VAE with RANDOM weights; random text features instead of T5")
  from sparvar_jax.models.infinity import load_infinity  # pylint: disable=g-import-not-at-top
  encoder, _ = text.load_t5(t5_dir, dtype, cfg=t5_cfg, tokenizer=tok)
  model, vae, _ = load_infinity(ckpt, dtype, attn_impl=attn_impl, cfgs=cfgs)
  icfg = model.cfg
  return model, vae, encoder, (
      f"Infinity checkpoint {os.path.abspath(ckpt)} (depth {icfg.depth}, width "
      f"{icfg.embed_dim}); T5 {os.path.abspath(t5_dir)}")


def text_features(encoder, tok, icfg, texts, what: str = "prompts", trunc_msgs=None):
  """T5 features (or the demo's random ones without an encoder) -> (feats, lens); warnings
  about truncated prompts go to stderr and to `trunc_msgs`."""
  from sparvar_jax import text  # pylint: disable=g-import-not-at-top
  if encoder is None:
    return demo_features(texts, icfg.text_channels)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", text.PromptTruncatedWarning)
    enc = encode_texts(encoder, tok, texts)
  for w in caught:
    msg = f"{what}: {w.message}"
    if issubclass(w.category, text.PromptTruncatedWarning) and trunc_msgs is not None:
      trunc_msgs.append(msg)
    print(f"warning: {msg}", file=sys.stderr)
  return enc


def run(args: RunArgs, iargs: InfinityArgs, cfgs: dict | None) -> dict:
  """Infinity mode; raises UsageError (and the loaders' errors) on bad input."""
  from sparvar_jax import configs, outputs, text  # pylint: disable=g-import-not-at-top

  err = UsageError
  ckpt = args.checkpoint
  demo = ckpt is None  # the embedded default: random tiny Infinity, no T5
  icfg = configs.INFINITY_DEMO if demo else cfgs["infinity"]
  if demo and iargs.t5 is not None:
    raise err("--t5 needs --checkpoint: the default demo model has random weights and uses "
              "random text features instead of T5. Pass --checkpoint with a directory "
              "converted by `python -m convert.infinity` to use a T5.")
  if not demo and iargs.t5 is None:
    raise err(f"{ckpt!r} is an Infinity (text-to-image) checkpoint, which needs a T5 text "
              "encoder: pass --t5 DIR, a directory converted with `python -m convert.t5 "
              "--hf_dir flan-t5-xl --out DIR`.")
  prompts = _read_prompts(err, iargs, DEMO_PROMPT if demo else None)
  negative = iargs.negative
  if negative is not None and not negative.strip():
    raise err("--negative_prompt is empty; drop it to use the model's learned "
              "unconditional text.")
  batch = min(1 if args.batch is None else args.batch, len(prompts))

  schedule, h_div_w, is_template, aspect, pn = resolve_schedule(err, iargs.aspect, iargs.pn)
  n = schedule.num_scales
  settings, cfgs_ps, taus_ps = sampling_settings(err, args, iargs.tau, n, pn)
  runner.check_plan(args, schedule, icfg.depth)

  # The T5 directory: config, tokenizer and width checked now (read once), weights later.
  t5_cfg, tok = open_t5(err, None if demo else iargs.t5, icfg, ckpt)
  if demo:
    tokens_full = [int(k) for k in demo_features(prompts, 1)[1]]
  else:
    tokens_full = [len(tok.encode(p)) for p in prompts]

  out = outputs.OutputRun(args.out, args.overwrite)
  if not is_template:
    h, w = schedule.image_hw
    print(f"note: aspect {aspect!r} (h/w {h_div_w:.4f}) is not an Infinity template; using "
          f"the nearest template h/w {schedule.template} ({w}x{h} pixels).", file=sys.stderr)

  jax = runner.setup_jax()
  dtype_name, dtype, attn_impl = runner.resolve_dtype(jax, args.dtype, args.attn_impl)
  from sparvar_jax.families.infinity import InfinityAdapter, bucket_text_len  # pylint: disable=g-import-not-at-top
  from sparvar_jax.generate import ScaleLoop, row_keys  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  model, vae, encoder, source = load_models(ckpt, iargs.t5, cfgs, dtype, attn_impl, args.seed,
                                            t5_cfg=t5_cfg, tok=tok)
  print(f"model: {source}", file=sys.stderr)
  if demo:
    print("note: the default model's weights are random, so its images are noise; pass "
          "--checkpoint (and --t5) for real images.", file=sys.stderr)
  load_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  trunc_msgs = []

  def encode(texts, what):
    return text_features(encoder, tok, icfg, texts, what, trunc_msgs)

  feats, lens = encode(prompts, "prompts")
  neg = None
  if negative is not None:
    nf, nl = encode([negative], "negative prompt")
    neg = (np.asarray(nf), np.asarray(nl))
  feats, lens = np.asarray(feats), np.asarray(lens)
  text_s = time.perf_counter() - t0

  text_len = bucket_text_len(list(lens) + ([] if neg is None else list(neg[1])))
  plan, options = runner.build_plan(args, schedule, icfg.depth)
  loop = ScaleLoop(InfinityAdapter(model, vae, schedule, settings, text_len=text_len,
                                   cache_dtype=dtype), batch, plan, options)
  N = len(prompts)
  report = {
      "mode": "infinity",
      "model": source,
      "random_weights": demo,
      "t5": None if demo else os.path.abspath(iargs.t5),
      "text_features": ("random, seeded from each prompt's text (demo: no T5)" if demo
                        else "T5 encoder"),
      "config": {"depth": icfg.depth, "embed_dim": icfg.embed_dim, "d_vae": icfg.d_vae,
                 "text_channels": icfg.text_channels},
      "prompts": [],
      "negative_prompt": negative,
      "truncation_warnings": trunc_msgs,
      "aspect": {"requested": aspect, "requested_h_div_w": h_div_w,
                 "template_h_div_w": schedule.template, "is_template": is_template},
      "pn": pn,
      "schedule": [list(hw) for hw in schedule.scales],
      "image_hw": list(schedule.image_hw),
      "settings": {"cfg": list(cfgs_ps), "tau": list(taus_ps), "top_k": settings.top_k,
                   "top_p": settings.top_p, "seed": args.seed, "batch": batch,
                   "text_len": text_len, "dtype": dtype_name, "attn_impl": attn_impl},
      **runner.common_report(args, plan, jax, dtype_name, attn_impl),
      "interrupted": None,
  }
  # Each image goes to disk as soon as its batch is decoded (an interrupted run keeps what it
  # made); RAM holds the grid's first 64 thumbnails, plus float images/bits for --save_npz.
  grid = outputs.GridCollector()
  images, bits, calls = [], [[] for _ in range(n)], []
  image_shape = None
  def finalize():
    if grid.images:
      out.png("grid.png", grid.grid())
    if args.save_npz and images:
      arrays = {f"bits_scale{si}": np.concatenate(b) for si, b in enumerate(bits) if b}
      out.npz("samples.npz", image_BHW3=np.concatenate(images), **arrays)
    report["seconds"] = {
        "load_and_build": load_s, "text_encode": text_s, "calls": calls,
        "first_call_includes_compile": True,
        "total_generate": sum(sum(c["per_scale_seconds"]) + c["decode_seconds"]
                              for c in calls)}
    report["image_shape"] = image_shape
    report["grid"] = {"images": len(grid.images), "of": N,
                      "thumbnails": len(grid.images) > grid.full_res_upto}
    report["files"] = out.files + ["report.json"]
    out.json("report.json", report)

  with runner.finishing(out, report, finalize):
    for start in range(0, N, batch):
      idx = list(range(start, min(start + batch, N)))
      rows = idx + [idx[-1]] * (batch - len(idx))  # pad the last chunk; copies are dropped
      label = (f"prompt {idx[0] + 1}/{N}" if len(idx) == 1 else
               f"prompts {idx[0] + 1}-{idx[-1] + 1}/{N}")
      res = loop(feats[rows], lens[rows], keys=row_keys(args.seed, rows), negative=neg,
                 progress=runner.progress_printer(label, schedule.scales))
      print(f"[{label}] decode: {res.decode_seconds * 1e3:.1f} ms", file=sys.stderr)
      batch_images = np.asarray(res.image_BHW3[:len(idx)])
      image_shape = [N] + list(batch_images.shape[1:])
      for row, i in enumerate(idx):
        name = f"{i:03d}_{slug(prompts[i])}.png"
        img8 = outputs.to_uint8(batch_images[row])
        out.png(name, img8)
        grid.add(img8)
        report["prompts"].append({
            "index": i, "prompt": prompts[i], "tokens": int(lens[i]),
            "tokens_before_truncation": tokens_full[i],
            "truncated": tokens_full[i] > text.MAX_LEN, "seed": args.seed,
            "call": len(calls), "batch_row": row, "file": name})
      if args.save_npz:
        images.append(batch_images)
        for si, b in enumerate(res.tokens_per_scale):
          bits[si].append(b[:len(idx)])
      calls.append({"prompts": idx, "per_scale_seconds": res.scale_seconds,
                    "decode_seconds": res.decode_seconds})
  print(f"wrote {N} images, grid.png and report.json to {out.path}", file=sys.stderr)
  return report
