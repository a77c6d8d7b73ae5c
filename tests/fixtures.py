"""Tiny converted checkpoints for CLI tests: an Infinity (+ BSQ VAE) directory written by
convert.infinity from our PyTorch reference, and a T5 directory written by convert.t5 from
a random transformers T5 with the offline-trained tiny sentencepiece model.

Builders reuse the helpers of tests/test_infinity.py-style references,
tests/test_tokenizer.py (train_tiny_spiece) and tests/test_t5.py (_hf_config, _save_hf).
"""

from __future__ import annotations

import os

from sparvar_jax.configs import BSQVAEConfig, INFINITY_TINY_D32

# The d32 (2B) family at small width: stride 16 like infinity_vae_d32reg.
BSQ_TINY_D32 = BSQVAEConfig(codebook_dim=32, base_ch=32, ch_mult=(1, 2, 4, 4, 4),
                            num_res_blocks=1)


# The d56 (8B) family at small width: 14 channels x 2x2 patchify = 56 bits per token.
BSQ_TINY_D56 = BSQVAEConfig(codebook_dim=14, base_ch=32, ch_mult=(1, 2, 4, 4),
                            num_res_blocks=1, apply_spatial_patchify=True)


def tiny_infinity_files(src: str, seed: int = 0, cfg=INFINITY_TINY_D32,
                        vae_cfg: BSQVAEConfig = BSQ_TINY_D32) -> tuple[str, str]:
  """A random reference Infinity and BSQ VAE with the official key names, saved with
  torch.save as `src/infinity.pth` and `src/vae.pth` (what convert.infinity reads)."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.reference import bsq_vae_torch  # pylint: disable=g-import-not-at-top
  from tests.reference.infinity_torch import InfinityRef, init_random_  # pylint: disable=g-import-not-at-top
  tm = InfinityRef(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                   d_vae=cfg.d_vae, text_channels=cfg.text_channels,
                   block_chunks=cfg.block_chunks)
  init_random_(tm, seed)
  os.makedirs(src, exist_ok=True)
  model_pth, vae_pth = os.path.join(src, "infinity.pth"), os.path.join(src, "vae.pth")
  torch.save(tm.state_dict(), model_pth)
  patch = 16 if not vae_cfg.apply_spatial_patchify else 8
  vae = bsq_vae_torch.AutoEncoder(vae_cfg.codebook_dim, vae_cfg.base_ch, vae_cfg.ch_mult,
                                  vae_cfg.num_res_blocks, patch)
  with torch.no_grad():
    bsq_vae_torch.randomize_(vae, seed + 1)
  torch.save(vae.state_dict(), vae_pth)
  return model_pth, vae_pth


def tiny_infinity_checkpoint(out: str, seed: int = 0, cfg=INFINITY_TINY_D32,
                             vae_cfg: BSQVAEConfig = BSQ_TINY_D32) -> str:
  """Random reference Infinity + BSQ VAE saved as .pth next to `out`, converted into `out`."""
  from convert import infinity as convert_infinity  # pylint: disable=g-import-not-at-top
  model_pth, vae_pth = tiny_infinity_files(out.rstrip("/") + "_src", seed, cfg, vae_cfg)
  convert_infinity.convert(model_pth, vae_pth, out, progress=False)
  return out


def tiny_t5_checkpoint(out: str, d_model: int, seed: int = 0) -> str:
  """A random transformers T5 encoder of width d_model (tiny otherwise), converted."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from convert import t5 as convert_t5  # pylint: disable=g-import-not-at-top
  from tests.test_t5 import _hf_config, _save_hf  # pylint: disable=g-import-not-at-top
  from tests.test_tokenizer import train_tiny_spiece  # pylint: disable=g-import-not-at-top
  root = out.rstrip("/") + "_src"
  tok_dir = os.path.join(root, "spiece")
  os.makedirs(tok_dir, exist_ok=True)
  train_tiny_spiece(tok_dir)
  torch.manual_seed(seed)
  model = transformers.T5EncoderModel(_hf_config(d_model=d_model)).eval()
  hf_dir = _save_hf(model, os.path.join(root, "hf"), tok_dir, "safetensors")
  convert_t5.convert(hf_dir, out)
  return out
