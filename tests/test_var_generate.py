"""The whole VAR path against the official implementation's own outputs.

Official checkpoint files (random weights) -> `convert.var` -> `load_var` -> greedy CFG
generation: identical token indices at every scale and the same image as the official
`autoregressive_infer_cfg` produced (../shared/golden/var_tiny).
"""

import json
import os

import numpy as np
import pytest

from tests.conftest import golden_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from convert import var as convert_var
  g = golden_dir("var_tiny")
  out = str(tmp_path_factory.mktemp("ck") / "var_tiny")
  convert_var.convert(os.path.join(g, "var_tiny.pth"), os.path.join(g, "vae_tiny.pth"), out)
  return g, out


def test_greedy_cfg_matches_official(converted):
  from sparvar_jax.families.var import VARSampling, var_generator
  from sparvar_jax.models.var import load_var
  g, out = converted
  meta = json.load(open(os.path.join(g, "meta.json")))
  gold = np.load(os.path.join(g, "golden.npz"))
  s = meta["sampling"]
  var, vae = load_var(out)
  gen = var_generator(var, vae, batch=s["batch"],
                     settings=VARSampling(cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"],
                                          more_smooth=s["more_smooth"]))
  res = gen(np.asarray(s["labels"]), seed=0)
  for si, idx in enumerate(res.tokens_per_scale):
    np.testing.assert_array_equal(idx, gold[f"greedy_idx_scale{si}"], err_msg=f"scale {si}")
  ref_img = gold["greedy_cfg1p5_image_B3HW_0_1"].transpose(0, 2, 3, 1)
  err = np.abs(res.image_BHW3 - ref_img).max()
  assert err <= 1e-4, err


def _torch_greedy_cfg(var_t, vae_t, labels, cfg):
  """Our PyTorch statement of the official `autoregressive_infer_cfg` with top-k 1."""
  import torch
  B = len(labels)
  K = len(var_t.patch_nums)
  with torch.no_grad():
    label_B = torch.tensor(labels)
    cond_BD = var_t.class_emb(torch.cat([label_B, torch.full_like(label_B, var_t.num_classes)]))
    x = var_t.first_input(cond_BD)
    pn_last = var_t.patch_nums[-1]
    f_hat = torch.zeros(B, var_t.Cvae, pn_last, pn_last)
    var_t.kv_caching(True)
    idx_list = []
    for si, pn in enumerate(var_t.patch_nums):
      t = cfg * si / (K - 1)
      logits = var_t.scale_forward(x, cond_BD)
      logits = (1 + t) * logits[:B] - t * logits[B:]
      idx = logits.argmax(-1)
      idx_list.append(idx.numpy())
      h = vae_t.quantize.embedding(idx).transpose(1, 2).reshape(B, var_t.Cvae, pn, pn)
      f_hat, nxt = vae_t.quantize.get_next_autoregressive_input(si, f_hat, h)
      if si != K - 1:
        x = var_t.next_input(si + 1, nxt.view(B, var_t.Cvae, -1).transpose(1, 2))
        x = x.repeat(2, 1, 1)
    var_t.kv_caching(False)
    img = vae_t.fhat_to_img(f_hat).add(1).mul(0.5)
  return idx_list, img.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shared_aln", [False, True])
def test_greedy_cfg_matches_torch_reference(tmp_path, shared_aln):
  """Random weights in the official format -> convert -> greedy CFG 4 loop, against our
  PyTorch reference of the whole loop (VAR + VQVAE): same tokens, same image."""
  import torch
  from convert import var as convert_var
  from sparvar_jax.families.var import VARSampling, var_generator
  from sparvar_jax.models.var import load_var
  from tests.reference import var_torch, var_vqvae_torch
  torch.manual_seed(0)
  var_t = var_torch.randomize_(var_torch.VARTorch(vocab_size=512, depth=2, embed_dim=128,
                                                   num_heads=2, shared_aln=shared_aln), seed=1)
  vae_t = var_vqvae_torch.randomize_(var_vqvae_torch.VQVAE(vocab_size=512, ch=32), seed=2)
  torch.save(var_t.state_dict(), tmp_path / "var.pth")
  torch.save(vae_t.state_dict(), tmp_path / "vae.pth")
  convert_var.convert(str(tmp_path / "var.pth"), str(tmp_path / "vae.pth"),
                      str(tmp_path / "ck"), progress=False)
  labels = [5, 999, 0]
  ref_idx, ref_img = _torch_greedy_cfg(var_t, vae_t, labels, cfg=4.0)
  var, vae = load_var(str(tmp_path / "ck"))
  assert var.cfg.shared_aln == shared_aln
  res = var_generator(var, vae, batch=3, settings=VARSampling(cfg=4.0, top_k=1, top_p=0.0))(
      labels, seed=0)
  for si, (a, b) in enumerate(zip(res.tokens_per_scale, ref_idx)):
    np.testing.assert_array_equal(a, b, err_msg=f"scale {si}")
  assert len(set(np.concatenate([i.ravel() for i in ref_idx]).tolist())) > 5  # not degenerate
  assert np.abs(res.image_BHW3 - ref_img).max() <= 1e-4


def test_more_smooth_and_top_p_paths_run(tmp_path):
  """The Gumbel (`more_smooth`) and top-k/top-p paths on a converted random VAR: finite
  images, the same for the same seed, different for another."""
  import torch
  from convert import var as convert_var
  from sparvar_jax.families.var import VARSampling, var_generator
  from sparvar_jax.models.var import load_var
  from tests.reference import var_torch, var_vqvae_torch
  torch.save(var_torch.randomize_(var_torch.VARTorch(vocab_size=512, depth=2, embed_dim=128,
                                                     num_heads=2), seed=3).state_dict(),
             tmp_path / "var.pth")
  torch.save(var_vqvae_torch.randomize_(var_vqvae_torch.VQVAE(vocab_size=512, ch=32), seed=4)
             .state_dict(), tmp_path / "vae.pth")
  convert_var.convert(str(tmp_path / "var.pth"), str(tmp_path / "vae.pth"),
                      str(tmp_path / "ck"), progress=False)
  var, vae = load_var(str(tmp_path / "ck"))
  gen = var_generator(var, vae, batch=2,
                     settings=VARSampling(cfg=1.5, top_k=50, top_p=0.9, more_smooth=True))
  a = gen([1, 2], seed=3)
  b = gen([1, 2], seed=3)
  c = gen([1, 2], seed=4)
  assert np.isfinite(a.image_BHW3).all()
  np.testing.assert_array_equal(a.image_BHW3, b.image_BHW3)
  assert np.abs(a.image_BHW3 - c.image_BHW3).max() > 0


def test_more_smooth_uses_the_filtered_logits():
  """The official sampler filters `logits_BlV` in place (masked_fill_), so the Gumbel
  (`more_smooth`) embedding only mixes codes that survive top-k/top-p. With top-k 1 the
  soft weights are one-hot at the argmax: more_smooth must give the greedy result."""
  from flax import nnx
  from sparvar_jax import configs
  from sparvar_jax.families.var import VARSampling, var_generator
  from sparvar_jax.models.var import VAR
  from sparvar_jax.vae.var_vqvae import VQVAE
  import dataclasses
  pns = (1, 2, 3, 4)  # a short schedule keeps the 2 x 4 compiled steps fast
  var = VAR(dataclasses.replace(configs.VAR_TINY, patch_nums=pns), rngs=nnx.Rngs(0))
  vae = VQVAE(configs.VQVAEConfig(vocab_size=512, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                  patch_nums=pns), rngs=nnx.Rngs(1))
  greedy = var_generator(var, vae, batch=2, settings=VARSampling(cfg=2.0, top_k=1, top_p=0.0))
  smooth = var_generator(var, vae, batch=2,
                        settings=VARSampling(cfg=2.0, top_k=1, top_p=0.0, more_smooth=True))
  a, b = greedy([3, 7], seed=0), smooth([3, 7], seed=0)
  for si, (ia, ib) in enumerate(zip(a.tokens_per_scale, b.tokens_per_scale)):
    np.testing.assert_array_equal(ia, ib, err_msg=f"scale {si}")
  np.testing.assert_array_equal(a.image_BHW3, b.image_BHW3)
