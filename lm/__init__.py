"""lm: GPT-style language-model pretraining in JAX and Flax.

`lm.pipeline` and `lm.set_seed` (transformers' text-generation pipeline on lm, see lm.text_pipeline)
load on first use, so that `import lm` stays light."""


import importlib


def __getattr__(name: str):
  if name in ('pipeline', 'set_seed'):
    return getattr(importlib.import_module('lm.text_pipeline'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
