"""Infinity transformer and sampling loop vs our PyTorch reference (tiny random configs, fp32).

The pure-fp32 mode (bf16_cross_attn=False on both sides) is compared tightly; the
official bf16 rounding of cross-attention is checked against the official outputs in
test_infinity_golden.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import common
from convert.infinity import ZERO_BUFFER, infer_infinity_config, infinity_rules, prepare_state_dict
from sparvar_jax import schedules
from sparvar_jax.checkpoint import load_into
from sparvar_jax.configs import BSQVAEConfig
from sparvar_jax.families.infinity import (InfinitySampling, bucket_text_len, infinity_generator,
                                           sample_bits)
from sparvar_jax.models.infinity import Infinity, abstract_infinity
from tests.reference.infinity_torch import InfinityRef, init_random_

LENS = (5, 9)
TEXT_LEN = 16


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def vae_for(d_vae, patchify=False):
  """A weightless BSQ VAE (its sampler helpers need only the config)."""
  from sparvar_jax.vae.bsq import BSQVAE
  cfg = BSQVAEConfig(codebook_dim=d_vae // (4 if patchify else 1), base_ch=32, ch_mult=(1, 1),
                     num_res_blocks=1, apply_spatial_patchify=patchify)
  return nnx.eval_shape(lambda: BSQVAE(cfg, rngs=nnx.Rngs(0)))


def make_pair(d_vae=16, depth=4, block_chunks=2, seed=0):
  tm = InfinityRef(depth=depth, embed_dim=128, num_heads=2, d_vae=d_vae, text_channels=256,
                   block_chunks=block_chunks)
  init_random_(tm, seed).eval()
  tm.set_bf16_cross_attn(False)
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  cfg = infer_infinity_config(sd)
  assert (cfg.depth, cfg.block_chunks, cfg.d_vae, cfg.pool_heads) == (depth, block_chunks, d_vae, 2)
  sd, _ = prepare_state_dict(sd, cfg)
  tree = common.apply_rules(sd, infinity_rules(cfg), ignore=[ZERO_BUFFER])
  jm = abstract_infinity(cfg, bf16_cross_attn=False)
  load_into(jm, tree)
  return tm, jm


@pytest.fixture(scope="module")
def pair():
  return make_pair()


def text(seed=1, lens=LENS, K=256):
  g = np.random.default_rng(seed)
  feats = (0.25 * g.standard_normal((len(lens), max(lens), K))).astype(np.float32)
  return feats, list(lens)


def padded(feats, lens):
  out = np.zeros((len(lens), TEXT_LEN, feats.shape[-1]), np.float32)
  mask = np.zeros((len(lens), TEXT_LEN), bool)
  for i, n in enumerate(lens):
    out[i, :n], mask[i, :n] = feats[i, :n], True
  return jnp.asarray(out), jnp.asarray(mask)


def torch_text(feats, lens):
  return [torch.from_numpy(feats[i, :n].copy()) for i, n in enumerate(lens)]


def test_teacher_forced_matches_reference(pair):
  tm, jm = pair
  sch = schedules.get_schedule(0.5, "0.06M")  # 7 scales, 451 tokens, non-square RoPE grid
  feats, lens = text()
  x = (0.1 * np.random.default_rng(2).standard_normal(
      (2, sch.total_tokens - 1, 16))).astype(np.float32)
  with torch.no_grad():
    want = tm(torch_text(feats, lens), torch.from_numpy(x), sch.scales, sch.rope_hw).numpy()
  got = nnx.jit(lambda m, t, k, x: m.forward(t, k, x, sch))(jm, *padded(feats, lens),
                                                            jnp.asarray(x))
  assert got.shape == want.shape == (2, sch.total_tokens, 32)
  assert rel(got, want) <= 1e-5


def test_kv_cached_steps_equal_teacher_forcing():
  # A randomly initialised model (the CLI's embedded default path), 8B-family sizes.
  from sparvar_jax.configs import INFINITY_TINY_D56
  jm = nnx.jit(lambda: Infinity(INFINITY_TINY_D56, rngs=nnx.Rngs(0)))()
  full = schedules.get_schedule(1.25, "1M")
  sch = schedules.custom_schedule(full.scales[:5], rope_hw=full.rope_hw)
  feats, lens = text(3, K=512)
  t, k = padded(feats, lens)
  x = jnp.asarray(0.1 * np.random.default_rng(4).standard_normal((2, sch.total_tokens - 1, 56)),
                  jnp.float32)
  want = np.asarray(nnx.jit(lambda m, t, k, x: m.forward(t, k, x, sch))(jm, t, k, x))

  @nnx.jit
  def run(m, t, k, x):
    cond, ca_kv = m.encode_text(t, k)
    gss = m.cond_gss(cond)
    ca_k, ca_v = m.block_text_kv(ca_kv)
    cache = m.init_cache(2, sch, pad_to=128)
    outs = []
    for si in range(sch.num_scales):
      a, b = sch.offsets[si], sch.offsets[si + 1]
      inp = m.sos(cond) if si == 0 else m.embed_input(x[:, a - 1:b - 1])
      lg, cache, _ = m.scale_step(si, sch, inp, cond, gss, ca_k, ca_v, k, cache)
      outs.append(lg)
    return jnp.concatenate(outs, axis=1)

  got = np.asarray(run(jm, t, k, x))
  assert want.shape == (2, sch.total_tokens, 112) and np.isfinite(want).all()
  assert np.std(want) > 1e-3
  assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("patchify,negative", [(False, False), (True, True)])
def test_greedy_cfg_generation_matches_reference(patchify, negative):
  tm, jm = make_pair(d_vae=16, depth=2, block_chunks=2, seed=5 + patchify)
  full = schedules.get_schedule(1.333, "1M")  # first 4 scales of the 4:3 template
  sch = schedules.custom_schedule(full.scales[:4], rope_hw=full.rope_hw)
  feats, lens = text(6)
  cfgs = [3.0, 2.5, 1.0, 4.0]
  taus = [1.0, 0.5, 0.7, 1.3]
  neg = text(7, lens=(6,)) if negative else None
  gen = infinity_generator(jm, vae_for(16, patchify), sch, 2,
                          InfinitySampling(cfg=cfgs, tau=taus, top_k=1, top_p=0.0),
                          text_len=TEXT_LEN)
  res = gen(feats, lens, seed=0, negative=neg, return_logits=True, decode=False)
  neg_t = None
  if negative:
    neg_t = torch_text(*neg) * 2
  lo, bits, summed = tm.generate(torch_text(feats, lens), sch.scales, sch.rope_hw, cfg=cfgs,
                                 tau=taus, patchify=patchify, neg_kv_list=neg_t)
  for si in range(sch.num_scales):
    np.testing.assert_array_equal(res.tokens_per_scale[si], bits[si].numpy(), err_msg=f"scale {si}")
    assert rel(res.logits_per_scale[si], lo[si].numpy()) <= 1e-5, si
  np.testing.assert_allclose(res.latent, summed.permute(0, 2, 3, 1).numpy(),
                             rtol=0, atol=1e-6)
  dv = 4 if patchify else 16
  assert res.latent.shape[-1] == dv


def test_seeds_forced_bits_bf16_and_cfg1(pair):
  tm, jm = pair
  sch = schedules.custom_schedule([(1, 1), (2, 2), (3, 3)], rope_hw=(6, 6))
  feats, lens = text(8)
  s = InfinitySampling(cfg=2.0, top_k=0, top_p=0.9)
  gen = infinity_generator(jm, vae_for(16), sch, 2, s, text_len=TEXT_LEN)
  a = gen(feats, lens, seed=3, return_logits=True, decode=False)
  a2 = gen(feats, lens, seed=3, decode=False)
  c = gen(feats, lens, seed=4, decode=False)
  for si in range(3):
    np.testing.assert_array_equal(a.tokens_per_scale[si], a2.tokens_per_scale[si])
  assert any((a.tokens_per_scale[si] != c.tokens_per_scale[si]).any() for si in range(3))
  # bf16 compute with the fp32 run's bits forced: close logits, fp32 outputs.
  bf = abstract_infinity(jm.cfg, jnp.bfloat16, bf16_cross_attn=True)
  load_into(bf, nnx.to_pure_dict(nnx.state(jm, nnx.Param)))
  rb = infinity_generator(bf, vae_for(16), sch, 2, s, text_len=TEXT_LEN)(
      feats, lens, forced=a.tokens_per_scale, return_logits=True, max_scales=2)
  for si in range(2):
    np.testing.assert_array_equal(rb.tokens_per_scale[si], a.tokens_per_scale[si])
    assert rb.logits_per_scale[si].dtype == np.float32
    assert rel(rb.logits_per_scale[si], a.logits_per_scale[si]) < 0.05
  # cfg = 1 everywhere: no unconditional rows (official bs = B); the logits are the
  # conditional ones, which the reference's doubled batch gives for cfg = 1.
  g1 = infinity_generator(jm, vae_for(16), sch, 2, InfinitySampling(cfg=1.0, top_k=1),
                         text_len=TEXT_LEN)
  assert not g1.adapter.uses_cfg
  r1 = g1(feats, lens, return_logits=True, decode=False)
  lo, bits, _ = tm.generate(torch_text(feats, lens), sch.scales, sch.rope_hw, cfg=1.0)
  for si in range(3):
    np.testing.assert_array_equal(r1.tokens_per_scale[si], bits[si].numpy())
    assert rel(r1.logits_per_scale[si], lo[si].numpy()) <= 1e-5


def test_sample_bits_semantics():
  key = jax.random.key(0)
  l = jnp.asarray(np.random.default_rng(0).standard_normal((4, 500, 8, 2)), jnp.float32)
  major = np.asarray(l[..., 1] > l[..., 0])
  np.testing.assert_array_equal(np.asarray(sample_bits(key, l, 1, 0.0)), major)
  # top-k >= 2 keeps both bits: the draw follows sigmoid(l1 - l0).
  p1 = np.asarray(jax.nn.sigmoid(l[..., 1] - l[..., 0]))
  draws = np.mean([np.asarray(sample_bits(jax.random.key(s), l, 900, 0.0)) for s in range(64)], 0)
  assert abs(draws.mean() - p1.mean()) < 0.01
  assert np.corrcoef(draws.ravel(), p1.ravel())[0, 1] > 0.9
  # top-p 0.97: the majority bit whenever the minority probability is <= 0.03.
  minority = np.minimum(p1, 1 - p1)
  for s in range(8):
    b = np.asarray(sample_bits(jax.random.key(s), l, 900, 0.97))
    np.testing.assert_array_equal(b[minority <= 0.03], major[minority <= 0.03])
  assert ((minority > 0.03) & (b != major)).any()


def test_bucket_text_len():
  assert bucket_text_len([7, 12]) == 64 and bucket_text_len([65]) == 128
  assert bucket_text_len([500]) == 512 and bucket_text_len([3], multiple=8) == 8
  with pytest.raises(ValueError):
    bucket_text_len([600])


def test_generator_input_errors(pair):
  _, jm = pair
  sch = schedules.custom_schedule([(1, 1), (2, 2)])
  vae = vae_for(16)
  with pytest.raises(ValueError, match="one per scale"):
    infinity_generator(jm, vae, sch, 1, InfinitySampling(cfg=[3.0]))
  with pytest.raises(ValueError, match="tau must be > 0"):
    infinity_generator(jm, vae, sch, 1, InfinitySampling(tau=0.0))
  with pytest.raises(ValueError, match="top_p"):
    infinity_generator(jm, vae, sch, 1, InfinitySampling(top_p=1.5))
  with pytest.raises(ValueError, match="do not belong together"):
    infinity_generator(jm, vae_for(32), sch, 1, InfinitySampling())
  gen = infinity_generator(jm, vae, sch, 2, InfinitySampling(), text_len=8)
  feats, _ = text(9)
  with pytest.raises(ValueError, match="lengths must be in"):
    gen(feats, [5, 9], decode=False)
  with pytest.raises(ValueError, match="batch 2"):
    gen(feats[:1], [5], decode=False)
  with pytest.raises(ValueError, match=r"\[B, L, 256\]"):
    gen(feats[..., :10], [5, 8], decode=False)


@pytest.mark.parametrize("which", ["2B", "8B"])
def test_real_sizes_trace(which):
  """The released sizes trace through the generator at 1024x1024 (shapes only, no compute)."""
  from sparvar_jax import configs
  from sparvar_jax.vae.bsq import BSQVAE
  cfg, vcfg = ((configs.INFINITY_2B, configs.BSQ_D32REG) if which == "2B"
               else (configs.INFINITY_8B, configs.BSQ_D56_PATCHIFY))
  m = abstract_infinity(cfg, jnp.bfloat16, param_dtype=jnp.bfloat16)
  vae = nnx.eval_shape(lambda: BSQVAE(vcfg, rngs=nnx.Rngs(0)))
  sch = schedules.get_schedule(1.0, "1M")
  gen = infinity_generator(m, vae, sch, 1, InfinitySampling(), text_len=64,
                          cache_dtype=jnp.bfloat16)
  S = jax.ShapeDtypeStruct
  t = S((1, 64, 2048), jnp.float32)
  k = S((1, 64), jnp.bool_)
  ctx, x, cache, summed = jax.eval_shape(gen._begin, gen._mstate, gen._vstate, (t, k, t, k))
  assert cache.k.shape == (cfg.depth, 2, 10521, cfg.num_heads, 128)
  assert ctx.ca_k.shape == (cfg.depth, 2, 64, cfg.num_heads, 128)
  assert summed.shape == (1, 64 * vae.patch, 64 * vae.patch, vcfg.codebook_dim)
  last = sch.num_scales - 1
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
  scalars = (jnp.float32(3.0), jnp.float32(1.0))
  bits, _, x_next, cache2, summed2, _ = jax.eval_shape(
      gen._step(last, False, False, 2), gen._mstate, gen._vstate,
      S((2, 4096, cfg.embed_dim), jnp.float32), ctx, cache, summed, None, keys, scalars, None)
  assert bits.shape == (1, 4096, cfg.d_vae) and x_next is None
  assert cache2.k.shape == cache.k.shape and summed2.shape == summed.shape
  _, _, x1, _, _, _ = jax.eval_shape(gen._step(0, False, False, 2), gen._mstate, gen._vstate, x,
                                     ctx, cache, summed, None, keys, scalars, None)
  assert x1.shape == (2, 4, cfg.embed_dim)
