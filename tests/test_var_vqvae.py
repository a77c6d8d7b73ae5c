"""VAR's multi-scale VQVAE: conversion + parity with our PyTorch reference and the official golden."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import common
from convert import vqvae_rules
from sparvar_jax import checkpoint
from sparvar_jax.configs import VAR_PATCH_NUMS, VQVAEConfig
from sparvar_jax.vae import var_vqvae
from tests.conftest import golden_dir
from tests.reference import var_vqvae_torch as ref

PN256 = VAR_PATCH_NUMS[256]


def _convert(path, patch_nums):
  sd = common.load_state_dict(path)
  cfg = vqvae_rules.infer_vqvae_config(sd, patch_nums)
  return cfg, sd, vqvae_rules.convert_vqvae_state_dict(sd, cfg)


def _jax_model(cfg, tree):
  # abstract init (shapes only) then load: concrete random init costs ~10 s on CPU
  model = nnx.eval_shape(lambda: var_vqvae.VQVAE(cfg, rngs=nnx.Rngs(0)))
  want = checkpoint.flatten_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  have = checkpoint.flatten_tree(tree)
  # the key map fills exactly the model's tree
  assert {k: tuple(v.shape) for k, v in have.items()} == {
      k: tuple(v.shape) for k, v in want.items()}
  return checkpoint.load_into(model, tree, what="VQVAE")


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _nhwc(t):
  return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


@nnx.jit
def _encode(model, img):
  return model.img_to_idx(img)


@nnx.jit
def _from_idx(model, idx):
  return model.idx_to_var_input(idx), model.idx_to_img(idx)


def _images(B, size, seed):
  g = torch.Generator().manual_seed(seed)
  x = torch.rand(B, 3, size, size, generator=g) * 2 - 1
  # smooth structure so encodings are not all noise
  return torch.nn.functional.avg_pool2d(x, 9, 1, 4).mul(2.5).clamp(-1, 1)


def _ref_and_jax(tmp_path, ch, seed, patch_nums=PN256, vocab=512):
  tm = ref.randomize_(ref.VQVAE(vocab_size=vocab, ch=ch, patch_nums=patch_nums), seed)
  path = os.path.join(tmp_path, "vae.pth")
  torch.save(tm.state_dict(), path)
  cfg, _, tree = _convert(path, patch_nums)
  assert cfg == VQVAEConfig(vocab_size=vocab, ch=ch, patch_nums=tuple(patch_nums))
  return tm, _jax_model(cfg, tree)


def _parity(tm, jm, B, size, seed):
  img = _images(B, size, seed)
  with torch.no_grad():
    idx_t = tm.img_to_idxBl(img)
    var_in_t = tm.quantize.idxBl_to_var_input(idx_t)
    rec_t = tm.idxBl_to_img(idx_t)
  idx_j = _encode(jm, _nhwc(img))
  for si, (a, b) in enumerate(zip(idx_j, idx_t)):
    np.testing.assert_array_equal(np.asarray(a), b.numpy(), err_msg=f"scale {si}")
  idx_in = [jnp.asarray(i.numpy(), jnp.int32) for i in idx_t]
  var_in_j, rec_j = _from_idx(jm, idx_in)
  rec_t = rec_t.permute(0, 2, 3, 1).numpy()
  assert _rel(var_in_j, var_in_t.numpy()) <= 1e-5
  err = float(np.abs(np.asarray(rec_j) - rec_t).max())
  assert err <= 1e-4, (err, _rel(rec_j, rec_t))
  return err, _rel(rec_j, rec_t), _rel(var_in_j, var_in_t.numpy())


def test_reference_parity_tiny(tmp_path):
  tm, jm = _ref_and_jax(tmp_path, ch=32, seed=1)
  err, rel, rel_in = _parity(tm, jm, B=2, size=256, seed=2)
  print(f"ch=32: recon max abs {err:.2e} rel {rel:.2e}; teacher input rel {rel_in:.2e}")


def test_reference_parity_full_size_ch160(tmp_path):
  """The released architecture (ch=160, 4096 codes) at 256px, batch 1."""
  tm, jm = _ref_and_jax(tmp_path, ch=160, seed=3, vocab=4096)
  err, rel, rel_in = _parity(tm, jm, B=1, size=256, seed=4)
  print(f"ch=160: recon max abs {err:.2e} rel {rel:.2e}; teacher input rel {rel_in:.2e}")


@nnx.jit
def _ar_loop(model, h_list):
  """The sampler's f_hat updates over all scales (static scale index)."""
  B, _, _, C = h_list[0].shape
  H = model.cfg.patch_nums[-1]
  f_hat = jnp.zeros((B, H, H, C), jnp.float32)
  fs, nexts = [], []
  for si, h in enumerate(h_list):
    f_hat, nxt = model.next_autoregressive_input(si, f_hat, h)
    fs.append(f_hat)
    nexts.append(nxt)
  return fs, nexts


def test_next_autoregressive_input_matches_reference(tmp_path):
  """The sampler's per-scale f_hat update, on the 512px schedule (other resize pairs)."""
  pns = VAR_PATCH_NUMS[512]
  tm, jm = _ref_and_jax(tmp_path, ch=32, seed=5, patch_nums=pns)
  g = torch.Generator().manual_seed(6)
  B, C, H = 2, 32, pns[-1]
  idx = [torch.randint(0, 512, (B, pn * pn), generator=g) for pn in pns]
  h_t = [tm.quantize.embedding(i).transpose(1, 2).reshape(B, C, pn, pn) for i, pn in zip(idx, pns)]
  h_j = [jm.embed(jnp.asarray(i.numpy())).reshape(B, pn, pn, C) for i, pn in zip(idx, pns)]
  for a, b in zip(h_j, h_t):
    np.testing.assert_array_equal(np.asarray(a), _nhwc(b))
  fs_j, nexts_j = _ar_loop(jm, h_j)
  f_t = torch.zeros(B, C, H, H)
  for si in range(len(pns)):
    with torch.no_grad():
      f_t, nxt_t = tm.quantize.get_next_autoregressive_input(si, f_t, h_t[si])
    assert _rel(fs_j[si], _nhwc(f_t)) <= 1e-5, si
    if si == len(pns) - 1:
      assert nexts_j[si] is None
    else:
      assert nexts_j[si].shape == (B, pns[si + 1], pns[si + 1], C)
      assert _rel(nexts_j[si], _nhwc(nxt_t)) <= 1e-5, si


def test_golden_var_tiny():
  d = golden_dir("var_tiny")
  meta = json.load(open(os.path.join(d, "meta.json")))
  g = np.load(os.path.join(d, "golden.npz"))
  cfg, sd, tree = _convert(os.path.join(d, "vae_tiny.pth"), meta["patch_nums"])
  assert (cfg.vocab_size, cfg.ch, cfg.z_channels, cfg.share_quant_resi) == (
      meta["V"], meta["ch"], meta["Cvae"], meta["share_quant_resi"])
  assert "quantize.ema_vocab_hit_SV" in sd  # present in the official file, ignored by design
  jm = _jax_model(cfg, tree)
  img = jnp.asarray(g["image_in_B3HW"].transpose(0, 2, 3, 1))
  idx_j = _encode(jm, img)
  n = len(meta["patch_nums"])
  for si in range(n):
    np.testing.assert_array_equal(np.asarray(idx_j[si]), g[f"encode_idx_scale{si}"],
                                  err_msg=f"scale {si}")
  idx_in = [jnp.asarray(g[f"encode_idx_scale{si}"], jnp.int32) for si in range(n)]
  var_in, rec = _from_idx(jm, idx_in)
  assert _rel(var_in, g["teacher_input_BLCv"]) <= 1e-5
  rec_want = g["recon_B3HW_minus1_1"].transpose(0, 2, 3, 1)
  err = float(np.abs(np.asarray(rec) - rec_want).max())
  print(f"golden var_tiny: recon max abs {err:.2e} rel {_rel(rec, rec_want):.2e}, "
        f"teacher input rel {_rel(var_in, g['teacher_input_BLCv']):.2e}")
  assert err <= 1e-4


def test_phi_index_rule():
  # the general float64 rule reproduces the hard-coded released schedule
  ticks = np.linspace(1 / 12, 11 / 12, 4)
  assert tuple(int(np.argmin(np.abs(ticks - si / 9))) for si in range(10)) == \
      var_vqvae.PHI_INDEX_10_SCALES_4
  assert [var_vqvae.phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
  # 14 scales (the 1024 schedule) and K=3 use the other tick formula
  assert [var_vqvae.phi_index(si, 14, 4) for si in range(14)] == \
      [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
  # K=3 ticks are (1/6, 1/2, 5/6); si=3 and si=6 are exact real ties that float64 resolves
  # to the lower conv (the K=4-style ticks (1/9, 1/2, 8/9) would give 1 at si=3).
  assert [var_vqvae.phi_index(si, 10, 3) for si in range(10)] == \
      [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert var_vqvae.phi_index(5, 10, 1) == 0


def test_conversion_errors(tmp_path):
  tm = ref.randomize_(ref.VQVAE(vocab_size=64, ch=32), 0)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  cfg = vqvae_rules.infer_vqvae_config(sd, PN256)
  vqvae_rules.convert_vqvae_state_dict({k: v for k, v in sd.items()
                                        if "ema_vocab" not in k}, cfg)  # buffer optional
  bad = dict(sd)
  del bad["decoder.up.4.attn.2.qkv.weight"]
  bad["decoder.extra.weight"] = np.zeros(3, np.float32)
  bad["post_quant_conv.bias"] = np.zeros(31, np.float32)
  with pytest.raises(common.ConversionError) as e:
    vqvae_rules.convert_vqvae_state_dict(bad, cfg)
  msg = str(e.value)
  assert "decoder.up.4.attn.2.qkv.weight" in msg and "decoder.extra.weight" in msg
  assert "post_quant_conv.bias: expected (32,), found (31,)" in msg
  with pytest.raises(common.ConversionError, match="not a VAR VQVAE"):
    vqvae_rules.infer_vqvae_config({"encoder.conv_in.weight": sd["encoder.conv_in.weight"]}, PN256)


def test_key_maps_import_no_model_code():
  code = ("import sys, convert.vqvae_rules, convert.bsq_rules; "
          "bad = [m for m in sys.modules if m.startswith(('sparvar_jax.vae', 'sparvar_jax.models', "
          "'flax', 'jax', 'pallas_kernels'))]; assert not bad, bad")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
