"""Attention benchmark on one GPU: our Pallas kernels vs cuDNN dense and PyTorch FlexAttention.

Ours: the Mosaic GPU (Hopper) kernel, persistent and not ("ours_mgpu*" rows: dense, CSLA
block-granular, random masks, and the Hopper gather path — rows copied per group, then the
kernel — with "rows_copy" timing the copy alone) and the Triton-lowered kernels
("ours_pallas": dense, block-granular and exact masks, 2D-tile CSLA, gather, column sums).

Usage (on the H100):  python scripts/bench_attention.py --out /tmp/bench
Kernel-variant A/B (jax cuDNN + Mosaic rows only, more repeats):
  python scripts/bench_attention.py --out /tmp/ab --part jax --mgpu-only --reps 11 --l2-prefetch 2
Gather only (Triton vs the Hopper path by query-group size):
  python scripts/bench_attention.py --out /tmp/g --scales 12 --no-tune --gather-only \
      --gather-groups 1024,2048
It runs the JAX part in this process and the PyTorch part in a subprocess (same card, same
run; separate allocators), then prints one table and writes bench.json.

Shapes: Infinity 1024x1024 schedule, batch 2 (CFG), head dim 128, bf16, 16 heads (2B) and
28 heads (8B); query scales 10, 11, 12 against all earlier keys (KV-cache layout). Masks:
SparVAR's CSLA defaults (block-granular and exact, 128x128 blocks as the paper; plus 64x64
blocks for ours), random per-head 128x128 block masks at 5/10/20/30% (scale 12), token
gather at 20% of keys (the last two scales; groups of 192 queries, plus --gather-groups with
--gather-tiles and the Hopper path), dense + column sums at the decision scale 10. Our
kernels read K/V from a buffer padded to a multiple of 128 keys (the model's KV cache
layout); cuDNN and Flex get the exact length.
Times: JAX = median over 7 repeats of the mean of back-to-back calls (host clock,
synchronised); torch = median of 3 triton.testing.do_bench medians (its own warm-up).
Within each part, all kernels of one shape are timed round-robin (repeat r times every kernel once); each slot
warms its kernel up for ~15 ms untimed, then times ~20 ms of back-to-back calls. Seen on the
H100: timed right after a long dense kernel, a sparse one ran up to ~20% slower; timed after
an idle gap, short kernels ran ~20% slower (clocks ramping). `spread` = (max-min)/median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SCHED = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
CUM = np.concatenate([[0], np.cumsum([s * s for s in SCHED])]).astype(int)
D = 128
B = 2
DENSITIES = (0.05, 0.10, 0.20, 0.30)


def log(*a):
  print(*a, flush=True)


def shape_of(scale):
  return SCHED[scale] ** 2, int(CUM[scale + 1])


def random_block_table(rng, heads, nq, nk, density):
  t = rng.random((1, heads, nq, nk)) < density
  t[..., 0] = True  # the sink block, as in the anchors' Flex runs
  return t


# ------------------------------------------------------------------------------- JAX part


def jax_part(args):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  import jax.numpy as jnp
  from pallas_kernels import (BlockMask, BlockSparseConfig, ColsumConfig, GatherConfig,
                              block_sparse_attention, dense_attention, dense_colsum_attention,
                              column_sums, gather_attention, key_budget)
  from pallas_kernels.colsum import dense_attention_with_lse
  from pallas_kernels.block_sparse_mgpu import MosaicConfig, block_sparse_attention_mgpu
  from pallas_kernels.gather_mgpu import gather_attention_mgpu, gather_kv_rows, pad_slots
  from sparvar_jax.sparse import csla

  R = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), rows=[], tuning=[])
  interp = jax.default_backend() == "cpu"  # --dry-run on a CPU: kernels in interpret mode
  dense_impl = "xla" if interp else "cudnn"
  t_start = time.time()
  rng = np.random.default_rng(0)
  masks_out = {}

  def timeit(fn, *xs, n=20, reps=7):
    jax.block_until_ready(fn(*xs))
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      for _ in range(n):
        r = fn(*xs)
      jax.block_until_ready(r)
      ts.append((time.perf_counter() - t) / n * 1e3)
    return float(np.median(ts))

  def inputs(heads, scale):
    lq, lk = shape_of(scale)
    lk_pad = -(-lk // 128) * 128
    key = jax.random.PRNGKey(heads * 100 + scale)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, lq, heads, D), jnp.bfloat16)
    kb = jax.random.normal(kk, (B, lk_pad, heads, D), jnp.bfloat16)
    vb = jax.random.normal(kv, (B, lk_pad, heads, D), jnp.bfloat16)
    k, v = kb[:, :lk] + 0, vb[:, :lk] + 0  # exact-length copies for cuDNN
    return q, k, v, kb, vb

  def row(**kw):
    R["rows"].append(kw)
    log(json.dumps(kw))

  pending = []

  def timed_row(fn, xs, flops=None, **kw):
    """Queue fn(*xs) for this shape's interleaved timing round (`run_round`); its vs_cudnn
    comes from the round's own cuDNN row."""
    if args.mgpu_only and not kw["impl"].startswith(("ours_mgpu", "jax_cudnn", "rows_copy")):
      return
    if args.gather_only and not (kw["mask"].startswith("gather") or kw["mask"] == "dense"):
      return
    if args.colsum_only and not (kw["mask"] == "dense+colsum" or (
        kw["mask"] == "dense" and kw["impl"] in ("jax_cudnn", "ours_mgpu"))):
      return
    pending.append((fn, xs, flops, kw))

  def run_round(warm_ms=15.0, window_ms=20.0):
    """Compile every queued kernel, then time them round-robin: each repeat runs every kernel
    once, so clock changes over the round hit all of them alike. A slot first runs its kernel
    for ~warm_ms untimed (clocks settle after the previous kernel, heavier or idle), then
    times back-to-back calls filling ~window_ms. Median over repeats; failures recorded."""
    ok = []
    for fn, xs, flops, kw in pending:
      try:
        jax.block_until_ready(fn(*xs))
        t = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        est = max(time.perf_counter() - t, 1e-5) * 1e3
        kw["_counts"] = (max(3, int(warm_ms / est)), max(10, int(window_ms / est)))
        ok.append((fn, xs, flops, kw))
      except Exception as e:  # a kernel that fails is recorded and skipped
        kw["err"] = repr(e)[:400]
        R["rows_failed"] = R.get("rows_failed", []) + [kw]
        log("FAILED", json.dumps(kw))
    pending.clear()
    ts = [[] for _ in ok]
    for _ in range(args.reps):
      for i, (fn, xs, _, kw) in enumerate(ok):
        warm, n = kw["_counts"]
        time.sleep(args.gap)
        for _ in range(warm):
          r = fn(*xs)
        jax.block_until_ready(r)
        t = time.perf_counter()
        for _ in range(n):
          r = fn(*xs)
        jax.block_until_ready(r)
        ts[i].append((time.perf_counter() - t) / n * 1e3)
    base = [float(np.median(t)) for t, (_, _, _, kw) in zip(ts, ok)
            if kw["impl"] == "jax_cudnn" and kw["mask"] == "dense"]
    for t, (_, _, flops, kw) in zip(ts, ok):
      kw.pop("_counts")
      ms = float(np.median(t))
      extra = dict(ms=ms, spread=float((max(t) - min(t)) / ms))
      if flops is not None:
        extra["tflops"] = flops / ms / 1e9
      if base:
        extra["vs_cudnn"] = base[0] / ms
      row(**kw, **extra)

  def bs_fn(m, rule, cfg, refine=True):
    return jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, m, rule, config=cfg, backend="triton",
                                                          interpret=interp, refine=refine))

  cudnn = jax.jit(lambda q, k, v: dense_attention(q, k, v, implementation=dense_impl))
  # Hopper kernel (Mosaic GPU): only where it compiles (an sm_90 GPU).
  use_mgpu = (not interp) and not args.no_mgpu
  # Kernel variants timed side by side, row name -> config (the default kernel first).
  mgpu_p = MosaicConfig()
  variants = {
      "ours_mgpu": mgpu_p,
      "ours_mgpu_rebal_off": MosaicConfig(rebalance="off"),
      "ours_mgpu_rebal_any": MosaicConfig(rebalance="any"),
      "ours_mgpu_noidx": MosaicConfig(prefetch_block_index=False),
      "ours_mgpu_rr": MosaicConfig(schedule="round_robin"),
      "ours_mgpu_nodefer": MosaicConfig(defer_store_wait=False),
      "ours_mgpu_chain": MosaicConfig(tile_info_table=False),
      "ours_mgpu_late": MosaicConfig(early_schedule_arrive=False),
      # The persistent kernel with every later scheduling change off (the baseline they are
      # measured against): round-robin, ping-pong drained at every tile, no prefetch of the
      # next tile's info or block index, the output store waited for at each tile's end.
      "ours_mgpu_prev": MosaicConfig(schedule="round_robin", pingpong_across_tiles=False,
                                     prefetch_tile_info=False, defer_store_wait=False,
                                     prefetch_block_index=False),
  }
  l2_names = [f"ours_mgpu_l2p{n}" for n in args.l2_prefetch]
  variants.update({name: MosaicConfig(l2_prefetch_steps=n)
                   for name, n in zip(l2_names, args.l2_prefetch)})
  # --mgpu-only (A/B runs) keeps the current kernel, its schedule without or with any-swap
  # rebalancing and the --l2-prefetch variants.
  masked_names = (["ours_mgpu", "ours_mgpu_late", "ours_mgpu_chain", "ours_mgpu_rebal_off",
                   "ours_mgpu_rebal_any"]
                  + ([] if args.mgpu_only else ["ours_mgpu_noidx", "ours_mgpu_rr",
                                                "ours_mgpu_prev"]) + l2_names)
  if args.variants:  # an explicit A/B list
    unknown = sorted(set(args.variants) - set(variants))
    if unknown:
      raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(variants)}")
    masked_names = list(args.variants)
  # dense: equal costs, list = round-robin
  dense_names = ["ours_mgpu"] + ([] if args.mgpu_only else ["ours_mgpu_nodefer",
                                                            "ours_mgpu_prev"])
  # --sched-sweep: list-schedule knobs (sorted tail fraction, per-tile overhead in steps).
  sweep_names = []
  for t, o in args.sched_sweep:
    if (t, o) != (mgpu_p.sorted_tail, mgpu_p.tile_overhead_steps):
      sweep_names.append(f"ours_mgpu_t{t:g}_o{o:g}")
      variants[sweep_names[-1]] = MosaicConfig(sorted_tail=t, tile_overhead_steps=o)

  def mg_fn(m, kv_len, cfg=MosaicConfig()):
    return jax.jit(lambda q, k, v: block_sparse_attention_mgpu(q, k, v, m, kv_len=kv_len,
                                                               config=cfg))
  last, first = max(args.scales), min(args.scales)

  # --- tuning: a few tiles on the heaviest shape, 16 heads, scale 12
  cands = [BlockSparseConfig(128, 64, 4, 2), BlockSparseConfig(128, 64, 8, 2),
           BlockSparseConfig(128, 128, 8, 2), BlockSparseConfig(128, 64, 4, 3),
           BlockSparseConfig(64, 64, 4, 2)]
  if args.quick:
    cands = [cands[0], cands[4]]
  if args.no_tune:  # the winners of the full sweep on the H100 (WORKSPACE.md)
    cands = []
  q, k, v, kb, vb = inputs(args.heads[0], last)
  lq, lk = shape_of(last)
  rule12 = csla.csla_rule(last)
  m12 = csla.csla_block_mask(last)
  dmask = BlockMask.dense(q_len=lq, kv_len=lk, block_q=128, block_kv=128)
  best = {}
  for kind, m, rule in (("dense", dmask, None), ("block", m12, None), ("exact", m12, rule12)):
    for cfg in cands:
      try:
        ms = timeit(bs_fn(m, rule, cfg), q, kb, vb)
      except Exception as e:  # a tile that does not compile is skipped, and said so
        R["tuning"].append(dict(kind=kind, config=str(cfg), err=repr(e)[:300]))
        log("tuning failed", kind, cfg, repr(e)[:300])
        continue
      R["tuning"].append(dict(kind=kind, config=str(cfg), ms=ms))
      log("tune", kind, cfg, f"{ms:.3f} ms")
      if kind not in best or ms < best[kind][1]:
        best[kind] = (cfg, ms)
  fallback = dict(dense=BlockSparseConfig(128, 64, 4, 2), block=BlockSparseConfig(128, 64, 4, 2),
                  exact=BlockSparseConfig(64, 64, 4, 2))
  cfg_of = {kind: best[kind][0] if kind in best else fallback[kind] for kind in fallback}
  R["best_config"] = {kind: str(c) for kind, c in cfg_of.items()}

  for heads in args.heads:
    for scale in args.scales:
      if time.time() - t_start > args.time_limit:
        log("time limit reached: stopping the JAX sweep")
        break
      lq, lk = shape_of(scale)
      q, k, v, kb, vb = inputs(heads, scale)
      dense_flops = 4.0 * B * heads * lq * lk * D
      timed_row(cudnn, (q, k, v), dense_flops, heads=heads, scale=scale, impl="jax_cudnn",
                mask="dense", frac=1.0)
      dm = BlockMask.dense(q_len=lq, kv_len=lk, block_q=128, block_kv=128)
      timed_row(bs_fn(dm, None, cfg_of["dense"]), (q, kb, vb), dense_flops,
                heads=heads, scale=scale, impl="ours_pallas", mask="dense", frac=1.0)
      if use_mgpu:
        for name in dense_names:
          timed_row(mg_fn(None, lk, variants[name]), (q, kb, vb), dense_flops, heads=heads,
                    scale=scale, impl=name, mask="dense", frac=1.0, config=str(variants[name]))
      rule = csla.csla_rule(scale)
      masks_out[f"rule_q_{scale}"] = np.asarray(rule.q_yx_2Q)
      masks_out[f"rule_k_{scale}"] = np.asarray(rule.k_box_4K)
      for blk in (128, 64):
        m = csla.csla_block_mask(scale, blk, blk)
        frac = m.visited_pairs() / (lq * lk)
        if blk == 128:
          masks_out[f"csla_{scale}"] = m.block_types()
        for mode, r in (("block", None), ("exact", rule)):
          cfg = cfg_of[mode] if blk == 128 else BlockSparseConfig(64, 64, 4, 2)
          # Exact rows: the kernel walks the mask refined to its 64x64 tiles (same output);
          # frac stays the 128-mask's pairs so TFLOP/s compare with Flex on the same mask.
          timed_row(bs_fn(m, r, cfg), (q, kb, vb), dense_flops * frac, heads=heads,
                    scale=scale, impl="ours_pallas", mask=f"csla{blk}_{mode}", frac=frac,
                    config=str(cfg))
          if mode == "exact" and blk == 128:
            timed_row(bs_fn(m, r, cfg, refine=False), (q, kb, vb), dense_flops * frac,
                      heads=heads, scale=scale, impl="ours_pallas_unrefined",
                      mask="csla128_exact", frac=frac, config=str(cfg))
        if use_mgpu and blk == 128:
          for name in masked_names + (sweep_names if scale == last else []):
            timed_row(mg_fn(m, lk, variants[name]), (q, kb, vb), dense_flops * frac,
                      heads=heads, scale=scale, impl=name, mask="csla128_block", frac=frac)
      if SCHED[scale] % 8 == 0:
        plan = csla.csla_tile_plan(scale, tile=8)
        frac = plan["pairs"] / (lq * lk)
        for mode in ("union", "exact"):
          f = jax.jit(lambda q, k, v, mode=mode, plan=plan: gather_attention(
              q, k, v, plan["indices"], plan["counts"], group_size=plan["group_size"],
              q_perm=jnp.asarray(plan["q_perm"]), rule=plan["rule"] if mode == "exact" else None,
              config=GatherConfig(64, 64, 4, 2), interpret=interp))
          timed_row(f, (q, k, v), dense_flops * frac, heads=heads, scale=scale,
                    impl="ours_pallas", mask=f"csla_tile8_{mode}", frac=frac)
      if scale == last:
        for dens in DENSITIES:
          tbl = random_block_table(rng, heads, -(-lq // 128), -(-lk // 128), dens)
          m = BlockMask.from_block_types(tbl, q_len=lq, kv_len=lk, block_q=128, block_kv=128)
          masks_out[f"rand_{heads}_{int(dens * 100)}"] = m.block_types()
          frac = m.visited_pairs() / (lq * lk)
          timed_row(bs_fn(m, None, cfg_of["block"]), (q, kb, vb), dense_flops * frac,
                    heads=heads, scale=scale, impl="ours_pallas",
                    mask=f"random{int(dens * 100)}", frac=frac)
          for name in (masked_names + sweep_names if use_mgpu else []):
            timed_row(mg_fn(m, lk, variants[name]), (q, kb, vb), dense_flops * frac,
                      heads=heads, scale=scale, impl=name,
                      mask=f"random{int(dens * 100)}", frac=frac)
      if scale in sorted(args.scales)[-2:] and not args.no_gather:
        g = 192 if not interp else 64
        ng = -(-lq // g)
        budget = key_budget(0.2, lk, 64)
        idx = np.sort(np.argsort(rng.random((B, heads, ng, lk)), axis=-1)[..., :budget], -1)
        idx = jnp.asarray(idx, jnp.int32)
        cnt = jnp.full((B, heads, ng), budget, jnp.int32)
        res = q * 0.1
        frac = budget / lk
        for gcfg in (GatherConfig(64, 64, 4, 2), GatherConfig(64, 64, 4, 3)):
          f = jax.jit(lambda q, k, v, r, gcfg=gcfg: gather_attention(
              q, k, v, idx, cnt, r, group_size=g, config=gcfg, interpret=interp,
              backend="triton"))
          timed_row(f, (q, k, v, res), dense_flops * frac, heads=heads, scale=scale,
                    impl="ours_pallas", mask="gather20", frac=frac, config=str(gcfg))
        # Other group sizes (the query group is a parameter of CS4A): 128-query tiles
        # halve the gathered K/V traffic per query.
        for g2 in (() if interp else args.gather_groups):
          ng2 = -(-lq // g2)
          idx2 = jnp.asarray(np.sort(np.argsort(rng.random((B, heads, ng2, lk)), axis=-1)
                                     [..., :budget], -1), jnp.int32)
          cnt2 = jnp.full((B, heads, ng2), budget, jnp.int32)
          gcfgs = [c for c in args.gather_tiles if g2 % c.block_q == 0]
          for gcfg in gcfgs:
            f = jax.jit(lambda q, k, v, r, gcfg=gcfg, idx2=idx2, cnt2=cnt2, g2=g2:
                        gather_attention(q, k, v, idx2, cnt2, r, group_size=g2, config=gcfg,
                                         backend="triton"))
            timed_row(f, (q, k, v, res), dense_flops * frac, heads=heads, scale=scale,
                      impl="ours_pallas", mask=f"gather20_g{g2}", frac=frac, config=str(gcfg))
          # Hopper path: each group's rows copied once (Pallas), then the Mosaic kernel with
          # the residual fused; the copy alone is timed too (its share of the row).
          if use_mgpu and g2 % 128 == 0:
            f = jax.jit(lambda q, k, v, r, idx2=idx2, g2=g2: gather_attention_mgpu(
                q, k, v, idx2, r, group_size=g2))
            timed_row(f, (q, k, v, res), dense_flops * frac, heads=heads, scale=scale,
                      impl="ours_mgpu", mask=f"gather20_g{g2}", frac=frac,
                      config="rows copy + Mosaic")
            idx_pad = pad_slots(idx2)
            f = jax.jit(lambda k, v, idx_pad=idx_pad: gather_kv_rows(k, v, idx_pad))
            moved = 2 * 2 * idx_pad.size * (B // idx_pad.shape[0]) * k.shape[-1] * 2
            timed_row(f, (k, v), 0.0, heads=heads, scale=scale, impl="rows_copy",
                      mask=f"gather20_g{g2}", frac=frac, config=f"{moved / 1e6:.0f} MB moved")
      if scale == first and not args.no_gather:
        ccfgs = [ColsumConfig()]
        if not interp:
          ccfgs += [c for c in args.colsum_tiles if c != ccfgs[0]]
        impls = ("pallas",) if interp else ("pallas", "cudnn") + (("mosaic",) if use_mgpu else ())
        g_cs = 192 if not interp else 64

        def colsum_tiles(ccfg, backend):
          if backend == "mosaic":
            m = ccfg.mosaic_for(g_cs)
            return f"{m.block_q},{m.block_kv},{m.max_concurrent_steps}"
          return f"{ccfg.block_q},{ccfg.block_kv},{ccfg.num_warps},{ccfg.num_stages}"
        for impl in impls:
          # The Triton column-sum pass (its tile sweep with the cuDNN dense pass) ...
          for ccfg in (ccfgs if impl == "cudnn" else ccfgs[:1]):
            ccfg = dataclasses.replace(ccfg, dense=cfg_of["dense"])
            f = jax.jit(lambda q, k, v, impl=impl, ccfg=ccfg: dense_colsum_attention(
                q, k, v, group_size=g_cs, dense_impl=impl, config=ccfg,
                colsum_backend="triton", interpret=interp))
            timed_row(f, (q, k, v), None, heads=heads, scale=scale,
                      impl=f"ours_colsum_{impl}", mask="dense+colsum", frac=1.0,
                      config=colsum_tiles(ccfg, "triton"))
          # ... and the Hopper one (colsum_mgpu.py), after cuDNN's or our dense pass.
          if use_mgpu and impl != "pallas":
            mgpu_ccfgs = [ColsumConfig(dense=cfg_of["dense"], mosaic=m)
                          for m in args.colsum_mgpu_tiles]
            for ccfg in mgpu_ccfgs:
              f = jax.jit(lambda q, k, v, impl=impl, ccfg=ccfg: dense_colsum_attention(
                  q, k, v, group_size=g_cs, dense_impl=impl, config=ccfg,
                  colsum_backend="mosaic"))
              timed_row(f, (q, k, v), None, heads=heads, scale=scale,
                        impl=f"ours_colsum_{impl}_mgpu", mask="dense+colsum", frac=1.0,
                        config=colsum_tiles(ccfg, "mosaic"))
            if impl == "cudnn":  # the pass alone, on cuDNN's log-sum-exp
              _, lse = dense_attention_with_lse(q, k, v, dense_impl="cudnn")
              for ccfg, be in ((ccfgs[0], "triton"), *((c, "mosaic") for c in mgpu_ccfgs)):
                f = jax.jit(lambda q, k, lse, ccfg=ccfg, be=be: column_sums(
                    q, k, lse, group_size=g_cs, config=ccfg, backend=be))
                timed_row(f, (q, k, lse), None, heads=heads, scale=scale,
                          impl=f"colsum_pass_{be}", mask="dense+colsum", frac=1.0,
                          config=colsum_tiles(ccfg, be))
      run_round()
      del q, k, v, kb, vb
  np.savez(os.path.join(args.out, "masks.npz"), **masks_out)
  jax.clear_caches()
  return R


# ------------------------------------------------------------------------------ torch part


def torch_part(args):
  import torch
  import torch.nn.functional as F
  torch._dynamo.config.recompile_limit = 512
  torch._dynamo.config.cache_size_limit = 512
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.nn.attention.flex_attention import (BlockMask as FlexBlockMask, create_block_mask,
                                                 flex_attention, noop_mask)

  R = dict(torch=torch.__version__, rows=[],
           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
  masks = np.load(os.path.join(args.out, "masks.npz"))
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if dev == "cuda":
    from triton.testing import do_bench
    flex = torch.compile(flex_attention, dynamic=False)
    bench = lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median")
  else:  # --dry-run: eager flex, one timed call
    flex = flex_attention
    def bench(fn):
      fn()
      t = time.perf_counter()
      fn()
      return (time.perf_counter() - t) * 1e3
  last = max(args.scales)
  t_start = time.time()

  def row(**kw):
    R["rows"].append(kw)
    log(json.dumps(kw))

  def from_types(types, lq, lk, heads):
    """Block-granular Flex mask: every visited block full (Flex masks keys past KV_LEN)."""
    t = torch.tensor(types > 0, device=dev)
    t = t.expand(1, heads, *t.shape[2:]) if t.shape[1] == 1 else t
    num = t.sum(-1).to(torch.int32)
    idx = torch.argsort((~t).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    zeros = torch.zeros_like(num)
    try:
      return FlexBlockMask.from_kv_blocks(zeros, idx, num, idx, BLOCK_SIZE=128,
                                          mask_mod=noop_mask, seq_lengths=(lq, lk))
    except TypeError:  # older torch without seq_lengths
      return FlexBlockMask.from_kv_blocks(zeros, idx, num, idx, BLOCK_SIZE=128,
                                          mask_mod=noop_mask)

  for heads in args.heads:
    for scale in args.scales:
      if time.time() - t_start > args.time_limit:
        log("time limit reached: stopping the torch sweep")
        break
      if f"csla_{scale}" not in masks:  # the JAX part stopped (--time-limit) before it
        log(f"no scale-{scale} masks from the JAX part: torch rows of scale {scale} skipped")
        continue
      torch._dynamo.reset()
      lq, lk = shape_of(scale)
      g = torch.Generator(device=dev).manual_seed(heads * 100 + scale)
      q, k, v = (torch.randn(B, heads, n, D, device=dev, dtype=torch.bfloat16, generator=g)
                 for n in (lq, lk, lk))
      dense_flops = 4.0 * B * heads * lq * lk * D
      queue = []  # (impl, mask, fn, flops): timed round-robin below, like the JAX part

      def cudnn_sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if dev == "cuda" else SDPBackend.MATH):
          return F.scaled_dot_product_attention(q, k, v)

      queue.append(("torch_cudnn", "dense", cudnn_sdpa, dense_flops))
      queue.append(("flex", "dense", lambda: flex(q, k, v), dense_flops))
      bm = from_types(masks[f"csla_{scale}"], lq, lk, heads)
      queue.append(("flex", "csla128_block", lambda: flex(q, k, v, block_mask=bm), None))
      qyx = torch.tensor(masks[f"rule_q_{scale}"], device=dev)
      kbox = torch.tensor(masks[f"rule_k_{scale}"], device=dev)
      qy, qx = qyx[0].contiguous(), qyx[1].contiguous()
      ylo, yhi, xlo, xhi = (kbox[i].contiguous() for i in range(4))

      def exact_mod(b, h, qi, ki):
        return ((ylo[ki] <= qy[qi]) & (qy[qi] <= yhi[ki]) & (xlo[ki] <= qx[qi])
                & (qx[qi] <= xhi[ki]))

      bme = create_block_mask(exact_mod, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device=dev,
                              BLOCK_SIZE=128)
      queue.append(("flex", "csla128_exact", lambda: flex(q, k, v, block_mask=bme), None))
      # Flex on the exact mask at 64x64 blocks (what our exact kernel walks after refining):
      # the same-granularity comparison. Its kernel tiles must divide the mask's blocks.
      bme64 = create_block_mask(exact_mod, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device=dev,
                                BLOCK_SIZE=64)
      for opts in (None, {"BLOCK_M": 64, "BLOCK_N": 64}):
        fn64 = lambda opts=opts: flex(q, k, v, block_mask=bme64, kernel_options=opts)
        try:
          fn64()
        except Exception as e:  # said, not hidden: the row is then missing
          log(f"flex exact 64x64 with kernel_options={opts} failed: {repr(e)[:300]}")
          continue
        queue.append(("flex", "csla64_exact", fn64, None))
        break
      if scale == last:
        for dens in DENSITIES:
          name = f"rand_{heads}_{int(dens * 100)}"
          if name not in masks:  # the JAX part stopped (--time-limit) before drawing it
            log(f"no {name} mask from the JAX part: Flex random{int(dens * 100)} skipped")
            continue
          types = masks[name]
          bmr = from_types(types, lq, lk, heads)
          queue.append(("flex", f"random{int(dens * 100)}",
                        lambda bmr=bmr: flex(q, k, v, block_mask=bmr), None))
      ts = [[] for _ in queue]
      for _ in range(3):
        for i, (_, _, fn, _) in enumerate(queue):
          time.sleep(args.gap)
          ts[i].append(bench(fn))
      for t, (impl, mk, _, flops) in zip(ts, queue):
        ms = float(np.median(t))
        rec = dict(heads=heads, scale=scale, impl=impl, mask=mk, ms=ms,
                   spread=float((max(t) - min(t)) / ms))
        if flops:
          rec.update(tflops=flops / ms / 1e9, frac=1.0)
        row(**rec)
      del q, k, v
      if dev == "cuda":
        torch.cuda.empty_cache()
  return R


# ------------------------------------------------------------------------------- report


def merge_and_print(RJ, RT):
  rows = RJ["rows"] + (RT["rows"] if RT else [])
  key = lambda r: (r["heads"], r["scale"], r["mask"])
  flex = {key(r): r["ms"] for r in rows if r["impl"] == "flex"}
  tcud = {(r["heads"], r["scale"]): r["ms"] for r in rows if r["impl"] == "torch_cudnn"}
  alias = {"csla64_block": "csla128_block",
           "csla_tile8_union": "csla128_block", "csla_tile8_exact": "csla128_exact"}
  for r in rows:
    if r["impl"] == "flex" and (r["heads"], r["scale"]) in tcud:
      r["vs_cudnn"] = tcud[(r["heads"], r["scale"])] / r["ms"]
    if r["impl"].startswith("ours"):
      mk = r["mask"]
      fk = alias.get(mk, mk)
      base = "dense" if (mk.startswith("gather20") or mk == "dense+colsum") else fk
      if (r["heads"], r["scale"], base) in flex:
        r["flex_ms"] = flex[(r["heads"], r["scale"], base)]
        r["vs_flex"] = r["flex_ms"] / r["ms"]
  lines = [f"{'H':>3} {'scale':>5} {'mask':<15} {'impl':<20} {'ms':>8} {'TFLOP/s':>8} "
           f"{'vs cuDNN':>9} {'vs Flex':>8}"]
  for r in rows:
    lines.append(f"{r['heads']:>3} {r['scale']:>5} {r['mask']:<15} {r['impl']:<20} "
                 f"{r['ms']:>8.3f} {r.get('tflops', float('nan')):>8.0f} "
                 f"{r.get('vs_cudnn', float('nan')):>9.2f} {r.get('vs_flex', float('nan')):>8.2f}")
  return rows, "\n".join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="bench_out")
  p.add_argument("--heads", default="16,28")
  p.add_argument("--scales", default="10,11,12")
  p.add_argument("--part", default="all", choices=["all", "jax", "torch"])
  p.add_argument("--quick", action="store_true", help="two tuning candidates only")
  p.add_argument("--no-tune", action="store_true", help="use the known best tiles")
  p.add_argument("--no-gather", action="store_true", help="skip the CS4A rows (gather, colsum)")
  p.add_argument("--gap", type=float, default=0.0,
                 help="idle seconds before each timed slot (the warm-up inside a slot is what "
                 "evens out clocks; a gap lets them drop, which penalises short kernels)")
  p.add_argument("--gather-groups", default="512,1024",
                 help="extra CS4A query-group sizes for the gather rows (192 is always run)")
  p.add_argument("--gather-tiles", default="128,64,4,3",
                 help="gather tiles for those groups: block_q,block_kv,warps,stages[;...] "
                 "(default: the best of 5 on the H100)")
  p.add_argument("--no-mgpu", action="store_true", help="skip the Mosaic GPU (Hopper) rows")
  p.add_argument("--sched-sweep", default="",
                 help="extra list-schedule settings for the last scale's masks, "
                 "'tail,overhead;...' (MosaicConfig.sorted_tail, tile_overhead_steps)")
  p.add_argument("--colsum-tiles", default="64,128,8,2",
                 help="extra column-sum tiles with the cuDNN dense pass: "
                      "block_q,block_kv,warps,stages[;...] (the default tiles always run)")
  p.add_argument("--colsum-mgpu-tiles", default="auto;64,128,3",
                 help="Hopper column-sum tiles: block_q,block_kv,max_concurrent_steps[;...]; "
                 "'auto' = ColsumMosaicConfig.for_group (the default)")
  p.add_argument("--colsum-only", action="store_true",
                 help="time only the dense baselines and the column-sum rows")
  p.add_argument("--mgpu-only", action="store_true",
                 help="time only jax cuDNN and the Mosaic rows (kernel-variant A/B runs)")
  p.add_argument("--variants", default="",
                 help="Mosaic rows to time on the masks, e.g. 'ours_mgpu,ours_mgpu_late' "
                 "(default: the current kernel and its A/B variants)")
  p.add_argument("--gather-only", action="store_true",
                 help="time only the dense baselines and the gather rows (Triton and Hopper)")
  p.add_argument("--reps", type=int, default=7, help="timing repeats per kernel (median)")
  p.add_argument("--l2-prefetch", default="",
                 help="extra Mosaic rows with MosaicConfig.l2_prefetch_steps=N, e.g. '2,3'")
  p.add_argument("--time-limit", type=float, default=300.0, help="seconds per part")
  args = p.parse_args()
  args.heads = [int(h) for h in args.heads.split(",")]
  args.scales = [int(s) for s in args.scales.split(",")]
  args.gather_groups = [int(g) for g in args.gather_groups.split(",") if g]
  args.l2_prefetch = [int(n) for n in args.l2_prefetch.split(",") if n]
  args.variants = [v for v in args.variants.split(",") if v]
  args.sched_sweep = [tuple(float(x) for x in t.split(",")) for t in args.sched_sweep.split(";")
                      if t]
  sys.path.insert(0, os.path.dirname(HERE))
  from pallas_kernels.gather import GatherConfig
  args.gather_tiles = [GatherConfig(*map(int, t.split(","))) for t in args.gather_tiles.split(";")]
  from pallas_kernels.colsum import ColsumConfig
  args.colsum_tiles = [ColsumConfig(*map(int, t.split(","))) for t in args.colsum_tiles.split(";")
                       if t]
  from pallas_kernels.colsum_mgpu import ColsumMosaicConfig
  args.colsum_mgpu_tiles = [None if t == "auto" else ColsumMosaicConfig(*map(int, t.split(",")))
                            for t in args.colsum_mgpu_tiles.split(";") if t]
  os.makedirs(args.out, exist_ok=True)
  if args.part == "torch":
    json.dump(torch_part(args), open(os.path.join(args.out, "torch.json"), "w"), indent=1)
    return
  t0 = time.time()
  RJ = jax_part(args)
  json.dump(RJ, open(os.path.join(args.out, "jax.json"), "w"), indent=1)
  log(f"jax part done in {time.time() - t0:.0f} s")
  RT = None
  if args.part == "all":
    cmd = [sys.executable, os.path.abspath(__file__), "--part", "torch", "--out", args.out,
           "--heads", ",".join(map(str, args.heads)), "--scales", ",".join(map(str, args.scales)),
           "--time-limit", str(args.time_limit), "--gap", str(args.gap)]
    rc = subprocess.run(cmd).returncode
    tj = os.path.join(args.out, "torch.json")
    if rc == 0 and os.path.exists(tj):
      RT = json.load(open(tj))
    else:
      log(f"torch part failed (rc={rc})")
  rows, table = merge_and_print(RJ, RT)
  out = dict(jax=RJ, torch=RT, rows=rows, total_s=time.time() - t0)
  json.dump(out, open(os.path.join(args.out, "bench.json"), "w"), indent=1)
  log(table)


if __name__ == "__main__":
  main()
