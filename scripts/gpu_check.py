"""All GPU-side checks and benchmarks in one command; prints a short table.

Usage (on the H100, from the repository root):
  PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out "$OUT"
  PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out "$OUT" --skip-checks --skip-bench \
      --models var16,var30,inf2b,inf8b
  PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out "$OUT" --skip-bench --only mgpu_dense,gather
Writes checks.json (tests/test_kernels_gpu.py's CHECKS — Mosaic and Triton kernels, the
models' attention glue — run without pytest; SM clocks/power logged), the attention
benchmark's bench.json / jax.json / torch.json / masks.npz (--bench-args passes flags to
scripts/bench_attention.py, e.g. "--heads 16 --scales 12"), and with --models the
end-to-end model benchmarks (ours vs the official PyTorch code, same call) as models.json.
The official baselines need their source in ignored folders: `.baseline/var_src`
(FoundationVision/VAR `models/` + `dist.py`) and `.baseline/official_infinity` (the
shared harness with the official Infinity source in `infinity_src/`); carry `.baseline`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _run(cmd):
  try:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
  except OSError as e:
    return repr(e)


# name -> (ours command, official command, official cwd, label); timing keys below.
_MODELS = {
    "var16": (["scripts/bench_var.py", "--depth", "16", "--batch", "8"],
              ["scripts/bench_var_official.py", "--src", ".baseline/var_src", "--depth", "16",
               "--batch", "8"], None, "VAR-d16 256px b8 cfg4 (s/batch)"),
    "var30": (["scripts/bench_var.py", "--depth", "30", "--batch", "8"],
              ["scripts/bench_var_official.py", "--src", ".baseline/var_src", "--depth", "30",
               "--batch", "8"], None, "VAR-d30 256px b8 cfg4 (s/batch)"),
    "inf2b": (["scripts/bench_infinity.py", "--model", "2b"],
              ["bench_infinity.py", "--model", "2b", "--warmup", "2", "--iters", "5",
               "--profile", "0"], ".baseline/official_infinity", "Infinity-2B 1024px cfg4 (ms)"),
    "inf8b": (["scripts/bench_infinity.py", "--model", "8b"],
              ["bench_infinity.py", "--model", "8b", "--warmup", "2", "--iters", "5",
               "--profile", "0"], ".baseline/official_infinity", "Infinity-8B 1024px cfg4 (ms)"),
    # Dense vs SparVAR (and skip / drop-uncond, and attention off) in one process; ours runs
    # twice on one fresh compilation cache: the first call cold, then warm.
    "gen2b": (["scripts/bench_generate.py", "--model", "2b"],
              ["bench_infinity.py", "--model", "2b", "--warmup", "2", "--iters", "5",
               "--profile", "0"], ".baseline/official_infinity",
              "Infinity-2B 1024px cfg4, plans (ms)"),
    "gen8b": (["scripts/bench_generate.py", "--model", "8b"],
              ["bench_infinity.py", "--model", "8b", "--warmup", "2", "--iters", "5",
               "--profile", "0"], ".baseline/official_infinity",
              "Infinity-8B 1024px cfg4, plans (ms)"),
}


def _clocks() -> str:
  """SM clock, power and throttle state: sustained runs on a power-capped card slow down."""
  return _run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,"
               "temperature.gpu,clocks_throttle_reasons.active", "--format=csv,noheader"])


def _last_json(text: str) -> dict | None:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def _time_of(rec: dict | None) -> float | None:
  """Seconds per batch (VAR) or ms without decode (Infinity), ours or official."""
  if not rec:
    return None
  for k in ("median_s", "median_ms_no_decode", "wall_ms_median"):
    if k in rec:
      return rec[k]
  return None


def run_models(names, out_dir, timeout):
  rows = []
  for name in names:
    ours_cmd, off_cmd, off_cwd, label = _MODELS[name]
    rec = {"name": name, "label": label}
    runs = [("official", off_cmd, off_cwd), ("ours", ours_cmd, None)]
    if name.startswith("gen"):
      cache = tempfile.mkdtemp(prefix="xla_cache_")
      runs = [runs[0], ("ours", ours_cmd + ["--cache_dir", cache], None),
              ("ours_warm", ours_cmd + ["--cache_dir", cache, "--repeats", "1"], None)]
    for who, cmd, cwd in runs:
      cwd = os.path.join(ROOT, cwd) if cwd else ROOT
      if who == "official" and not os.path.exists(os.path.join(cwd, cmd[0])):
        rec[who] = {"error": f"baseline source missing: {os.path.join(cwd, cmd[0])}"}
        continue
      try:
        p = subprocess.run([sys.executable] + cmd, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))
        with open(os.path.join(out_dir, f"{name}_{who}.log"), "w") as f:
          f.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
        rec[who] = _last_json(p.stdout) or {"error": f"exit {p.returncode}: "
                                                     f"{p.stderr.strip()[-300:]}"}
      except subprocess.TimeoutExpired:
        rec[who] = {"error": f"timed out after {timeout} s"}
      print(json.dumps({name: {who: rec[who]}}), flush=True)
    t_ours, t_off = _time_of(rec.get("ours")), _time_of(rec.get("official"))
    rec.update(time_ours=t_ours, time_official=t_off,
               speedup=(t_off / t_ours) if (t_ours and t_off) else None)
    rows.append(rec)
  json.dump(rows, open(os.path.join(out_dir, "models.json"), "w"), indent=1)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="gpu_check_out")
  p.add_argument("--skip-bench", action="store_true")
  p.add_argument("--skip-checks", action="store_true")
  p.add_argument("--only", default="", help="comma-separated check names")
  p.add_argument("--bench-args", default="", help="extra arguments for bench_attention.py")
  p.add_argument("--models", default="", help=f"comma-separated of {sorted(_MODELS)}: "
                 "end-to-end benchmarks, ours vs official in this call")
  p.add_argument("--model-timeout", type=int, default=600)
  p.add_argument("--pytest", action="store_true", help="also run the GPU-marked tests "
                 "(pytest -m gpu tests/)")
  args = p.parse_args()
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(_MODELS))
  if unknown:
    p.error(f"unknown --models {unknown}; choose from {sorted(_MODELS)}")
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  import jax
  env = dict(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
             kind=jax.devices()[0].device_kind,
             commit=os.environ.get("SPARVAR_COMMIT") or _run(["git", "-C", ROOT, "rev-parse",
                                                              "--short", "HEAD"]),
             nvidia_smi=_run(["nvidia-smi", "-L"]), clocks_start=_clocks())
  print(json.dumps(env), flush=True)
  results = []
  if not args.skip_checks:
    from tests.test_kernels_gpu import CHECKS, run_check, seed_of
    only = set(filter(None, args.only.split(",")))
    unknown = sorted(only - {name for name, _ in CHECKS})
    if unknown:
      p.error(f"unknown --only checks {unknown}")
    for name, fn in CHECKS:
      if only and name not in only:
        continue
      t = time.time()
      try:
        rec = run_check(name, fn)  # the seed pytest's test_gpu_check[name-seedN] uses
      except Exception as e:  # keep going: every check reports
        rec = dict(name=name, seed=seed_of(name), ok=False, error=repr(e)[:500],
                   trace=traceback.format_exc()[-1500:])
      rec["s"] = round(time.time() - t, 1)
      results.append(rec)
      print(json.dumps(rec), flush=True)
    json.dump(dict(env=env, checks=results), open(os.path.join(args.out, "checks.json"), "w"),
              indent=1)
  if not args.skip_bench:
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_attention.py"), "--out",
           args.out] + args.bench_args.split()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    print(f"benchmark exit code {rc}", flush=True)
  pytest_line = None
  if args.pytest:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], cwd=ROOT,
                       capture_output=True, text=True)
    with open(os.path.join(args.out, "pytest_gpu.log"), "w") as f:
      f.write(p.stdout + p.stderr)
    pytest_line = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
  model_rows = run_models(models, args.out, args.model_timeout) if models else []
  print("\n== GPU checks ==")
  for r in results:
    status = "PASS" if r.get("ok") else "FAIL"
    print(f"{status} {r['name']:<22} seed {r['seed']:<10} rel_err="
          f"{r.get('rel_err', float('nan')):.2e} {r.get('error', '')[:150]} ({r['s']} s)")
  if pytest_line is not None:
    print(f"\n== pytest -m gpu: {pytest_line}")
  if model_rows:
    print("\n== models: ours vs official (same call) ==")
    for r in model_rows:
      t_ours, t_off = r["time_ours"], r["time_official"]
      fmt = lambda t: "-" if t is None else f"{t:.4g}"
      sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
      errs = "; ".join(f"{w}: {r[w]['error'][:120]}" for w in ("ours", "official")
                       if isinstance(r.get(w), dict) and "error" in r[w])
      print(f"{r['label']:<34} official {fmt(t_off):>8}  ours {fmt(t_ours):>8}  {sp:>7}  {errs}")
      for v, rec in (r.get("ours") or {}).get("variants", {}).items():
        warm = ((r.get("ours_warm") or {}).get("variants") or {}).get(v, {})
        print(f"  {v:<14} {rec['median_ms_no_decode']:8.1f} ms  first call "
              f"{rec['first_call_s']:.1f} s cold / {warm.get('first_call_s', float('nan')):.1f} "
              f"s warm  retraced {rec['steps_traced_again_new_image']}  peak "
              f"{rec['peak_gib_so_far_incl_autotune']:.1f} GiB  per scale "
              f"{' '.join(f'{x:.1f}' for x in rec['per_scale_ms'])}")
      att = (r.get("ours") or {}).get("attention_ms_scales_10_12")
      if att:
        print("  attention at scales 10-12 (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in att.items() if v is not None))
  print(f"clocks at start: {env['clocks_start']}; at end: {_clocks()}")
  print(f"total {time.time() - t0:.0f} s; commit {env['commit']}; {env['kind']}")


if __name__ == "__main__":
  main()
