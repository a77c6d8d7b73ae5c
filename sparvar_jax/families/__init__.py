"""Family adapters for the one scale loop (`sparvar_jax.generate.ScaleLoop`): VAR
(class labels, codebook sampling, multi-scale VQVAE) and Infinity (text, bitwise tokens,
BSQ VAE)."""
