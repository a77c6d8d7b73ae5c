"""`python -m sparvar_jax.sample`: the embedded default, a converted checkpoint, bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240, demo="var"):
  """Runs the CLI; without --checkpoint it picks `--demo demo` (None: the bare default)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  if demo is not None and "--checkpoint" not in args:
    args = ("--demo", demo) + args
  return subprocess.run([sys.executable, "-m", "sparvar_jax.sample", *args], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _assert_clean_error(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  assert "Traceback" not in p.stderr, p.stderr[-2000:]
  for n in needles:
    assert n in p.stderr, (n, p.stderr[-2000:])


def test_default_run_writes_grid_report_and_npz(tmp_path):
  out = tmp_path / "samples"
  # The official sampling defaults (top-k 900, top-p 0.96, cfg 1.5) on the default model.
  p = _run("--out", str(out), "--batch", "2", "--save_npz")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "RANDOM" in p.stderr or "random" in p.stderr
  assert "scale 10/10" in p.stderr  # progress per scale
  report = json.loads((out / "report.json").read_text())
  assert report["random_weights"] is True
  assert len(report["seconds"]["per_scale_first_run_incl_compile"]) == 10
  assert report["settings"]["batch"] == 2
  assert report["settings"]["attn_impl"] == "xla"  # auto on a CPU
  assert (out / "grid.png").stat().st_size > 0
  npz = np.load(out / "samples.npz")
  assert npz["image_BHW3"].shape == (2, 256, 256, 3)
  assert 0.0 <= npz["image_BHW3"].min() and npz["image_BHW3"].max() <= 1.0
  assert [npz[f"idx_scale{i}"].shape for i in range(10)] == [(2, pn * pn) for pn in
                                                              (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
  # Same seed: the same tokens again.
  out2 = tmp_path / "again"
  p2 = _run("--out", str(out2), "--batch", "2", "--save_npz")
  assert p2.returncode == 0, p2.stderr[-3000:]
  npz2 = np.load(out2 / "samples.npz")
  for i in range(10):
    np.testing.assert_array_equal(npz[f"idx_scale{i}"], npz2[f"idx_scale{i}"])
  assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left


@pytest.mark.parametrize("args,needles", [
    (["--labels", "3,1000"], ["class ids must be in [0, 1000)", "1000"]),
    (["--labels", "-1"], ["class ids must be in [0, 1000)"]),
    (["--labels", "a,b"], ["--labels must be comma-separated integers"]),
    (["--batch", "0"], ["--batch must be >= 1"]),
    (["--labels", "1,2,3", "--batch", "2"], ["gives 3 ids but --batch is 2"]),
    (["--cfg", "-1"], ["cfg must be"]),
    (["--cfg", "nan"], ["cfg must be"]),
    (["--top_k", "-3"], ["top_k must be >= 0"]),
    (["--top_k", "5000"], ["exceeds the vocabulary size 4096"]),
    (["--top_p", "1.5"], ["top_p must be in [0, 1]"]),
    (["--seed", "4294967296"], ["--seed must be in [0, 2**32)"]),
    (["--seed", "-1"], ["--seed must be in [0, 2**32)"]),
    (["--checkpoint", "/nonexistent/ckpt"], ["does not exist", "convert"]),
    (["--attn_impl", "mosaic"], ["--attn_impl=mosaic needs a GPU and bfloat16", "cpu"]),
    (["--attn_impl", "cudnn"], ["--attn_impl=cudnn needs a GPU and bfloat16"]),
])
def test_bad_input_is_one_clean_paragraph(tmp_path, args, needles):
  out = tmp_path / "o"
  p = _run("--out", str(out), *args)
  _assert_clean_error(p, "error:", *needles)
  assert not (out / "report.json").exists()


def test_unwritable_output(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  p = _run("--out", str(blocker / "sub"))
  _assert_clean_error(p, "cannot write to output folder")


def test_checkpoint_dir_without_config(tmp_path):
  (tmp_path / "ck").mkdir()
  p = _run("--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "ck"))
  _assert_clean_error(p, "config.json")


def test_bare_default_is_the_infinity_demo_on_the_1m_schedule(tmp_path):
  """`python -m sparvar_jax.sample` alone: random tiny Infinity, 13 scales, 1024x1024."""
  out = tmp_path / "demo"
  p = _run("--out", str(out), "--save_npz", demo=None)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "RANDOM weights" in p.stderr and "scale 13/13 (64x64)" in p.stderr
  report = json.loads((out / "report.json").read_text())
  assert report["mode"] == "infinity" and report["random_weights"] is True
  assert report["t5"] is None and "random" in report["text_features"]
  assert report["image_hw"] == [1024, 1024] and len(report["schedule"]) == 13
  npz = np.load(out / "samples.npz")
  assert npz["image_BHW3"].shape == (1, 1024, 1024, 3)
  assert [npz[f"bits_scale{i}"].shape[1] for i in range(13)] == [
      s * s for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)]
  assert (out / "grid.png").exists() and len(list(out.glob("000_*.png"))) == 1


@pytest.mark.parametrize("args,needles", [
    (["--labels", "3"], ["--labels", "only apply to VAR", "--demo var"]),
    (["--t5", "/somewhere"], ["--t5 needs --checkpoint"]),
    (["--demo", "var", "--checkpoint", "/nonexistent"], ["--demo picks the random model"]),
])
def test_demo_flag_misuse(tmp_path, args, needles):
  out = tmp_path / "o"
  p = _run("--out", str(out), *args, demo=None)
  _assert_clean_error(p, "error:", *needles)
  assert not (out / "report.json").exists()


def test_labels_are_checked_against_the_checkpoints_class_count(tmp_path):
  """A converted VAR with 10 classes (convert.var reads the count from class_emb): ids
  outside [0, 10) are refused in one paragraph, not by a traceback from the generator."""
  import torch
  from convert import var as convert_var
  from tests.reference import var_torch
  from tests.reference import var_vqvae_torch
  vae = str(tmp_path / "vae.pth")  # vocab 512, Cvae 32
  torch.save(var_vqvae_torch.randomize_(var_vqvae_torch.VQVAE(vocab_size=512, ch=32), 1)
             .state_dict(), vae)
  torch.manual_seed(0)
  tm = var_torch.VARTorch(vocab_size=512, num_classes=10, depth=1, embed_dim=64, num_heads=1)
  torch.save(tm.state_dict(), tmp_path / "var.pth")
  convert_var.convert(str(tmp_path / "var.pth"), vae, str(tmp_path / "ck"), progress=False)
  p = _run("--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "ck"),
           "--labels", "3,50", "--top_k", "1")
  _assert_clean_error(p, "error:", "class ids must be in [0, 10)", "50")
  assert not (tmp_path / "o" / "report.json").exists()
  # The default top-k (900) exceeds this 512-code vocabulary: refused before any weight is
  # read (no "model:" line), with what to pass instead.
  p = _run("--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "ck"), "--labels", "3")
  _assert_clean_error(p, "top_k=900 exceeds the vocabulary size 512", "--top_k <= 512")
  assert "model:" not in p.stderr
  # A run that loads the checkpoint prints no library INFO logs (orbax's restore, JAX's
  # backend probing: JAX_PLATFORMS left unset here) unless --verbosity asks; top_p 1 is
  # "keep everything", accepted.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = _ROOT
  cmd = [sys.executable, "-m", "sparvar_jax.sample", "--out", str(tmp_path / "ok"),
         "--checkpoint", str(tmp_path / "ck"), "--labels", "3", "--top_k", "1", "--top_p", "1"]
  p = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert p.returncode == 0, p.stderr[-3000:]
  assert not re.search(r"^I\d{4} ", p.stderr, re.M), p.stderr[-3000:]
  assert "Unable to initialize backend" not in p.stderr
  p = subprocess.run(cmd[:4] + [str(tmp_path / "ok2")] + cmd[5:] + ["--verbosity", "0"],
                     cwd=_ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert p.returncode == 0 and re.search(r"^I\d{4} ", p.stderr, re.M), p.stderr[-3000:]


def _run_with_umask(umask, *args):
  # A shell sets the umask: preexec_fn would fork this multithreaded (JAX) process.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  cmd = ["sh", "-c", f'umask {umask:03o} && exec "$0" -m sparvar_jax.sample --demo var "$@"',
         sys.executable, *args]
  return subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_output_folder_is_never_clobbered_silently(tmp_path):
  """A non-empty --out is refused; --overwrite replaces this run's files only; the report
  lists exactly what the run wrote; modes follow the umask; a killed run's temp is removed."""
  out = tmp_path / "o"
  out.mkdir()
  (out / "thesis.tex").write_text("years of work")
  (out / "000_class3.png").write_text("a stale image from another run")
  stale = out / ".sparvar-tmp-000_class3.png.k2j3h"
  stale.write_text("left by a SIGKILLed run")
  p = _run("--out", str(out), "--labels", "3", "--batch", "1", "--top_k", "1")
  _assert_clean_error(p, "is not empty", "thesis.tex", "--overwrite")
  assert (out / "thesis.tex").read_text() == "years of work"
  p = _run_with_umask(0o027, "--out", str(out), "--labels", "3", "--batch", "1", "--top_k", "1",
                      "--overwrite")
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  assert report["files"] == ["000_class3.png", "grid.png", "report.json"]
  assert report["interrupted"] is None
  assert (out / "thesis.tex").read_text() == "years of work"  # not ours: untouched
  assert (out / "000_class3.png").read_bytes()[:4] == b"\x89PNG"  # ours: replaced
  assert not stale.exists()
  for name in report["files"]:
    assert (out / name).stat().st_mode & 0o777 == 0o640, name


def test_failed_run_leaves_nothing(tmp_path):
  """Out of memory (a million images at once) is one paragraph, and the run's folder goes."""
  out = tmp_path / "oom"
  p = _run("--out", str(out), "--batch", "1000000")
  _assert_clean_error(p, "out of memory", "--batch")
  assert not out.exists()


def test_seed_derivation_has_no_overflow_and_is_reported(tmp_path):
  out = tmp_path / "s"
  p = _run("--out", str(out), "--labels", "5", "--batch", "2", "--seed", "4294967295",
           "--save_npz")
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  assert report["seed"] == 4294967295 and "fold_in" in report["key_derivation"]
  npz = np.load(out / "samples.npz")
  # the same label, two keys: two different images
  assert not np.array_equal(npz["idx_scale9"][0], npz["idx_scale9"][1])


def test_sparvar_from_the_cli(tmp_path):
  out = tmp_path / "sv"
  p = _run("--out", str(out), "--batch", "1", "--attention", "sparvar", "--skip_last_scales",
           "1", "--drop_uncond_last_scales", "1")
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  plan = report["attention_plan"]
  assert plan["attention"] == "sparvar" and plan["sparvar"]["decision_scale"] == 7
  assert [s["kind"] for s in plan["scales"][7]] == ["dense_colsum"]  # depth 2: CS4A only
  assert [s["kind"] for s in plan["scales"][8]] == ["cs4a"]
  assert report["loop"] == {"skip_last_scales": 1, "drop_uncond_last_scales": 1}
  assert len(report["seconds"]["per_scale_first_run_incl_compile"]) == 9
  assert "scale  9/9" in p.stderr


@pytest.mark.parametrize("args,needles", [
    (["--sparvar_top_keys", "0.3"], ["--sparvar_top_keys only apply with --attention sparvar"]),
    (["--attention", "sparvar", "--sparvar_top_keys", "0"], ["top_keys must be in (0, 1]"]),
    (["--attention", "sparvar", "--sparvar_decision_scale", "9"],
     ["decision_scale=9 does not fit a schedule of 10 scales"]),
    (["--attention", "sparvar", "--sparvar_csla_windows", "1,2"],
     ["csla_windows has 2 entries but the schedule has 10"]),
    (["--attention", "sparvar", "--sparvar_csla_windows", "a"],
     ["--sparvar_csla_windows must be comma-separated integers"]),
    (["--skip_last_scales", "10"], ["skip_last_scales must be in [0, 9]"]),
    (["--drop_uncond_last_scales", "-1"], ["--drop_uncond_last_scales must be >= 0"]),
    (["--checkpoint", __file__], ["is a file", "python -m convert.var"]),
])
def test_sparvar_and_checkpoint_refusals(tmp_path, args, needles):
  out = tmp_path / "o"
  p = _run("--out", str(out), *args, demo=None if "--checkpoint" in args else "var")
  _assert_clean_error(p, "error:", *needles)
  assert not out.exists()
