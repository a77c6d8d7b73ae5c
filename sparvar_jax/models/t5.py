"""T5 v1.1 encoder (flan-t5-xl for Infinity) in Flax NNX.

Architecture (the `transformers` T5EncoderModel with `feed_forward_proj="gated-gelu"`):
token embedding (no scaling) -> N pre-norm blocks [RMS norm -> self-attention with a
relative position bias and no 1/sqrt(d) score scaling -> residual; RMS norm -> gated
GELU(tanh) FFN -> residual] -> final RMS norm. The relative position bias table belongs to
layer 0 but is added in every layer, so it is computed once per call. The norms ("T5
LayerNorm") subtract no mean and have no bias.

The layers' weights are stacked along a leading axis and run under `jax.lax.scan`, so the
compiled program holds one layer body whatever `num_layers` is.

Precision: weights and matmul inputs in `dtype`; the residual stream, norms and softmax
in fp32; the output is fp32 (Infinity uses `last_hidden_state.float()`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparvar_jax.configs import T5Config


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of (key pos - query pos): int32 [q_len, k_len], in numpy.

  Half the buckets per direction are exact offsets, the rest log-spaced up to
  `max_distance`. The log step is done in float32 like the PyTorch reference, so the
  buckets agree exactly at the boundaries (tests compare the whole 512x512 table).
  """
  rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  bucket = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    logv = np.log(rel.astype(np.float32) / np.float32(max_exact))
  large = (logv / np.float32(math.log(max_distance / max_exact))
           * np.float32(half - max_exact))
  large = max_exact + np.where(rel < max_exact, 0, large).astype(np.int64)
  large = np.minimum(large, half - 1)
  bucket += np.where(rel < max_exact, rel, large)
  return bucket.astype(np.int32)


def _rms_norm(x_BLD, w_D, eps):
  """T5 LayerNorm: x / sqrt(mean(x^2) + eps) * w, in fp32 (no mean, no bias)."""
  x = x_BLD.astype(jnp.float32)
  var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(var + eps) * w_D.astype(jnp.float32)


class T5Encoder(nnx.Module):
  """T5 v1.1 encoder. `__call__(ids_BL int32, mask_BL bool/int) -> hidden_BLD fp32`.

  Parameter tree: `embedding [V, D]`, `rel_bias [num_buckets, H]`, `final_norm [D]` and
  the stacked layers `layers/{attn_norm [N, D], q, k, v [N, D, H*dk], o [N, H*dk, D],
  ffn_norm [N, D], wi_0, wi_1 [N, D, F], wo [N, F, D]}` (kernels are [in, out]).
  """

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    if cfg.feed_forward_proj != "gated-gelu":
      raise ValueError(f"T5Encoder implements T5 v1.1 (feed_forward_proj='gated-gelu'), "
                       f"got {cfg.feed_forward_proj!r}")
    self.cfg = cfg
    self.dtype = dtype
    n, d, f = cfg.num_layers, cfg.d_model, cfg.d_ff
    inner = cfg.num_heads * cfg.d_kv
    normal = jax.nn.initializers.normal

    def param(shape, std):
      return nnx.Param(normal(std)(rngs.params(), shape, jnp.float32).astype(dtype))

    self.embedding = param((cfg.vocab_size, d), 1.0)
    self.rel_bias = param((cfg.relative_attention_num_buckets, cfg.num_heads), 1.0)
    self.final_norm = nnx.Param(jnp.ones((d,), dtype))
    self.layers = _T5Layers(
        attn_norm=nnx.Param(jnp.ones((n, d), dtype)),
        q=param((n, d, inner), (d * cfg.d_kv) ** -0.5),
        k=param((n, d, inner), d ** -0.5),
        v=param((n, d, inner), d ** -0.5),
        o=param((n, inner, d), inner ** -0.5),
        ffn_norm=nnx.Param(jnp.ones((n, d), dtype)),
        wi_0=param((n, d, f), d ** -0.5),
        wi_1=param((n, d, f), d ** -0.5),
        wo=param((n, f, d), f ** -0.5),
    )

  def __call__(self, ids_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    cfg = self.cfg
    B, L = ids_BL.shape
    H, dk = cfg.num_heads, cfg.d_kv
    cdt = self.dtype
    # fp32 weights mean fp32 math (XLA's default may use TF32 on GPUs).
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None

    x_BLD = jnp.take(self.embedding[...], ids_BL, axis=0).astype(jnp.float32)

    buckets_LL = relative_position_buckets(L, L, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
    pos_HLL = jnp.transpose(jnp.take(self.rel_bias[...].astype(jnp.float32),
                                     jnp.asarray(buckets_LL), axis=0), (2, 0, 1))
    # Padded keys get the most negative float, as the reference does (not -inf, so a
    # row with every key masked stays finite).
    keep_B11L = mask_BL.astype(bool)[:, None, None, :]
    bias_BHLL = jnp.where(keep_B11L, pos_HLL[None], jnp.finfo(jnp.float32).min)

    def mm(eq, a, b):
      return jnp.einsum(eq, a.astype(cdt), b, precision=prec,
                        preferred_element_type=jnp.float32)

    def layer(x_BLD, w):
      h = _rms_norm(x_BLD, w["attn_norm"], cfg.layer_norm_epsilon)
      q_BLHK = mm("bld,de->ble", h, w["q"]).reshape(B, L, H, dk)
      k_BLHK = mm("bld,de->ble", h, w["k"]).reshape(B, L, H, dk)
      v_BLHK = mm("bld,de->ble", h, w["v"]).reshape(B, L, H, dk)
      s_BHLL = mm("bqhk,bshk->bhqs", q_BLHK, k_BLHK.astype(cdt)) + bias_BHLL  # no scaling
      p_BHLL = jax.nn.softmax(s_BHLL, axis=-1)
      a_BLHK = mm("bhqs,bshk->bqhk", p_BHLL, v_BLHK.astype(cdt))
      x_BLD = x_BLD + mm("ble,ed->bld", a_BLHK.reshape(B, L, H * dk), w["o"])
      h = _rms_norm(x_BLD, w["ffn_norm"], cfg.layer_norm_epsilon)
      g = jax.nn.gelu(mm("bld,df->blf", h, w["wi_0"]), approximate=True)
      u = mm("bld,df->blf", h, w["wi_1"])
      x_BLD = x_BLD + mm("blf,fd->bld", g * u, w["wo"])
      return x_BLD, None

    stacked = {k: getattr(self.layers, k)[...] for k in _T5Layers.NAMES}
    x_BLD, _ = jax.lax.scan(layer, x_BLD, stacked)
    return _rms_norm(x_BLD, self.final_norm[...], cfg.layer_norm_epsilon)


class _T5Layers(nnx.Module):
  """Holds the per-layer weights stacked along a leading [num_layers] axis."""

  NAMES = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "wi_0", "wi_1", "wo")

  def __init__(self, **params: nnx.Param):
    for name in self.NAMES:
      setattr(self, name, params[name])
