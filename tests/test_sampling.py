"""Sampling filters against our PyTorch statement of the official ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sparvar_jax import sampling
from tests.reference import sampling_torch


@pytest.mark.parametrize("V,top_k,top_p", [
    (512, 0, 0.9), (512, 50, 0.0), (512, 900, 0.96), (4096, 900, 0.95), (512, 20, 0.5),
    (2, 2, 0.97),  # Infinity's bit logits: top-k is a no-op, top-p forces the majority bit
    (2, 0, 0.0),
])
def test_filter_matches_official(V, top_k, top_p):
  x = np.random.default_rng(V + top_k).standard_normal((2, 7, V)).astype(np.float32) * 3
  ours = np.asarray(sampling.top_k_top_p_filter(jnp.asarray(x), top_k, top_p))
  ref = sampling_torch.top_k_top_p_filter(torch.tensor(x), min(top_k, V), top_p).numpy()
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_array_equal(ours[~np.isinf(ours)], ref[~np.isinf(ref)])
  if top_k or top_p:
    assert np.isinf(ours).any() or V == 2


def test_greedy_is_argmax_and_sampling_respects_filter():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32))
  idx = sampling.sample_top_k_top_p(jax.random.key(0), x, top_k=1)
  np.testing.assert_array_equal(np.asarray(idx), np.argmax(np.asarray(x), -1))
  kept = ~np.isinf(np.asarray(sampling.top_k_top_p_filter(x, 5, 0.0)))
  for seed in range(5):
    idx = np.asarray(sampling.sample_top_k_top_p(jax.random.key(seed), x, top_k=5))
    assert np.take_along_axis(kept, idx[..., None], -1).all()


@pytest.mark.parametrize("top_k,top_p,msg", [(-1, 0.0, "top_k"), (0, 1.5, "top_p"),
                                             (0, -0.1, "top_p"), (600, 0.0, "vocabulary")])
def test_validate_rejects(top_k, top_p, msg):
  with pytest.raises(ValueError, match=msg):
    sampling.validate(top_k, top_p, vocab_size=512)


def test_top_p_one_keeps_every_token():
  """top_p = 1 removes nothing (the official `cum <= 1 - top_p` never holds), as in HF."""
  logits = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 50)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(sampling.top_k_top_p_filter(logits, 0, 1.0)),
                                np.asarray(logits))
