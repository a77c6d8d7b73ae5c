"""Infinity's BSQ autoencoder: conversion (both key forms), parity with our PyTorch reference
(2B family stride 16, 8B family stride 8 + patchify) and with the official golden outputs."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from convert import bsq_rules
from convert import common
from sparvar_jax import checkpoint
from sparvar_jax.configs import BSQVAEConfig
from sparvar_jax.vae import bsq
from tests.conftest import golden_dir
from tests.reference import bsq_vae_torch as ref

FAMILIES = {  # tiny stand-ins: (config, patch_size, token schedule, image side)
    "d32": (BSQVAEConfig(codebook_dim=32, base_ch=32, ch_mult=(1, 2, 4, 4, 4)), 16,
            [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)], 128),
    "d56_patchify": (BSQVAEConfig(codebook_dim=14, base_ch=32, ch_mult=(1, 2, 4, 4),
                                  apply_spatial_patchify=True), 8,
                     [(1, 1), (2, 2), (3, 3), (4, 4)], 64),
}
SCHED_1M = [(p, p) for p in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)]


def _load(cfg, tree):
  model = nnx.eval_shape(lambda: bsq.BSQVAE(cfg, rngs=nnx.Rngs(0)))  # shapes only, then load
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert ({k: v.shape for k, v in checkpoint.flatten_tree(tree).items()}
          == {k: v.shape for k, v in checkpoint.flatten_tree(want).items()})
  return checkpoint.load_into(model, tree, what="BSQ VAE")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nhwc(t):
  return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


@nnx.jit
def _decode(model, z):
  return model.decode(z)


@nnx.jit
def _encode(model, img):
  return model.encode(img)


@nnx.jit(static_argnums=2)
def _multiscale(model, raw, vae_hws):
  return model.quantize_multiscale(raw, vae_hws)


@nnx.jit(static_argnums=2)
def _teacher_forcing(model, raw, vae_hws):
  return model.teacher_forcing_input(raw, vae_hws)


def _accumulate(model, bits_list, token_hws):
  """Our sampler path: token bits [B, h*w, K] per scale -> (summed, next inputs); jitted."""
  return _accumulate_jit(model, [jnp.asarray(b) for b in bits_list], tuple(map(tuple, token_hws)))


@nnx.jit(static_argnums=2)
def _accumulate_jit(model, bits_list, token_hws):
  B = bits_list[0].shape[0]
  H, W = model.vae_hw(token_hws[-1])
  summed = jnp.zeros((B, H, W, model.cfg.codebook_dim), jnp.float32)
  nexts = []
  n = len(token_hws)
  for si, ((h, w), bits) in enumerate(zip(token_hws, bits_list)):
    codes = model.bits_to_codes(bits.reshape(B, h, w, -1))
    summed = model.add_scale_codes(summed, codes, si, is_last=(si == n - 1))
    if si < n - 1:
      nexts.append(model.next_scale_input(summed, token_hws[si + 1]))
  return summed, nexts


def _ref_model(name, seed):
  cfg, patch, _, _ = FAMILIES[name]
  tm = ref.AutoEncoder(cfg.codebook_dim, cfg.base_ch, cfg.ch_mult, cfg.num_res_blocks, patch)
  return cfg, ref.randomize_(tm, seed)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reference_parity(name, tmp_path):
  cfg, tm = _ref_model(name, seed=11)
  _, _, token_hws, side = FAMILIES[name]
  patchify = cfg.apply_spatial_patchify
  vae_hws = [(h * (1 + patchify), w * (1 + patchify)) for h, w in token_hws]
  path = os.path.join(tmp_path, "vae.pth")
  torch.save({"vae": tm.state_dict()}, path)  # the official wrapped form, mask twice
  sd = common.load_state_dict(path, wrappers=("vae",))
  assert "quantize.lfq.mask" in sd and "quantizer.lfq.mask" in sd
  assert bsq_rules.infer_bsq_config(sd) == cfg
  jm = _load(cfg, bsq_rules.convert_bsq_state_dict(sd))

  g = torch.Generator().manual_seed(12)
  img = F.avg_pool2d(torch.rand(2, 3, side, side, generator=g) * 2 - 1, 5, 1, 2) * 2
  with torch.no_grad():
    raw_t = tm.encoder(img)
    x_t, labels_t = ref.flip_requant(tm, vae_hws, raw_t, patchify)
  raw_j = _encode(jm, _nhwc(img))
  assert _rel(raw_j, _nhwc(raw_t)) <= 1e-5
  x_j, labels_j = _teacher_forcing(jm, _nhwc(raw_t), tuple(vae_hws))
  assert _rel(x_j, x_t.numpy()) <= 1e-5
  for a, b in zip(labels_j, labels_t):
    np.testing.assert_array_equal(np.asarray(a), b.numpy())
  bits_j, summed_q = _multiscale(jm, _nhwc(raw_t), tuple(vae_hws))  # MultiScaleBSQ.forward
  with torch.no_grad():
    summed_q_t = ref.multiscale_bsq_quantized(tm, vae_hws, raw_t)
  assert _rel(summed_q, _nhwc(summed_q_t)) <= 1e-6
  for a, b in zip(bits_j, labels_t):
    tok = jm.vae_grid_to_tokens(a)
    np.testing.assert_array_equal(np.asarray(tok).reshape(b.shape), b.numpy())

  # sampler path from random bits, then decode
  bits = [torch.randint(0, 2, (2, h * w, cfg.bits_per_token), generator=g) for h, w in token_hws]
  with torch.no_grad():
    summed_t, nexts_t = ref.sampler_accumulate(tm, bits, vae_hws, patchify)
    img_t = tm.decode(summed_t)
  summed_j, nexts_j = _accumulate(jm, [b.numpy() for b in bits], token_hws)
  assert _rel(summed_j, _nhwc(summed_t)) <= 1e-6
  for a, b in zip(nexts_j, nexts_t):
    assert a.shape == tuple(b.shape) and _rel(a, b.numpy()) <= 1e-6
  img_j = _decode(jm, summed_j)
  err = float(np.abs(np.asarray(img_j) - _nhwc(img_t)).max())
  print(f"{name}: decode max abs {err:.2e} rel {_rel(img_j, _nhwc(img_t)):.2e}; "
        f"raw features rel {_rel(raw_j, _nhwc(raw_t)):.2e}")
  assert err <= 1e-4


def test_plain_and_wrapped_keys_convert_alike():
  cfg, tm = _ref_model("d32", seed=13)
  wrapped = {k: v.numpy() for k, v in tm.state_dict().items()}
  plain = {}
  for k, v in wrapped.items():
    for suf in (".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias"):
      if k.endswith(suf):
        k = k[: -len(suf)] + suf[suf.rindex("."):]
        break
    plain[k] = v
  assert "encoder.down.0.downsample.conv.weight" in plain and "encoder.conv_in.weight" in plain
  assert bsq_rules.infer_bsq_config(plain) == cfg
  a = checkpoint.flatten_tree(bsq_rules.convert_bsq_state_dict({"vae": wrapped}))
  b = checkpoint.flatten_tree(bsq_rules.convert_bsq_state_dict(plain))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # errors: both forms at once, a missing tensor, a bad mask
  both = dict(wrapped, **{"encoder.conv_in.weight": plain["encoder.conv_in.weight"]})
  with pytest.raises(common.ConversionError, match="both the plain and the wrapped"):
    bsq_rules.convert_bsq_state_dict(both, cfg)
  missing = dict(wrapped)
  del missing["decoder.up.2.block.1.conv2.conv.bias"]
  with pytest.raises(common.ConversionError, match=r"decoder\.up\.2\.block\.1\.conv2\.conv\.bias"):
    bsq_rules.convert_bsq_state_dict(missing, cfg)
  bad_mask = dict(wrapped, **{"quantizer.lfq.mask": np.arange(32)})
  with pytest.raises(common.ConversionError, match="bit mask"):
    bsq_rules.infer_bsq_config(bad_mask)
  with pytest.raises(common.ConversionError, match="not an Infinity"):
    bsq_rules.infer_bsq_config({"foo": np.zeros(1)})


def test_bits_to_codes_and_patchify_order():
  d = 14
  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2, (2, 3, 5, 4 * d)).astype(np.uint8)
  # pixel_shuffle / unshuffle against torch, NHWC <-> NCHW
  sh = bsq.pixel_shuffle_nhwc(jnp.asarray(bits))
  want = F.pixel_shuffle(torch.from_numpy(bits).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(sh), want.numpy())
  np.testing.assert_array_equal(np.asarray(bsq.pixel_unshuffle_nhwc(sh)), bits)
  # channel c*4 + a*2 + b of token (i, j) is cell (2i+a, 2j+b), channel c
  c, a, b, i, j = 5, 1, 0, 2, 3
  assert np.asarray(sh)[0, 2 * i + a, 2 * j + b, c] == bits[0, i, j, c * 4 + a * 2 + b]
  # codes: +-1/sqrt(d), unit norm, equal to torch's indices_to_codes
  codes = np.asarray(bsq.codes_from_vae_bits(jnp.asarray(np.asarray(sh))))
  lfq = ref.LFQ(d)
  want = lfq.indices_to_codes(want.unsqueeze(1)).squeeze(2).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(codes, want, rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.abs(codes), 1 / np.sqrt(d), rtol=1e-6)
  assert np.array_equal(codes > 0, np.asarray(sh) > 0)


def _golden(name):
  d = golden_dir(name)
  meta = json.load(open(os.path.join(d, "meta.json")))
  g = np.load(os.path.join(d, "golden.npz"))
  sd = common.load_state_dict(os.path.join(d, "vae_tiny.pth"), wrappers=("vae",))
  assert "quantize.lfq.mask" in sd and "quantizer.lfq.mask" in sd  # the mask twice
  cfg = bsq_rules.infer_bsq_config(sd)
  call = meta["vae"]["call"]
  assert (cfg.codebook_dim, cfg.base_ch, list(cfg.ch_mult)) == (
      call["codebook_dim"], meta["vae"]["base_ch"], call["decoder_ch_mult"])
  assert cfg.apply_spatial_patchify == bool(meta["transformer"]["kwargs_passed"][
      "apply_spatial_patchify"])
  return meta, g, _load(cfg, bsq_rules.convert_bsq_state_dict(sd))


GOLDEN = ["infinity_tiny_d32", "infinity_tiny_d56_patchify"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_generation_codes(name):
  """Official bits of the whole 1M schedule -> our codes/accumulation == stored summed codes."""
  meta, g, jm = _golden(name)
  bits = g["gen_bits_BLd"]
  offs = np.cumsum([0] + [h * w for h, w in SCHED_1M])
  assert offs[-1] == meta["generation"]["total_tokens"]
  per_scale = [bits[:, offs[i]:offs[i + 1]] for i in range(len(SCHED_1M))]
  if jm.cfg.apply_spatial_patchify:  # our pixel_shuffle == the official one, bit for bit
    for si, (h, w) in enumerate(SCHED_1M):
      vb = bsq.pixel_shuffle_nhwc(jnp.asarray(per_scale[si]).reshape(2, h, w, -1))
      np.testing.assert_array_equal(np.asarray(vb), g[f"gen_vae_bits_scale{si:02d}_B1HWd"][:, 0])
  summed, _ = _accumulate(jm, per_scale, SCHED_1M)
  want = g["gen_summed_codes_BdHW"].transpose(0, 2, 3, 1)
  err = float(np.abs(np.asarray(summed) - want).max())
  print(f"{name}: summed codes max abs {err:.2e}")
  assert err <= 1e-6


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_decode(name):
  """Decode the stored summed codes (image 0, 1024x1024) with the golden weights.

  Parity: our torch reference (contiguous float32) on the same weights and codes, <= 1e-4.
  The stored image is compared only as a gross check. Cause (measured on d32): in the
  official loop `summed_codes` is in channels-last memory layout (indices_to_codes returns
  a permuted view and interpolate keeps its layout), so torch's CPU convs take their
  channels-last path, whose float32 error this randomly initialised 1024px decoder
  amplifies: against a float64 decode, contiguous float32 torch is off by 1.7e-5 and ours
  by 3.0e-5, but channels-last float32 torch by 1.6e-2, and the stored image by 5.6e-2;
  the official decoder rerun here on the official in-loop tensor is 5.2e-2 from the stored
  image. So no float32 implementation can match the stored image to 1e-4.
  """
  _, g, jm = _golden(name)
  cfg = jm.cfg
  z = g["gen_summed_codes_BdHW"][:1]
  img = np.asarray(_decode(jm, jnp.asarray(z.transpose(0, 2, 3, 1))))
  tm = ref.AutoEncoder(cfg.codebook_dim, cfg.base_ch, cfg.ch_mult, cfg.num_res_blocks,
                       cfg.downsample)
  tm.load_state_dict(torch.load(os.path.join(golden_dir(name), "vae_tiny.pth"),
                                weights_only=True)["vae"])
  with torch.no_grad():
    img_t = tm.eval().decode(torch.from_numpy(np.ascontiguousarray(z))).permute(0, 2, 3, 1).numpy()
  err = float(np.abs(img - img_t).max())
  stored = g["gen_image_float_B3HW_stride4"][:1].transpose(0, 2, 3, 1)
  gross = np.abs(img[:, ::4, ::4] - stored)
  print(f"{name}: decode vs reference max abs {err:.2e} rel {_rel(img, img_t):.2e}; vs stored "
        f"image max abs {gross.max():.2e} mean abs {gross.mean():.2e}")
  assert err <= 1e-4
  assert gross.mean() <= 5e-3 and gross.max() <= 0.1


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_teacher_forcing(name):
  meta, g, jm = _golden(name)
  tf = meta["teacher_forcing"]
  vae_hws = [tuple(s[1:]) for s in tf["vae_scale_schedule"]]
  img = jnp.asarray(g["tf_image_uint8_BHW3"].astype(np.float32) / 127.5 - 1.0)
  raw_want = g["tf_raw_features_BdHW"].transpose(0, 2, 3, 1)
  raw = _encode(jm, img)
  assert _rel(raw, raw_want) <= 1e-5
  x, labels = _teacher_forcing(jm, jnp.asarray(raw_want), tuple(vae_hws))
  assert _rel(x, g["tf_x_BLC_wo_prefix"]) <= 1e-5
  got_bits = np.concatenate([np.asarray(lab) for lab in labels], axis=1)
  np.testing.assert_array_equal(got_bits, g["tf_gt_bits_BLd"])
  print(f"{name}: raw features rel {_rel(raw, raw_want):.2e}; teacher input rel "
        f"{_rel(x, g['tf_x_BLC_wo_prefix']):.2e}; {got_bits.size} labels identical")
