"""One seam per model kind: each kind (model.kind) registers one object here that owns building
its module, the shape of its batches, its FLOPs, its KV-cache decoding and its Hugging Face
families (an HfFamily each: GPT-2 in gpt2.py, Llama and its kin in llama.py). A new kind or family
is one new file beside this one, registered in KINDS or in its kind's hf_families, plus its tests;
nothing else in lm branches on model.kind or model_type.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from lm.config import ConfigError
from lm.kinds.base import HfFamily, Kind
from lm.kinds.decoder import Decoder
from lm.kinds.encoder_decoder import EncoderDecoderKind

KINDS: dict[str, Kind] = {kind.name: kind for kind in (Decoder(), EncoderDecoderKind())}


def of(m: ml_collections.ConfigDict) -> Kind:
  """The kind of a config's model section."""
  return KINDS[m.kind]


def of_model(model: nn.Module) -> Kind:
  """The kind of a built model."""
  return KINDS[model.config.kind]


def require_decoder(m: ml_collections.ConfigDict, where: str, task: str) -> None:
  """A ConfigError unless the model reads a prompt as the start of its output (a decoder): what reads
  text as one sequence (generation, scoring, the harness, the pipeline) refuses the other kinds."""
  if of(m).prompt_is_input:
    raise ConfigError(f"{where} holds a model.kind={m.kind!r} model, whose prompt is its encoder's input: {task} "
                      "takes decoders (an encoder-decoder's eval and samples come with its training)")


def make_model(m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> nn.Module:
  """The flax module of a config's model section `m` (and data section `d`: an encoder-decoder
  masks its tokenizer's padding)."""
  return of(m).build(m, d)


def init_cache(model: nn.Module, batch_size: int, length: int | None = None) -> dict:
  """An empty KV cache of a built model for batch_size sequences of up to `length` tokens."""
  return of_model(model).init_cache(model, batch_size, length)


def hf_families() -> dict[str, HfFamily]:
  """Every Hugging Face family some kind converts, by transformers' model_type."""
  return {family.model_type: family for kind in KINDS.values() for family in kind.hf_families}


def for_hf(model_type: str) -> HfFamily:
  """The family that converts transformers' model_type, or a ConfigError naming those that convert."""
  families = hf_families()
  if model_type not in families:
    raise ConfigError(f'model_type={model_type!r} in config.json: only {", ".join(map(repr, families))} '
                      'checkpoints import')
  return families[model_type]


def hf_family_of(m: ml_collections.ConfigDict, model_type: str | None = None) -> HfFamily:
  """The family a model section exports as: model_type's if given (a ConfigError naming the key it
  cannot express), else the first of its kind's families that expresses it."""
  if model_type:
    family = for_hf(model_type)
    family.check(m)
    return family
  families = of(m).hf_families
  if not families:
    raise ConfigError(f'model.kind={m.kind!r} has no Hugging Face conversion')
  for family in families:
    if family.problem(m) is None:
      return family
  problems = '; '.join(f'{f.model_type}: {f.problem(m)}' for f in families)
  raise ConfigError(f'no Hugging Face family expresses this model ({problems})')
