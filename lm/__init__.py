"""lm: GPT-style language-model pretraining in JAX and Flax.

`lm.pipeline` and `lm.set_seed` (transformers' text-generation pipeline on lm, see lm.interop.pipeline)
load on first use, so that `import lm` stays light."""


def __getattr__(name: str):
  if name in ('pipeline', 'set_seed'):
    # Imported on first use: it brings in JAX and Flax, which `import lm` must not.
    from lm.interop import pipeline  # noqa: PLC0415
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
