"""Shared Flax NNX layers for VAR and Infinity (norms, AdaLN, attention, FFN, KV cache)."""

from sparvar_jax.nn.adaln import AdaLin, AdaLNBeforeHead, modulate, unbind_chunks
from sparvar_jax.nn.attention import (attention, attention_impls, block_causal_mask,
                                      register_attention_impl)
from sparvar_jax.nn.ffn import FFN
from sparvar_jax.nn.kv_cache import KVCache
from sparvar_jax.nn.norm import l2_normalize, layer_norm
from sparvar_jax.nn.self_attention import SelfAttention
from sparvar_jax.nn.stack import num_layers, scan_layers, stack_modules
