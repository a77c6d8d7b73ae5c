"""Throughput of `python -m sparvar_jax.generate_many` (images/s), one device against all.

Each run is the real CLI path (items, batching, the device mesh, PNG + manifest writing,
the FID .npz for VAR) on a released model's size with random weights (--random_model; no
checkpoint needed), in a fresh output folder. From each run's summary.json: the steady
rate (after each group's first call, which compiles), the wall rate including compilation,
load and generate seconds. Prints a JSON line per run and a final JSON object.

  python scripts/bench_many.py --out /tmp/bench_many                 # on the GPU host
  python scripts/bench_many.py --out /tmp/bm --models demo_var --images 8 --per_device 2
      # a CPU smoke test of this script (the tiny random VAR)

--devices 1,all: the first GPU alone (CUDA_VISIBLE_DEVICES=0), then every local GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("var_d16", "var_d20", "var_d24", "var_d30", "infinity_2b", "infinity_8b", "demo_var",
          "demo_infinity")


def _visible_gpus() -> int:
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
  except OSError:
    return 0


def _items(model: str, n: int, path: str) -> list[str]:
  """generate_many's item flags: VAR class ranges, Infinity a prompts file."""
  if "var" in model:
    return ["--classes", f"0-{n - 1}"] if n <= 1000 else [
        "--classes", "0-999", "--per_class", str(-(-n // 1000))]
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(f"a photo of a red fox in the snow, number {i}\n")
  return ["--input", path]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--models", default="var_d16,infinity_2b")
  ap.add_argument("--images", default="var:1024,infinity:24",
                  help="images per run: 'var:N,infinity:M' or one number")
  ap.add_argument("--per_device", default="var:32/64,infinity:1/2",
                  help="batch rows per device to try: 'var:a/b,infinity:c' or one list a/b")
  ap.add_argument("--devices", default="1,all")
  ap.add_argument("--pn", default="1M")
  ap.add_argument("--timeout", type=int, default=1800)
  a = ap.parse_args()
  models = [m for m in a.models.split(",") if m]
  if set(models) - set(MODELS):
    ap.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {MODELS}")

  def per_family(text, cast):
    if ":" not in text:
      return {"var": cast(text), "infinity": cast(text)}
    return {k: cast(v) for k, v in (part.split(":") for part in text.split(","))}

  images = per_family(a.images, int)
  per_device = per_family(a.per_device, lambda t: [int(x) for x in t.split("/")])
  os.makedirs(a.out, exist_ok=True)
  gpus = _visible_gpus()
  results = []
  for model in models:
    fam = "var" if "var" in model else "infinity"
    for dev in a.devices.split(","):
      env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
                 SPARVAR_COMPILE_CACHE=os.path.join(a.out, "xla_cache"))
      ndev = gpus or 1
      if dev == "1":
        env["CUDA_VISIBLE_DEVICES"] = "0"
        ndev = 1
      elif dev != "all":
        ap.error(f"--devices takes 1 and/or all, got {dev!r}")
      for per in per_device[fam]:
        name = f"{model}_{dev}dev_b{per}"
        out = os.path.join(a.out, name)
        model_flags = (["--demo", model[5:]] if model.startswith("demo_") else
                       ["--random_model", model])
        cmd = [sys.executable, "-m", "sparvar_jax.generate_many", *model_flags,
               *_items(model, images[fam], os.path.join(a.out, f"{name}_prompts.txt")),
               "--batch", str(per * ndev), "--out", out]
        if fam == "infinity":
          cmd += ["--pn", a.pn]
        t0 = time.perf_counter()
        try:
          p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=a.timeout)
          with open(os.path.join(a.out, f"{name}.log"), "w") as f:
            f.write(p.stderr)
          if p.returncode != 0:
            rec = {"error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}"}
          else:
            s = json.load(open(os.path.join(out, "summary.json")))
            rec = {**s["this_process"], "devices": s["devices"], "batch": s["batch"]}
        except subprocess.TimeoutExpired:
          rec = {"error": f"timed out after {a.timeout} s"}
        rec.update(name=name, model=model, device_setting=dev, rows_per_device=per,
                   wall_seconds=time.perf_counter() - t0)
        print(json.dumps(rec), flush=True)
        results.append(rec)
  print(json.dumps({"runs": results, "gpus": gpus}))


if __name__ == "__main__":
  main()
