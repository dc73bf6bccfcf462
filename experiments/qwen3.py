"""Qwen3-style decoders as presets: --config=experiments/qwen3.py:SIZE[,LAYOUT].

Qwen3's recipe on the Llama presets' knobs (experiments/llama.py): RMSNorm (epsilon 1e-6) before
each sublayer and on every query and key head (qk_norm), SwiGLU, RoPE with base 1,000,000,
grouped-query attention with heads of 128 whatever the width (model.head_dim), no biases.

  SIZE    tiny  4 layers, d_model 128, 4 heads of 64 / 2 kv heads, the plays' 4,096-token
                sentencepiece: the CPU size, as llama.py:tiny
          0.6b  Qwen3-0.6B: 28 x 1024, 16 / 8 heads of 128, MLP 3072, 151,936 tokens, tied embeddings;
                596,049,920 parameters (0.44B without the embedding), as published
          8b    Qwen3-8B: 36 x 4096, 32 / 8 heads of 128, MLP 12,288, untied; 8,190,735,360 parameters
                (6.95B without the embeddings), as published
          30b-a3b    Qwen3-30B-A3B: 48 x 2048, 32 / 4 heads of 128, 128 experts 768 wide, top-8 (gates
                     renormalised), every block; untied
          235b-a22b  Qwen3-235B-A22B: 94 x 4096, 64 / 4 heads of 128, 128 experts 1,536 wide, top-8, untied
                The mixtures' counts (total and active) are in docs/scaling.md; they equal transformers'
                count for the same config.json (tests/test_presets.py). Dropless experts.
  LAYOUT  dp (default), fsdp, hybrid, fsdp_tensor: as in experiments/gpt2.py

python -m lm.hf import reads Qwen3 checkpoints into this layout (model_type 'qwen3', and 'qwen3_moe' for
the mixtures).
"""

import pathlib

import ml_collections

from lm.config import load_module, preset_arg

llama = load_module(pathlib.Path(__file__).with_name('llama.py'))

# llama.py's size it starts from; then layers, d_model, heads, kv heads, head_dim, mlp_dim, vocab, tied.
SIZES = {
    'tiny': ('tiny', 4, 128, 4, 2, 64, 0, 4096, False),
    '0.6b': ('1b', 28, 1024, 16, 8, 128, 3072, 151_936, True),
    '8b': ('8b', 36, 4096, 32, 8, 128, 12_288, 151_936, False),
    '30b-a3b': ('8b', 48, 2048, 32, 4, 128, 6144, 151_936, False),
    '235b-a22b': ('8b', 94, 4096, 64, 4, 128, 12_288, 151_936, False),
}
# The mixtures: experts, experts per token, each expert's width (mlp_dim above is config.json's
# intermediate_size, which no block of theirs uses).
EXPERTS = {'30b-a3b': (128, 8, 768), '235b-a22b': (128, 8, 1536)}
PUBLISHED_PARAMS = {'0.6b': 596_049_920, '8b': 8_190_735_360, '30b-a3b': 30_532_122_624, '235b-a22b': 235_093_634_560}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  size, layout = preset_arg('experiments/qwen3.py', arg, SIZES)
  base, layers, width, heads, kv_heads, head_dim, mlp_dim, vocab, tied = SIZES[size]
  config = llama.get_config(f'{base},{layout}')
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = layers, width, heads, kv_heads, head_dim
  m.mlp_dim, m.vocab_size, m.tie_embeddings = mlp_dim, vocab, tied
  m.qk_norm, m.norm_eps, m.qk_norm_eps = True, 1e-6, 1e-6
  m.rope_base = 1_000_000.0
  if size in EXPERTS:
    m.moe_experts, m.moe_top_k, m.moe_mlp_dim = EXPERTS[size]
    m.moe_impl, m.moe_capacity_factor, m.moe_norm_top_k = 'dropless', 0.0, True
  return config
