"""`python -m convert.var`: round trips from torch.save'd state dicts and every error path."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import var as convert_var
from convert.common import ConversionError
from sparvar_jax import checkpoint, configs
from sparvar_jax.models.var import load_var
from tests.conftest import golden_dir
from tests.reference import var_vqvae_torch as vqvae_torch
from tests.test_var_model import TINY, inputs, rel_err, torch_teacher, torch_var

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
  """A random VQVAE (vocab 512, Cvae 32, ch 32: the tiny VAR's) saved with torch.save."""
  path = str(tmp_path_factory.mktemp("vae") / "vae_tiny_random.pth")
  torch.save(vqvae_torch.randomize_(vqvae_torch.VQVAE(vocab_size=512, ch=32), 5).state_dict(),
             path)
  return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny VAR (vocab 512: fits the golden tiny VQVAE) saved with torch.save."""
  tm = torch_var(TINY, seed=11)
  path = str(tmp_path_factory.mktemp("var") / "var_tiny_random.pth")
  torch.save(tm.state_dict(), path)
  return tm, path


def _save_sd(tmp_path, sd, name="var.pth"):
  path = str(tmp_path / name)
  torch.save(sd, path)
  return path


def _leftovers(parent, out_name):
  return [n for n in os.listdir(parent) if n.startswith(out_name)]


def test_cli_round_trip(tiny, vae_path, tmp_path):
  tm, var_path = tiny
  out = tmp_path / "ckpt"
  # JAX_PLATFORMS unset: the converter picks the CPU itself, without probing for a TPU.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  r = subprocess.run([sys.executable, "-m", "convert.var", f"--var={var_path}",
                      f"--vae={vae_path}", f"--out={out}"], cwd=REPO, capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "converting VAR checkpoint" in r.stderr  # progress shown
  # Quiet: no absl INFO lines (orbax logs ~50 per conversion), no backend probing.
  assert not [l for l in r.stderr.splitlines() if l.startswith("I") and "] " in l], r.stderr
  assert "Unable to initialize backend" not in r.stderr
  cfgs, meta = checkpoint.read_config(str(out))
  assert cfgs["var"] == TINY
  assert (cfgs["vae"].vocab_size, cfgs["vae"].z_channels) == (512, 32)
  assert cfgs["vae"].patch_nums == TINY.patch_nums
  assert meta["source"]["var"] == "var_tiny_random.pth"
  var, vae = load_var(str(out))
  labels, x = inputs(TINY, 2, seed=12)
  out_logits = var.teacher_forward(jnp.asarray(labels), jnp.asarray(x))
  assert rel_err(out_logits, torch_teacher(tm, labels, x)) <= 1e-5
  # the VQVAE got every weight of its file (all but the ignored EMA statistic)
  vae_sd = torch.load(vae_path, weights_only=True)
  n_file = sum(v.numel() for k, v in vae_sd.items() if k != "quantize.ema_vocab_hit_SV")
  n_model = sum(int(np.size(a)) for a in jax.tree.leaves(nnx.state(vae, nnx.Param)))
  assert n_model == n_file


def test_golden_var_tiny_via_converted_directory(tmp_path):
  d = golden_dir("var_tiny")
  out = str(tmp_path / "golden_ckpt")
  var_cfg, _ = convert_var.convert(os.path.join(d, "var_tiny.pth"),
                                   os.path.join(d, "vae_tiny.pth"), out, progress=False)
  assert var_cfg == TINY
  var, _ = load_var(out)
  g = np.load(os.path.join(d, "golden.npz"))
  logits = var.teacher_forward(jnp.asarray(g["labels_B"]), jnp.asarray(g["teacher_input_BLCv"]))
  assert rel_err(logits, g["teacher_logits_BLV"]) <= 1e-5


def test_overwrite(tiny, vae_path, tmp_path):
  """An existing --out needs --overwrite, which replaces a converted checkpoint (and
  refuses any other folder: tests/test_convert_output.py)."""
  out = tmp_path / "ckpt"
  cfg_small = dataclasses.replace(TINY, depth=1)
  small = _save_sd(tmp_path, torch_var(cfg_small, seed=3).state_dict(), "var_d1.pth")
  convert_var.convert(small, vae_path, str(out), progress=False)
  assert checkpoint.read_config(str(out))[0]["var"] == cfg_small
  with pytest.raises(ConversionError, match="already exists.*--overwrite"):
    convert_var.convert(tiny[1], vae_path, str(out), progress=False)
  assert checkpoint.read_config(str(out))[0]["var"] == cfg_small
  convert_var.convert(tiny[1], vae_path, str(out), overwrite=True, progress=False)
  assert checkpoint.read_config(str(out))[0]["var"] == TINY
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "var_d1.pth"]  # the old one is gone


def _expect_error(var_path, vae_path, tmp_path, match):
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=match) as e:
    convert_var.convert(var_path, vae_path, str(out), progress=False)
  assert not out.exists() and not _leftovers(tmp_path, "out")  # nothing half-written
  return str(e.value)


def test_missing_file(tiny, vae_path, tmp_path):
  _expect_error(str(tmp_path / "nope.pth"), vae_path, tmp_path, "not found")
  _expect_error(tiny[1], str(tmp_path / "no_vae.pth"), tmp_path, "not found")


def test_truncated_file(tiny, vae_path, tmp_path):
  data = open(tiny[1], "rb").read()
  bad = tmp_path / "trunc.pth"
  bad.write_bytes(data[:len(data) // 2])
  _expect_error(str(bad), vae_path, tmp_path, "corrupt|truncated|not a PyTorch zip")
  bad.write_bytes(b"\x00" * 1000)
  _expect_error(str(bad), vae_path, tmp_path, "not a PyTorch zip")


class _Payload:  # any class: unpickling it would need arbitrary code

  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_non_weights_pickle_is_refused(vae_path, tmp_path):
  path = _save_sd(tmp_path, {"head.weight": torch.zeros(2), "x": _Payload()})
  msg = _expect_error(path, vae_path, tmp_path, "safely")
  assert "weights_only" in msg


def test_missing_and_unexpected_keys_are_listed(tiny, vae_path, tmp_path):
  sd = dict(tiny[0].state_dict())
  del sd["blocks.1.attn.proj.bias"]
  del sd["blocks.0.ffn.fc2.weight"]
  sd["blocks.0.attn.extra"] = torch.zeros(3)
  msg = _expect_error(_save_sd(tmp_path, sd), vae_path, tmp_path, "missing keys")
  assert "blocks.1.attn.proj.bias" in msg and "blocks.0.ffn.fc2.weight" in msg
  assert "unexpected keys (1)" in msg and "blocks.0.attn.extra" in msg


def test_wrong_shape_is_shown(tiny, vae_path, tmp_path):
  sd = dict(tiny[0].state_dict())
  sd["blocks.1.attn.q_bias"] = torch.zeros(127)
  msg = _expect_error(_save_sd(tmp_path, sd), vae_path, tmp_path, "shape mismatches")
  assert "blocks.1.attn.q_bias: expected (128,), found (127,)" in msg


def test_bad_buffer_is_refused(tiny, vae_path, tmp_path):
  sd = dict(tiny[0].state_dict())
  sd["blocks.0.attn.zero_k_bias"] = torch.ones(128)
  _expect_error(_save_sd(tmp_path, sd), vae_path, tmp_path, "zero_k_bias is not zero")


def test_unknown_schedule_lists_supported_lengths(tiny, vae_path, tmp_path):
  sd = dict(tiny[0].state_dict())
  sd["pos_1LC"] = torch.zeros(1, 100, 128)
  msg = _expect_error(_save_sd(tmp_path, sd), vae_path, tmp_path, "100 positions")
  assert "680" in msg and "2240" in msg


def test_not_a_var_checkpoint(vae_path, tmp_path):
  # the VQVAE file passed as --var
  _expect_error(vae_path, vae_path, tmp_path, "blocks.N")


def test_mismatched_vae(vae_path, tmp_path):
  cfg = dataclasses.replace(TINY, vocab_size=256)
  path = _save_sd(tmp_path, torch_var(cfg, seed=13).state_dict())
  msg = _expect_error(path, vae_path, tmp_path, "does not match the transformer")
  assert "vocabulary 512" in msg and "vocabulary 256" in msg


def test_unwritable_out(tiny, vae_path, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  out = blocker / "ckpt"  # parent is a file: cannot be created
  with pytest.raises(ConversionError, match="cannot write|writable"):
    convert_var.convert(tiny[1], vae_path, str(out), progress=False)
  assert blocker.read_text() == "x"
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_cli_error_is_one_paragraph_exit_2(vae_path, tmp_path):
  r = subprocess.run([sys.executable, "-m", "convert.var", f"--var={tmp_path / 'x.pth'}",
                      f"--vae={vae_path}", f"--out={tmp_path / 'o'}"], cwd=REPO,
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2
  assert r.stderr.splitlines()[-1].startswith("error: checkpoint file not found")
  assert "Traceback" not in r.stderr
  r = subprocess.run([sys.executable, "-m", "convert.var", "--var=a.pth"], cwd=REPO,
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and "missing --vae, --out" in r.stderr
  assert "Traceback" not in r.stderr


def test_config_inference_for_released_shapes():
  """Shapes alone give the released configs (no tensors needed beyond their shapes)."""
  for depth in configs.VAR_DEPTHS:
    cfg = configs.var_config(depth)
    C, hid, L = cfg.embed_dim, cfg.mlp_hidden, cfg.seq_len
    shapes = {"class_emb.weight": (1001, C), "head.weight": (4096, C),
              "word_embed.weight": (C, 32), "pos_1LC": (1, L, C),
              "blocks.0.ffn.fc1.weight": (hid, C), "blocks.0.attn.scale_mul_1H11": (1, depth, 1, 1)}
    shapes.update({f"blocks.{i}.attn.q_bias": (C,) for i in range(depth)})
    if cfg.shared_aln:
      shapes["shared_ada_lin.1.weight"] = (6 * C, C)
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert convert_var.infer_var_config(sd) == cfg, depth
    keys = [k for r in convert_var.var_rules(cfg) for k in r.keys]
    assert len(keys) == len(set(keys))
    assert ("blocks.0.ada_gss" in keys) == cfg.shared_aln


def test_overwrite_refuses_an_out_path_that_is_a_file(tiny, vae_path, tmp_path):
  """--overwrite replaces a checkpoint directory, never a file: refused up front in one
  paragraph (not a NotADirectoryError traceback after the whole conversion)."""
  out = tmp_path / "notes.txt"
  out.write_text("keep me")
  with pytest.raises(ConversionError, match="is a file"):
    convert_var.convert(tiny[1], vae_path, str(out), overwrite=True, progress=False)
  from convert import common
  with pytest.raises(ConversionError, match="is a file"):  # every converter's writer too
    common.write_converted(str(out), {"var": {"x": np.zeros(2, np.float32)}}, {},
                           overwrite=True)
  assert out.read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no temporary directory left
