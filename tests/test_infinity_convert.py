"""convert.infinity: strict key sets, config inference, official load-time fix-ups, shards,
pairing check, CLI round trip into load_infinity."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from convert import infinity as conv
from convert.common import ConversionError
from sparvar_jax import configs
from sparvar_jax.models.infinity import load_infinity
from tests import fixtures


@pytest.fixture(scope="module")
def d32(tmp_path_factory):
  """A random tiny Infinity of the 2B family (32 bits) and its BSQ VAE, as .pth files."""
  return fixtures.tiny_infinity_files(str(tmp_path_factory.mktemp("d32")), seed=0)


@pytest.fixture(scope="module")
def d56(tmp_path_factory):
  """The same for the 8B family (56 bits: 14 channels, 2x2 patchify)."""
  return fixtures.tiny_infinity_files(str(tmp_path_factory.mktemp("d56")), seed=2,
                                      cfg=configs.INFINITY_TINY_D56,
                                      vae_cfg=fixtures.BSQ_TINY_D56)


@pytest.fixture(scope="module")
def sd32(d32):
  return torch.load(d32[0], weights_only=True)


def _save(tmp_path, obj, name="model.pth"):
  p = str(tmp_path / name)
  torch.save(obj, p)
  return p


def _cli(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", "convert.infinity", *args], cwd=root,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_round_trip_and_load(d32, tmp_path):
  out = str(tmp_path / "ckpt")
  seen = []
  p = _cli("--model", d32[0], "--vae", d32[1], "--out", out)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "wrote" in p.stderr
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # atomic: no leftovers
  model, vae, cfgs = load_infinity(out)
  assert cfgs["infinity"].block_chunks == 2 and vae.cfg.codebook_dim == 32
  sd = torch.load(d32[0], weights_only=True)
  np.testing.assert_array_equal(np.asarray(model.blocks.sa.mat_qkv.kernel[...][1]),
                                sd["block_chunks.1.module.0.sa.mat_qkv.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(model.text_proj_for_sos.mat_q[...]),
                                sd["text_proj_for_sos.ca.mat_q"].numpy()[0])
  # End to end on the converted directory: a short schedule, sampled, decoded.
  from sparvar_jax import schedules
  from sparvar_jax.families.infinity import InfinitySampling, infinity_generator
  sch = schedules.custom_schedule([(1, 1), (2, 2)], rope_hw=(64, 64))
  gen = infinity_generator(model, vae, sch, 1, InfinitySampling(cfg=3.0, tau=0.5), text_len=8)
  feats = np.random.default_rng(0).standard_normal((1, 5, 256)).astype(np.float32)
  res = gen(feats, [5], seed=1, progress=lambda si, n, sec: seen.append((si, n)))
  assert res.image_BHW3.shape == (1, 32, 32, 3) and np.isfinite(res.image_BHW3).all()
  assert res.image_BHW3.min() >= 0 and res.image_BHW3.max() <= 1 and res.image_BHW3.std() > 0
  assert [b.shape for b in res.tokens_per_scale] == [(1, 1, 32), (1, 4, 32)]
  meta = json.load(open(os.path.join(out, "config.json")))["meta"]
  assert meta["strict_keys"] and meta["cfg_uncond_rows_in_checkpoint"] == 512
  p = _cli("--model", d32[0], "--vae", d32[1], "--out", out)  # exists, no --overwrite
  assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
  p = _cli("--model", d32[0], "--vae", d32[1], "--out", out, "--overwrite", "--dtype",
           "bfloat16")
  assert p.returncode == 0, p.stderr[-2000:]
  m16, _, _ = load_infinity(out, with_vae=False)  # stored bf16, loaded into fp32 params
  np.testing.assert_array_equal(np.asarray(m16.head.kernel[...]),
                                sd["head.weight"].to(torch.bfloat16).float().numpy().T)
  assert seen == [(0, 2), (1, 2)]


def test_pairing_check_names_the_right_vae(d32, d56):
  with pytest.raises(ConversionError, match="infinity_vae_d32reg.pth"):
    conv.convert_trees(d32[0], d56[1])
  with pytest.raises(ConversionError, match="infinity_vae_d56_f8_14_patchify.pth"):
    conv.convert_trees(d56[0], d32[1])
  trees, cfgs, _ = conv.convert_trees(*d56)  # and the right pair converts
  assert cfgs["infinity"]["d_vae"] == 56 and cfgs["vae"]["apply_spatial_patchify"]


def test_strict_keys(sd32, d32, tmp_path):
  bad = dict(sd32)
  del bad["block_chunks.1.module.0.ca.v_bias"]
  bad["block_chunks.0.module.0.sa.extra"] = torch.zeros(3)
  bad["head.bias"] = torch.zeros(7)
  with pytest.raises(ConversionError) as e:
    conv.convert_trees(_save(tmp_path, bad), d32[1])
  msg = str(e.value)
  assert "missing keys (1)" in msg and "block_chunks.1.module.0.ca.v_bias" in msg
  assert "unexpected keys (1)" in msg and "sa.extra" in msg
  assert "head.bias: expected (64,), found (7,)" in msg
  nz = dict(sd32)
  nz["block_chunks.0.module.0.sa.zero_k_bias"] = torch.ones(256)
  with pytest.raises(ConversionError, match="must be zero"):
    conv.convert_trees(_save(tmp_path, nz, "nz.pth"), d32[1])
  with pytest.raises(ConversionError, match="no 'word_embed.weight'"):
    conv.convert_trees(_save(tmp_path, {"x": torch.zeros(1)}, "x.pth"), d32[1])
  with pytest.raises(ConversionError, match="does not exist"):
    conv.convert_trees(str(tmp_path / "nope.pth"), d32[1])
  with pytest.raises(ConversionError, match="does not exist"):
    conv.convert_trees(d32[0], str(tmp_path / "nope.pth"))


def test_cfg_uncond_padded_or_truncated_as_official(sd32, d32, tmp_path):
  K = sd32["cfg_uncond"].shape[1]
  short = dict(sd32, cfg_uncond=sd32["cfg_uncond"][:300].clone())
  trees, _, meta = conv.convert_trees(_save(tmp_path, short), d32[1])
  u = trees["infinity"]["cfg_uncond"]
  assert u.shape == (512, K) and meta["cfg_uncond_rows_in_checkpoint"] == 300
  np.testing.assert_array_equal(u[:300], sd32["cfg_uncond"][:300].numpy())
  # Rows 300.. come from the official constructor's initialisation.
  init = torch.empty(512, K)
  torch.nn.init.trunc_normal_(init, std=1.2, generator=torch.Generator().manual_seed(0))
  np.testing.assert_array_equal(u[300:], (init / K ** 0.5).numpy()[300:])
  long = dict(sd32, cfg_uncond=torch.cat([sd32["cfg_uncond"], sd32["cfg_uncond"][:100]]))
  trees, _, meta = conv.convert_trees(_save(tmp_path, long, "long.pth"), d32[1])
  np.testing.assert_array_equal(trees["infinity"]["cfg_uncond"], sd32["cfg_uncond"].numpy())
  assert meta["cfg_uncond_rows_in_checkpoint"] == 612


def test_sharded_wrapped_and_flat_layouts_convert_alike(sd32, d32, tmp_path):
  from safetensors.torch import save_file
  ref, _, _ = conv.convert_trees(*d32)
  shards = tmp_path / "infinity_8b_weights"
  shards.mkdir()
  keys = sorted(sd32)
  half = len(keys) // 2
  for i, part in enumerate((keys[:half], keys[half:])):  # bf16 shards, as large releases
    save_file({k: sd32[k].to(torch.bfloat16).contiguous() for k in part},
              str(shards / f"model-{i + 1:05d}-of-00002.safetensors"))
  (shards / "stray.safetensors").write_bytes(b"not named by the index")
  wrapped = _save(tmp_path, {"trainer": {"gpt_fsdp": dict(sd32)}}, "ft.pth")
  # block_chunks=1 layout: blocks.{i}.*
  flat = {(k.replace("block_chunks.", "blocks.").replace(".module.0.", ".")
           if k.startswith("block_chunks.") else k): v for k, v in sd32.items()}
  json.dump({"weight_map": {k: f"model-{1 + (i >= half):05d}-of-00002.safetensors"
                            for i, k in enumerate(keys)}},
            open(shards / "model.safetensors.index.json", "w"))
  trees, _, _ = conv.convert_trees(str(shards), d32[1])
  bad = tmp_path / "incomplete"
  bad.mkdir()
  json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}},
            open(bad / "model.safetensors.index.json", "w"))
  with pytest.raises(ConversionError, match="lacks shards"):
    conv.convert_trees(str(bad), d32[1])
  bf = sd32["head.weight"].to(torch.bfloat16).float().numpy().T
  np.testing.assert_array_equal(trees["infinity"]["head"]["kernel"], bf)
  for path, chunks in ((wrapped, 2), (_save(tmp_path, flat, "flat.pth"), 1)):
    trees, cfgs, _ = conv.convert_trees(path, d32[1])
    assert cfgs["infinity"]["block_chunks"] == chunks
    np.testing.assert_array_equal(trees["infinity"]["cfg_uncond"], ref["infinity"]["cfg_uncond"])
    np.testing.assert_array_equal(trees["infinity"]["head"]["kernel"],
                                  ref["infinity"]["head"]["kernel"])
    np.testing.assert_array_equal(trees["infinity"]["blocks"]["ffn"]["fc2"]["kernel"],
                                  ref["infinity"]["blocks"]["ffn"]["fc2"]["kernel"])


@pytest.mark.parametrize("which", ["2B", "8B"])
def test_rules_fit_the_released_model_sizes(which):
  """The key map produces exactly the parameter tree of the model built from the config."""
  from flax import nnx
  from sparvar_jax import configs
  from sparvar_jax.checkpoint import flatten_tree
  from sparvar_jax.models.infinity import abstract_infinity
  cfg = configs.INFINITY_2B if which == "2B" else configs.INFINITY_8B
  want = {k: tuple(v.shape) for k, v in
          flatten_tree(nnx.to_pure_dict(nnx.state(abstract_infinity(cfg), nnx.Param))).items()}
  got = {}
  for r in conv.infinity_rules(cfg):
    if r.transform is conv.linear_t:
      shape = tuple(reversed(r.shape))
    else:  # the small reshapes: apply them to a stand-in
      shape = r.transform(np.zeros(r.shape, np.float32)).shape
    got["/".join(r.path)] = ((len(r.keys),) if r.stacked else ()) + tuple(shape)
  assert got == want
  n = sum(int(np.prod(s)) for s in want.values())
  print(f"Infinity-{which}: {n / 1e9:.3f}B parameters")
  assert cfg.pool_heads == 16 and cfg.head_dim == 128


def test_cli_usage_errors(tmp_path):
  p = _cli("--vae", "x.pth", "--out", str(tmp_path / "o"))  # --model missing
  assert p.returncode != 0 and "--model" in p.stderr and "Traceback" not in p.stderr
  p = _cli("--model", "m.pth", "--vae", "v.pth", "--out", str(tmp_path / "o"), "--dtype",
           "float8")
  assert p.returncode != 0 and "float8" in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "o").exists()
