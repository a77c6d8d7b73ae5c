"""All GPU-side kernel checks and the attention benchmark in one command; prints a short table.

Usage (on the H100, from the repository root):
  PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out "$OUT"
Writes checks.json (tests/test_kernels_gpu.py's CHECKS, run without pytest), and the
benchmark's bench.json / jax.json / torch.json / masks.npz into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="gpu_check_out")
  p.add_argument("--skip-bench", action="store_true")
  p.add_argument("--skip-checks", action="store_true")
  p.add_argument("--only", default="", help="comma-separated check names")
  p.add_argument("--bench-args", default="", help="extra arguments for bench_attention.py")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  import jax
  env = dict(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
             kind=jax.devices()[0].device_kind,
             commit=os.environ.get("SPARVAR_COMMIT") or _run(["git", "-C", ROOT, "rev-parse",
                                                              "--short", "HEAD"]),
             nvidia_smi=_run(["nvidia-smi", "-L"]))
  print(json.dumps(env), flush=True)
  results = []
  if not args.skip_checks:
    from tests.test_kernels_gpu import CHECKS
    only = set(filter(None, args.only.split(",")))
    for name, fn in CHECKS:
      if only and name not in only:
        continue
      t = time.time()
      try:
        rec = fn()
        rec["name"] = name
      except Exception as e:  # keep going: every check reports
        rec = dict(name=name, ok=False, error=repr(e)[:500], trace=traceback.format_exc()[-1500:])
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
  print("\n== GPU checks ==")
  for r in results:
    status = "PASS" if r.get("ok") else "FAIL"
    print(f"{status} {r['name']:<22} rel_err={r.get('rel_err', float('nan')):.2e} "
          f"{r.get('error', '')[:150]} ({r['s']} s)")
  print(f"total {time.time() - t0:.0f} s; commit {env['commit']}; {env['kind']}")


if __name__ == "__main__":
  main()
