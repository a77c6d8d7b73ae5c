"""What the converters do to the file system: --overwrite replaces only a converted
checkpoint that holds none of the inputs, --out is checked before any work, the result
has the umask's modes, SIGINT / SIGTERM / SIGKILL leave no temporary directory behind
(SIGKILL's is removed by the next run), the CLIs are quiet and their --help intact.

The converter used is convert.t5 on Hugging Face-style directories written here with
numpy (config.json, a stand-in spiece.model, model.safetensors): the output machinery is
shared by all three converters (convert/common.py).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from convert import common
from convert import infinity as convert_infinity
from convert import t5 as convert_t5
from convert.common import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_t5_dir(path, vocab=64, d_model=16, d_ff=24, layers=2, heads=2, d_kv=8, seed=0):
  """A random T5 v1.1 encoder as a Hugging Face directory (what convert.t5 reads)."""
  os.makedirs(path, exist_ok=True)
  cfg = dict(model_type="t5", feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
             vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
             num_heads=heads)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(path, "spiece.model"), "wb") as f:
    f.write(b"stand-in: the converter copies the tokenizer without reading it")
  rng = np.random.default_rng(seed)
  rand = lambda *shape: rng.standard_normal(shape, np.float32)
  inner = heads * d_kv
  sd = {"shared.weight": rand(vocab, d_model),
        "encoder.final_layer_norm.weight": rand(d_model),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": rand(32, heads)}
  for i in range(layers):
    b = f"encoder.block.{i}.layer."
    sd.update({b + f"0.SelfAttention.{n}.weight": rand(inner, d_model) for n in "qkv"})
    sd[b + "0.SelfAttention.o.weight"] = rand(d_model, inner)
    sd[b + "0.layer_norm.weight"] = rand(d_model)
    sd[b + "1.layer_norm.weight"] = rand(d_model)
    sd[b + "1.DenseReluDense.wi_0.weight"] = rand(d_ff, d_model)
    sd[b + "1.DenseReluDense.wi_1.weight"] = rand(d_ff, d_model)
    sd[b + "1.DenseReluDense.wo.weight"] = rand(d_model, d_ff)
  save_file(sd, os.path.join(path, "model.safetensors"))
  return str(path)


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
  return hf_t5_dir(tmp_path_factory.mktemp("small") / "hf")


@pytest.fixture(scope="module")
def hf_large(tmp_path_factory):
  """~150 MB of weights: writing them takes long enough (~1 s) to signal the converter
  while orbax is writing."""
  return hf_t5_dir(tmp_path_factory.mktemp("large") / "hf", vocab=32000, d_model=512,
                   d_ff=1024, layers=8, heads=8, d_kv=64)


def _snapshot(root):
  """{relative path: bytes or None for a directory} of everything under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = None
    for f in filenames:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
  return out


def _env():
  """The test environment without JAX_PLATFORMS: the converters choose the CPU themselves."""
  return {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}


def _tmp_dirs(parent, base):
  return sorted(n for n in os.listdir(parent) if n.startswith(base + ".tmp-"))


# ---------------------------------------------------------------------------------------
# --overwrite and --out
# ---------------------------------------------------------------------------------------


def test_overwrite_replaces_a_converted_checkpoint(hf_small, tmp_path):
  from sparvar_jax import checkpoint
  out = str(tmp_path / "ckpt")
  convert_t5.convert(hf_small, out)
  assert json.load(open(os.path.join(out, "config.json")))["format"] == common.FORMAT
  hf2 = hf_t5_dir(tmp_path / "hf2", seed=1)
  convert_t5.convert(hf2, out, overwrite=True)
  assert checkpoint.read_config(out)[1]["source"] == hf2
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(checkpoint.read_tree(out, "t5")["embedding"],
                                load_file(os.path.join(hf2, "model.safetensors"))["shared.weight"])
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf2"]  # nothing left beside it


@pytest.mark.parametrize("case", ["user_folder", "foreign_config_json", "checkpoint_plus_user_file",
                                  "symlink"])
def test_overwrite_refuses_a_folder_that_is_not_a_converted_checkpoint(hf_small, tmp_path,
                                                                       case):
  out = tmp_path / "out"
  if case == "symlink":
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "thesis.tex").write_text("\\chapter{One}")
    out.symlink_to(tmp_path / "target")
    match = "symbolic link"
  elif case == "checkpoint_plus_user_file":
    convert_t5.convert(hf_small, str(out))
    (out / "thesis.tex").write_text("\\chapter{One}")
    match = "also holds thesis.tex"
  else:
    out.mkdir()
    (out / "thesis.tex").write_text("\\chapter{One}")
    if case == "foreign_config_json":  # e.g. a Hugging Face model directory
      (out / "config.json").write_text(json.dumps({"model_type": "t5"}))
      match = "not the one a converter writes"
    else:
      match = "has no config.json"
  before = _snapshot(tmp_path)
  with pytest.raises(ConversionError, match=match) as e:
    convert_t5.convert(hf_small, str(out), overwrite=True)
  assert "--overwrite replaces only" in str(e.value) or case == "symlink"
  assert _snapshot(tmp_path) == before  # nothing touched, no temporary directory


def test_overwrite_refuses_an_out_that_holds_an_input(hf_small, tmp_path):
  """Replacing --out must never delete the inputs: the converted checkpoint holding the
  .pth files, the folder of the inputs, the 8B shard folder or a folder above it."""
  ckpt = tmp_path / "ckpt"
  convert_t5.convert(hf_small, str(ckpt))
  shards = tmp_path / "models" / "infinity_8b_weights"
  shards.mkdir(parents=True)
  (shards / "model-00001-of-00002.safetensors").write_bytes(b"weights")
  vae = tmp_path / "models" / "vae.pth"
  vae.write_bytes(b"vae")
  before = _snapshot(tmp_path)
  for model, out in ((str(shards), shards), (str(shards), tmp_path / "models"),
                     (str(ckpt / "stray.pth"), ckpt)):
    with pytest.raises(ConversionError, match="holds this conversion's input"):
      convert_infinity.convert(model, str(vae), str(out), overwrite=True)
  # convert.t5 with --out above its --hf_dir
  with pytest.raises(ConversionError, match="holds this conversion's input"):
    convert_t5.convert(hf_small, os.path.dirname(hf_small), overwrite=True)
  assert _snapshot(tmp_path) == before


def test_out_is_checked_before_any_input_is_read(tmp_path):
  """An --out that cannot be written fails at once: the error names --out although the
  inputs do not even exist."""
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  missing = str(tmp_path / "missing.pth")
  for out in (blocker / "ckpt", blocker / "deeper" / "ckpt"):
    with pytest.raises(ConversionError, match="is a file, not a directory"):
      convert_infinity.convert(missing, missing, str(out))
  with pytest.raises(ConversionError, match="is a file, not a checkpoint directory"):
    convert_infinity.convert(missing, missing, str(blocker), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway, "
                    "so the refusal cannot be provoked")
def test_read_only_parent_is_refused_before_reading(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(ConversionError, match="cannot write under"):
      convert_t5.convert(str(tmp_path / "no_such_hf_dir"), str(ro / "ckpt"))
  finally:
    ro.chmod(0o755)
  assert os.listdir(ro) == []


def test_output_modes_follow_the_umask(hf_small, tmp_path):
  out = tmp_path / "ckpt"
  mask = os.umask(0o027)
  try:
    convert_t5.convert(hf_small, str(out))
  finally:
    os.umask(mask)
  modes = {}
  for dirpath, dirnames, filenames in os.walk(out):
    for n in dirnames + filenames:
      p = os.path.join(dirpath, n)
      modes[os.path.relpath(p, out)] = (os.path.isdir(p), os.stat(p).st_mode & 0o777)
  modes["."] = (True, os.stat(out).st_mode & 0o777)
  wrong = {p: oct(m) for p, (is_dir, m) in modes.items() if m != (0o750 if is_dir else 0o640)}
  assert not wrong, wrong
  assert {"config.json", "spiece.model", "t5"} <= set(modes)


def test_a_failed_write_is_one_paragraph_and_leaves_nothing(tmp_path):
  """orbax refusing a value (as it would report a full disk: an exception from its writer)
  becomes a ConversionError, with the temporary directory removed."""
  with pytest.raises(ConversionError, match="writing .* failed: ValueError: .*Nothing was "
                     "written"):
    common.write_converted(str(tmp_path / "ckpt"), {"t": {"x": np.array(["a"], dtype=object)}},
                           {})
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------


def _start_and_wait_for_the_writer(hf_dir, out):
  """Starts `python -m convert.t5` and returns once orbax is writing into the temporary
  directory (its `t5.orbax-checkpoint-tmp` exists); fails if the run ends first."""
  p = subprocess.Popen([sys.executable, "-m", "convert.t5", "--hf_dir", hf_dir, "--out", out],
                       cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  parent, base = os.path.split(out)
  deadline = time.time() + 120
  while time.time() < deadline:
    for name in _tmp_dirs(parent, base):
      try:
        if "t5.orbax-checkpoint-tmp" in os.listdir(os.path.join(parent, name)):
          return p
      except FileNotFoundError:
        pass
    if p.poll() is not None:
      break
    time.sleep(0.002)
  p.kill()
  _, err = p.communicate()
  pytest.fail(f"the converter never reached orbax's writer (exit {p.returncode}):\n{err[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_while_writing_leaves_nothing(hf_large, tmp_path, sig):
  out = str(tmp_path / "ckpt")
  p = _start_and_wait_for_the_writer(hf_large, out)
  p.send_signal(sig)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 128 + sig, err
  last = err.strip().splitlines()[-1]
  assert last == (f"interrupted by {sig.name}: the conversion stopped; nothing was written "
                  "and no temporary files are left."), err
  assert "Traceback" not in err
  assert os.listdir(tmp_path) == []  # no checkpoint, no <out>.tmp-*
  time.sleep(0.5)  # orbax's writer threads are gone with the process: nothing reappears
  assert os.listdir(tmp_path) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(hf_large, tmp_path):
  out = str(tmp_path / "ckpt")
  p = _start_and_wait_for_the_writer(hf_large, out)
  p.kill()
  p.communicate()
  left = _tmp_dirs(str(tmp_path), "ckpt")
  assert len(left) == 1, left
  # Look-alikes that are not a dead conversion's: another name, and a directory named
  # by a live process (this one) as a conversion still running would be.
  for name in ("ckpt.tmp-mine", f"ckpt.tmp-{os.getpid()}-abcdefgh"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("keep")
  convert_t5.convert(hf_t5_dir(tmp_path / "hf"), out)
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["ckpt", "hf", "ckpt.tmp-mine", f"ckpt.tmp-{os.getpid()}-abcdefgh"])
  assert common.stale_tmp_dirs(str(tmp_path), "ckpt") == []


# ---------------------------------------------------------------------------------------
# Logging and --help
# ---------------------------------------------------------------------------------------


def test_cli_is_quiet_unless_verbosity_asks(hf_small, tmp_path):
  def run(*extra):
    out = str(tmp_path / f"ckpt{len(extra)}")
    r = subprocess.run([sys.executable, "-m", "convert.t5", "--hf_dir", hf_small, "--out", out,
                        *extra], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return [l for l in r.stderr.splitlines() if l.startswith("I") and "] " in l], r.stderr
  quiet, err = run()
  assert not quiet, err
  assert "Unable to initialize backend" not in err and "wrote" in err
  loud, err = run("--verbosity=0")
  assert any("orbax" in l or "checkpoint" in l for l in loud), err


@pytest.mark.parametrize("module,line", [
    ("convert.var", "--out ckpt/var_d36 \\\n      --overwrite"),
    ("convert.infinity", "--model infinity_8b_weights/ \\\n      --vae"),
    ("convert.t5", "--out /ckpt/flan-t5-xl [--overwrite]\n"),
])
def test_help_shows_the_examples_as_written(module, line):
  r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert "Traceback" not in r.stderr, r.stderr  # (absl's --help exits with 1)
  assert line in r.stdout, r.stdout[:1500]
