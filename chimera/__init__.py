"""Chimera: dense and Mixture-of-Experts GPT decoders in JAX/Flax, compared at equal compute."""
