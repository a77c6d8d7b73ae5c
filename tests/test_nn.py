"""Shared layers against PyTorch's definitions (CPU, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from sparvar_jax import nn


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_layer_norm_and_l2_normalize_match_torch():
  x = np.random.default_rng(0).normal(size=(2, 7, 48)).astype(np.float32) * 3 + 1
  ref = F.layer_norm(torch.from_numpy(x), (48,), eps=1e-6).numpy()
  assert _rel(nn.layer_norm(jnp.asarray(x), 1e-6), ref) < 1e-6
  ref = F.normalize(torch.from_numpy(x), dim=-1).numpy()
  assert _rel(nn.l2_normalize(jnp.asarray(x)), ref) < 1e-6
  # bf16 input: statistics still fp32, result fp32
  assert nn.layer_norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_ffn_is_tanh_gelu_mlp():
  f = nn.FFN(16, 40, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32)
  fc1 = lambda t: t @ torch.tensor(np.asarray(f.fc1.kernel[...])) + torch.tensor(
      np.asarray(f.fc1.bias[...]))
  fc2 = lambda t: t @ torch.tensor(np.asarray(f.fc2.kernel[...])) + torch.tensor(
      np.asarray(f.fc2.bias[...]))
  ref = fc2(F.gelu(fc1(torch.from_numpy(x)), approximate="tanh")).numpy()
  assert _rel(f(jnp.asarray(x)), ref) < 1e-6


@pytest.mark.parametrize("masked", [False, True])
def test_attention_xla_matches_torch_sdpa(masked):
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(2, 14, 3, 8)).astype(np.float32) for _ in range(3))
  mask = nn.block_causal_mask((1, 2, 3)) if masked else None
  o = nn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, scale=0.7)
  t = lambda a: torch.from_numpy(a).transpose(1, 2)
  ref = F.scaled_dot_product_attention(
      t(q), t(k), t(v), scale=0.7,
      attn_mask=None if mask is None else torch.from_numpy(mask)).transpose(1, 2).numpy()
  assert _rel(o, ref) < 1e-6


def test_block_causal_mask_and_unknown_impl():
  m = nn.block_causal_mask((1, 2))
  assert m.shape == (5, 5)
  assert m[0].tolist() == [True, False, False, False, False]
  assert m[1:].all()
  with pytest.raises(ValueError, match="unknown attention impl"):
    nn.attention(jnp.ones((1, 1, 1, 4)), jnp.ones((1, 1, 1, 4)), jnp.ones((1, 1, 1, 4)),
                 impl="nope")


def test_kv_cache_writes_in_place_and_reads_prefix():
  cache = nn.KVCache.zeros(3, 2, 10, 1, 4, pad_to=8)
  assert cache.k.shape == (3, 2, 16, 1, 4)
  k1 = jnp.ones((2, 3, 1, 4))
  cache, kp, vp = cache.write_read(1, 0, k1, 2 * k1)
  assert kp.shape == (2, 3, 1, 4) and float(vp.sum()) == 2 * 24
  cache, kp, _ = cache.write_read(jnp.int32(1), 3, 3 * k1[:, :2], k1[:, :2])
  assert kp.shape == (2, 5, 1, 4)
  np.testing.assert_array_equal(kp[0, :, 0, 0], [1, 1, 1, 3, 3])
  assert float(jnp.abs(cache.k[0]).sum() + jnp.abs(cache.k[2]).sum()) == 0.0
  with pytest.raises(ValueError, match="cannot hold"):
    cache.write_read(0, 15, k1, k1)


def test_cosine_self_attention_matches_torch_formula():
  C, H = 32, 2
  a = nn.SelfAttention(C, H, rngs=nnx.Rngs(3))
  a.q_bias[...] = jnp.linspace(-1, 1, C)
  a.v_bias[...] = jnp.linspace(1, -1, C)
  a.scale_mul_H[...] = jnp.array([1.0, 5.0])  # 5 > log(100): clamped
  x = np.random.default_rng(4).normal(size=(2, 6, C)).astype(np.float32)
  mask = nn.block_causal_mask((1, 1, 2))
  y, _, _ = a(jnp.asarray(x), mask=mask)
  W = torch.tensor(np.asarray(a.mat_qkv.kernel[...]))
  b = torch.cat([torch.tensor(np.asarray(a.q_bias[...])), torch.zeros(C),
                 torch.tensor(np.asarray(a.v_bias[...]))])
  qkv = (torch.from_numpy(x) @ W + b).view(2, 6, 3, H, C // H).permute(2, 0, 3, 1, 4)
  q, k, v = qkv.unbind(0)
  sm = torch.tensor([1.0, 5.0]).view(1, H, 1, 1).clamp_max(np.log(100)).exp()
  o = F.scaled_dot_product_attention(F.normalize(q, dim=-1) * sm, F.normalize(k, dim=-1), v,
                                     scale=1.0, attn_mask=torch.from_numpy(mask))
  o = o.transpose(1, 2).reshape(2, 6, C)
  ref = (o @ torch.tensor(np.asarray(a.proj.kernel[...]))
         + torch.tensor(np.asarray(a.proj.bias[...]))).numpy()
  assert _rel(y, ref) < 1e-5


def test_stacked_scan_equals_python_loop():
  st = nn.stack_modules(lambda r: nn.FFN(8, 16, rngs=r), 3, nnx.Rngs(5))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 2, 8)), jnp.float32)
  y, _ = nn.scan_layers(st, lambda f, c, _: (c + f(c), None), x)
  ref = x
  for i in range(3):
    f = nn.FFN(8, 16, rngs=nnx.Rngs(0))
    for name in ("fc1", "fc2"):
      for p in ("kernel", "bias"):
        getattr(getattr(f, name), p)[...] = getattr(getattr(st, name), p)[...][i]
    ref = ref + f(ref)
  assert nn.num_layers(st) == 3
  assert _rel(y, ref) < 1e-6
  # layers are independently initialised
  assert not np.allclose(st.fc1.kernel[...][0], st.fc1.kernel[...][1])


def test_cudnn_needs_half_precision():
  x = jnp.ones((1, 2, 1, 8), jnp.float32)
  with pytest.raises(ValueError, match="bf16/fp16"):
    nn.attention(x, x, x, impl="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_attention_matches_xla_on_gpu(masked):
  rng = np.random.default_rng(9)
  L = 30  # scales 1, 2, 5: lengths that are not block multiples
  S = L if masked else 3 * L
  q = jnp.asarray(rng.normal(size=(2, L, 4, 64)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(2, S, 4, 64)), jnp.bfloat16) for _ in range(2))
  mask = nn.block_causal_mask((1, 2, 5)) if masked else None
  a = nn.attention(q, k, v, mask=mask, impl="cudnn")
  b = nn.attention(q, k, v, mask=mask, impl="xla")
  assert a.dtype == jnp.bfloat16
  assert _rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 1e-2
