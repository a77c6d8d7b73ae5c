#!/bin/bash
# GPU check for Infinity (issue 4): ours vs the official PyTorch Infinity, same card, same call.
# Needs the official harness + source in .baseline/official_infinity (ignored; see
# ../shared/baselines/official_infinity/README.md). MODELS="2b 8b" by default.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
for m in ${MODELS:-2b 8b}; do
  (cd .baseline/official_infinity && timeout ${TOFF:-200} python3 bench_infinity.py --model $m \
     --warmup 2 --iters 5 --profile 0 --out "$OUTD/official_infinity_$m.json" > "$OUTD/official_infinity_$m.log" 2>&1)
  echo "official $m rc=$?"; grep -iE "median|error" "$OUTD/official_infinity_$m.log" | tail -4
  timeout ${TOURS:-240} python3 scripts/bench_infinity.py --model $m 2>"$OUTD/ours_infinity_$m.err" | tee -a "$OUTD/infinity_bench.jsonl"
  tail -n 3 "$OUTD/ours_infinity_$m.err"
done
