"""What the two family runners of the sample CLI share (sample_var.py, sample_infinity.py).

`RunArgs` holds the settings common to both families, checked and explicit (the CLI module
owns the flags and builds it); the helpers here set up JAX, resolve the dtype and attention
implementation, build the attention plan, derive per-image keys, show progress and turn
interruptions into a finished, honest report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from typing import Any

from sparvar_jax.sparse.config import PlanError, SparVARConfig


class UsageError(Exception):
  """Bad command-line input; printed as one paragraph without a traceback."""


class Terminated(BaseException):
  """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  skip_last_scales: int = 0
  drop_uncond_last_scales: int = 0


@dataclasses.dataclass(frozen=True)
class RunArgs:
  """Settings both families take (from the CLI's flags, already parsed and checked)."""
  checkpoint: str | None
  demo: str
  out: str
  overwrite: bool
  seed: int
  batch: int | None
  cfg: str | None
  top_k: int | None  # None: the family's default
  top_p: float | None
  save_npz: bool
  dtype: str  # auto | float32 | bfloat16
  attn_impl: str  # auto | xla | cudnn | mosaic
  attention: str  # dense | sparvar
  sparvar: SparVARConfig | None
  kernels: str
  loop: LoopSettings


def quiet_unless_asked() -> None:
  """Library INFO logs (orbax restoring trees, JAX probing for a TPU) only when --verbosity
  asks for them: absl's own default shows INFO. Call after the flags are parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
      "Out of memory" in text or "out of memory" in text


def cli_main(argv, run_fn, *, on_stop: str, memory_hint: str) -> None:
  """The body of a generation CLI's absl main. Bad input and unreadable checkpoints or
  outputs: one paragraph, exit 2. Ctrl-C / SIGTERM: one line ending in `on_stop`, exit 130 /
  143. Out of memory: one paragraph ending in `memory_hint`, exit 2."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; see --help", file=sys.stderr)
    sys.exit(2)
  quiet_unless_asked()
  from sparvar_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from sparvar_jax.outputs import OutputError  # pylint: disable=g-import-not-at-top
  from sparvar_jax.text import T5LoadError  # pylint: disable=g-import-not-at-top
  try:
    run_fn()
  except (UsageError, CheckpointError, OutputError, T5LoadError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (KeyboardInterrupt, Terminated) as e:
    sig = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
    print(f"stopped ({sig}): {on_stop}", file=sys.stderr)
    sys.exit(143 if isinstance(e, Terminated) else 130)
  except Exception as e:  # pylint: disable=broad-except
    if not out_of_memory(e):
      raise
    print(f"error: out of memory ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
          f"{memory_hint}", file=sys.stderr)
    sys.exit(2)


def setup_jax():
  """Imports JAX with the persistent compilation cache on (`$SPARVAR_COMPILE_CACHE`, default
  ~/.cache/sparvar_jax/xla): a second run of the same shapes compiles nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("SPARVAR_COMPILE_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "sparvar_jax", "xla"))
  try:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  except Exception:  # pylint: disable=broad-except  # an unwritable cache costs compile time only
    pass
  return jax


def resolve_dtype(jax, dtype: str, attn: str):
  """(dtype name, dtype, attention implementation) from --dtype and --attn_impl."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  on_gpu = jax.devices()[0].platform == "gpu"
  name = dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32")
  if attn == "auto":
    # cuDNN stays the default: our Mosaic kernel measured on par end-to-end (Infinity-2B on
    # an H100), and VAR-d16's first call compiles for about a minute with it.
    attn = "cudnn" if (on_gpu and name == "bfloat16") else "xla"
  elif attn in ("cudnn", "mosaic"):
    if not on_gpu or name != "bfloat16":
      raise UsageError(f"--attn_impl={attn} needs a GPU and bfloat16 (this run: "
                       f"{jax.devices()[0].platform}, {name}); use --attn_impl=xla or leave it "
                       "on auto.")
    if attn == "mosaic":
      from pallas_kernels import _compat  # pylint: disable=g-import-not-at-top
      if not _compat.on_hopper():
        raise UsageError(f"--attn_impl=mosaic needs an sm_90 GPU (H100/H200); this is "
                         f"{jax.devices()[0].device_kind}. Use --attn_impl=cudnn.")
  return name, jnp.dtype(name), attn


def check_plan(args: RunArgs, schedule, depth: int) -> None:
  """Refuses, before any work, a SparVAR setting or loop option that does not fit."""
  from sparvar_jax.generate import LoopOptions  # pylint: disable=g-import-not-at-top
  if args.sparvar is not None:
    try:
      args.sparvar.resolve(schedule, depth)
    except PlanError as e:
      raise UsageError(f"--attention sparvar: {e} Adjust the --sparvar_* flags.") from None
  try:
    LoopOptions(**dataclasses.asdict(args.loop)).check(schedule.num_scales)
  except ValueError as e:
    raise UsageError(f"--{str(e)}") from None


def build_plan(args: RunArgs, schedule, depth: int):
  """The attention plan the run asked for (dense, or SparVAR) and the loop options."""
  from sparvar_jax.generate import LoopOptions  # pylint: disable=g-import-not-at-top
  from sparvar_jax.sparse import plan as plan_lib  # pylint: disable=g-import-not-at-top
  check_plan(args, schedule, depth)
  if args.attention == "dense":
    plan = plan_lib.dense_plan(schedule, depth)
  else:
    plan = plan_lib.sparvar_plan(schedule, depth, args.sparvar, kernels=args.kernels)
  return plan, LoopOptions(**dataclasses.asdict(args.loop))


def progress_printer(label: str, scales):
  """Per-scale progress on stderr: '[label] scale  3/13 (6x6):  12.3 ms'."""
  def show(si, k, secs):
    h, w = scales[si]
    prefix = f"[{label}] " if label else ""
    print(f"{prefix}scale {si + 1:2d}/{k} ({h}x{w}): {secs * 1e3:8.1f} ms", file=sys.stderr)
  return show


@contextlib.contextmanager
def sigterm_as_exception():
  """SIGTERM raises `Terminated` in the main thread for the duration (restored after)."""
  def handler(signum, frame):
    del signum, frame
    raise Terminated()
  try:
    old = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def interruption_name(exc: BaseException) -> str:
  return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"


@contextlib.contextmanager
def finishing(out, report: dict, finalize):
  """Runs a generation body. On success, and on Ctrl-C or SIGTERM (the report then says
  `interrupted`), `finalize()` writes what was made and the report; on any other error
  nothing more is written and a folder this run created and left empty is removed."""
  try:
    with sigterm_as_exception():
      yield
  except (KeyboardInterrupt, Terminated) as e:
    report["interrupted"] = interruption_name(e)
    finalize()
    raise
  except BaseException:
    out.discard_if_empty()
    raise
  finalize()


def common_report(args: RunArgs, plan, jax, dtype_name: str, attn_impl: str) -> dict[str, Any]:
  """The settings every report carries: attention plan, loop options, numerics, device."""
  from sparvar_jax.generate import KEY_DERIVATION  # pylint: disable=g-import-not-at-top
  return {
      "attention_plan": plan.describe(),
      "loop": dataclasses.asdict(args.loop),
      "seed": args.seed,
      "key_derivation": KEY_DERIVATION,
      "dtype": dtype_name,
      "attn_impl": attn_impl,
      "device": str(jax.devices()[0]),
  }
