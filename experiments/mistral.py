"""Mistral-style decoders as presets: --config=experiments/mistral.py:SIZE[,LAYOUT].

Mistral 7B is Llama's recipe (experiments/llama.py) with sliding-window attention: each token
attends to the last 4,096 positions.

  SIZE    tiny  llama.py:tiny with a 32-token window: the CPU size
          7b    Mistral 7B (v0.1): 32 x 4096, 32 / 8 heads, MLP 14,336, 32,000 tokens, window 4,096,
                untied; 7,241,732,096 parameters as published
  LAYOUT  dp (default), fsdp, hybrid, fsdp_tensor: as in experiments/gpt2.py

python -m lm.hf import reads Mistral checkpoints into this layout (model_type 'mistral').
"""

import pathlib

import ml_collections

from lm.config import load_module, preset_arg

llama = load_module(pathlib.Path(__file__).with_name('llama.py'))

SIZES = {'tiny': 32, '7b': 4096}  # The window.
PUBLISHED_PARAMS = {'7b': 7_241_732_096}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  size, layout = preset_arg('experiments/mistral.py', arg, SIZES)
  config = llama.get_config(f'{"tiny" if size == "tiny" else "8b"},{layout}')
  m = config.model
  m.sliding_window = SIZES[size]
  if size == '7b':
    m.vocab_size, m.rope_base = 32_000, 10_000.0
  return config
