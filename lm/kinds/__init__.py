"""One seam per model kind: each kind (model.kind) registers one object here that owns building
its module, the shape of its batches, its FLOPs, its KV-cache decoding and its Hugging Face
conversion. A new kind or family is one new file beside this one, registered in KINDS, plus its
tests; nothing else in lm branches on model.kind.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from lm.config import ConfigError
from lm.kinds.base import Kind
from lm.kinds.decoder import Decoder
from lm.kinds.encoder_decoder import EncoderDecoderKind

KINDS: dict[str, Kind] = {kind.name: kind for kind in (Decoder(), EncoderDecoderKind())}


def of(m: ml_collections.ConfigDict) -> Kind:
  """The kind of a config's model section."""
  return KINDS[m.kind]


def of_model(model: nn.Module) -> Kind:
  """The kind of a built model."""
  return KINDS[model.config.kind]


def make_model(m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> nn.Module:
  """The flax module of a config's model section `m` (and data section `d`: an encoder-decoder
  masks its tokenizer's padding)."""
  return of(m).build(m, d)


def init_cache(model: nn.Module, batch_size: int, length: int | None = None) -> dict:
  """An empty KV cache of a built model for batch_size sequences of up to `length` tokens."""
  return of_model(model).init_cache(model, batch_size, length)


def for_hf(model_type: str) -> Kind:
  """The kind that converts transformers' model_type, or a ConfigError naming those that convert."""
  for kind in KINDS.values():
    if kind.hf_model_type == model_type:
      return kind
  known = ', '.join(repr(k.hf_model_type) for k in KINDS.values() if k.hf_model_type)
  raise ConfigError(f'model_type={model_type!r} in config.json: only {known} checkpoints import')
