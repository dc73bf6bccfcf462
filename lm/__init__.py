"""lm: GPT-style language-model pretraining in JAX and Flax."""
