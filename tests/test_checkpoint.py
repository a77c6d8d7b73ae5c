"""Reading converted checkpoints: a damaged or hand-edited directory is refused in one
paragraph (CheckpointError; the CLI's exit code 2), never with a traceback.

The directories are written with convert.common.write_converted from random trees made
by the converters' own key maps (no PyTorch model, no golden data).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from convert import bsq_rules, common, vqvae_rules
from convert import var as convert_var
from sparvar_jax import checkpoint, configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BSQ_SMALL = configs.BSQVAEConfig(codebook_dim=32, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)


def _random_tree(rules, seed):
  """The tree a conversion writes, from a random state dict of the rules' torch shapes."""
  rng = np.random.default_rng(seed)
  sd = {k: (0.02 * rng.standard_normal(r.shape)).astype(np.float32)
        for r in rules for k in r.keys}
  return common.apply_rules(sd, rules)


@pytest.fixture(scope="module")
def var_ckpt(tmp_path_factory):
  """A converted tiny VAR (transformer + VQVAE, vocabulary 512) with random weights."""
  out = str(tmp_path_factory.mktemp("ck") / "var_tiny")
  var_cfg, vae_cfg = configs.VAR_TINY, configs.VQVAE_TINY
  common.write_converted(
      out, {"var": _random_tree(convert_var.var_rules(var_cfg), 0),
            "vae": _random_tree(vqvae_rules.vqvae_rules(vae_cfg), 1)},
      {"var": configs.config_to_dict(var_cfg), "vae": configs.config_to_dict(vae_cfg)})
  return out


def _copy(src, dst, edit=None):
  shutil.copytree(src, dst)
  if edit:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      raw = json.load(f)
    edit(raw)
    with open(path, "w") as f:
      json.dump(raw, f)
  return str(dst)


def _sample(ckpt, tmp_path):
  """The sampling CLI on `ckpt` (it reads the config, then the trees; greedy, so the
  default top-k cannot exceed the tiny vocabulary and stop it before the trees)."""
  return subprocess.run([sys.executable, "-m", "sparvar_jax.sample", "--checkpoint", ckpt,
                         "--labels", "1", "--top_k", "1", "--out", str(tmp_path / "samples")],
                        cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300)


def _assert_one_paragraph(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr[-3000:]
  err = [l for l in p.stderr.splitlines() if l.strip()]
  assert err[-1].startswith("error: "), p.stderr[-3000:]
  for n in needles:
    assert n in err[-1], (n, err[-1])


@pytest.mark.parametrize("field,value,message", [
    ("depth", 2.5, "VARConfig.depth must be a positive integer, got 2.5"),
    ("depth", "2", "VARConfig.depth must be a positive integer, got '2'"),
    ("depth", True, "VARConfig.depth must be a positive integer, got True"),
    ("num_heads", 0, "VARConfig.num_heads must be a positive integer, got 0"),
    ("patch_nums", [1, 2.0], "VARConfig.patch_nums must be a list of positive integers"),
    ("mlp_ratio", "4", "VARConfig.mlp_ratio must be a finite number, got '4'"),
    ("shared_aln", 0, "VARConfig.shared_aln must be true or false, got 0"),
])
def test_config_fields_of_the_wrong_type_are_refused(var_ckpt, tmp_path, field, value, message):
  d = _copy(var_ckpt, tmp_path / "edited",
            lambda raw: raw["configs"]["var"].__setitem__(field, value))
  with pytest.raises(checkpoint.CheckpointError, match="is malformed") as e:
    checkpoint.read_config(d)
  assert message in str(e.value) and "convert the checkpoint again" in str(e.value)


def test_config_values_that_json_writes_read_back_equal():
  for cfg in (configs.VAR_TINY, configs.VQVAE_TINY, configs.INFINITY_2B, configs.BSQ_D56_PATCHIFY,
              configs.FLAN_T5_XL, configs.var_config(36)):
    assert configs.config_from_dict(json.loads(json.dumps(configs.config_to_dict(cfg)))) == cfg


def test_vae_of_the_other_family_is_refused(var_ckpt, tmp_path):
  """A VAR transformer with Infinity's BSQ VAE (its tree matching its config), and an
  Infinity config with VAR's VQVAE: refused when the config is read."""
  d = str(tmp_path / "mixed")
  shutil.copytree(var_ckpt, d)
  shutil.rmtree(os.path.join(d, "vae"))
  common.write_converted(os.path.join(tmp_path, "bsq"),
                         {"vae": _random_tree(bsq_rules.bsq_rules(BSQ_SMALL), 2)},
                         {"vae": configs.config_to_dict(BSQ_SMALL)})
  shutil.move(os.path.join(tmp_path, "bsq", "vae"), os.path.join(d, "vae"))
  with open(os.path.join(d, "config.json")) as f:
    raw = json.load(f)
  raw["configs"]["vae"] = configs.config_to_dict(BSQ_SMALL)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(raw, f)
  with pytest.raises(checkpoint.CheckpointError, match="pairs its VAR transformer with a "
                     "BSQVAEConfig VAE; VAR needs the multi-scale VQVAE"):
    checkpoint.read_config(d)
  raw["configs"] = {"infinity": configs.config_to_dict(configs.INFINITY_TINY_D32),
                    "vae": configs.config_to_dict(configs.VQVAE_TINY)}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(raw, f)
  with pytest.raises(checkpoint.CheckpointError, match="Infinity needs the BSQ VAE.*"
                     "python -m convert.infinity"):
    checkpoint.read_config(d)


def _damage(tree_dir):
  """Truncates every data file of an orbax tree to half its size."""
  n = 0
  for dirpath, _, filenames in os.walk(tree_dir):
    if os.path.basename(dirpath) == "d":
      for name in filenames:
        path = os.path.join(dirpath, name)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        n += 1
  assert n, f"no data files under {tree_dir}"


@pytest.mark.parametrize("case", ["bad_field", "other_family", "damaged_tree"])
def test_sample_cli_refuses_a_broken_checkpoint_in_one_paragraph(var_ckpt, tmp_path, case):
  """Through the CLI: one paragraph and exit code 2. The damaged case hits the VQVAE (~300
  arrays read concurrently): when one read fails, the others still in flight end on orbax's
  closed event loop, which Python reports as "Event loop is closed" tracebacks unless
  checkpoint.read_tree drops them."""
  if case == "bad_field":
    d = _copy(var_ckpt, tmp_path / "ck",
              lambda raw: raw["configs"]["var"].__setitem__("depth", 2.5))
    needles = ("is malformed", "VARConfig.depth must be a positive integer, got 2.5")
  elif case == "other_family":
    d = _copy(var_ckpt, tmp_path / "ck", lambda raw: raw["configs"].__setitem__(
        "vae", configs.config_to_dict(BSQ_SMALL)))
    needles = ("pairs its VAR transformer with a BSQVAEConfig VAE",)
  else:
    d = _copy(var_ckpt, tmp_path / "ck")
    _damage(os.path.join(d, "vae"))
    needles = ("could not read", "The directory is damaged; convert again.")
  _assert_one_paragraph(_sample(d, tmp_path), *needles)
