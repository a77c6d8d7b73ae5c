#!/bin/bash
# GPU check for VAR (issue 2): ours vs the official PyTorch VAR, same card, same call.
# Needs the official source extracted into .baseline/var_src (ignored; see bench_var_official.py).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTD/env.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUTD/env.txt"
python3 -m pytest -q -m gpu tests/test_nn.py tests/test_var_model.py 2>&1 | tail -15 | tee "$OUTD/gpu_tests.log"
for d in 16 30; do
  timeout 150 python3 scripts/bench_var_official.py --src .baseline/var_src --depth $d --batch 8 2>"$OUTD/off$d.err" | tee -a "$OUTD/var_bench.jsonl"
  tail -3 "$OUTD/off$d.err"
  for impl in ${IMPLS:-cudnn xla}; do
    timeout 150 python3 scripts/bench_var.py --depth $d --batch 8 --attn_impl $impl 2>"$OUTD/ours$d$impl.err" | tee -a "$OUTD/var_bench.jsonl"
    tail -3 "$OUTD/ours$d$impl.err"
  done
done
