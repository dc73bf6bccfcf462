"""A trained model in memory, ready to generate or score: its config, module, parameters (placed on a
mesh), tokenizer and step; read from a workdir by lm.training.saved.load, from a Hugging Face folder
by lm.hf.read_hf, or made from the training loop's own state."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections

from lm.config import override
from lm.data import tokenizers
from lm.kinds import make_model
from lm.nn.model import unstack_layers


@dataclasses.dataclass
class SavedRun:
  config: ml_collections.ConfigDict
  model: Any  # The flax module.
  params: Any  # Placed on `mesh` as the config's logical axis rules say.
  tokenizer: tokenizers.Tokenizer
  step: int
  mesh: jax.sharding.Mesh
  workdir: pathlib.Path


def unrolled(run: SavedRun) -> SavedRun:
  """The run with scanned layers unrolled into block_0 ... block_{n-1} (as it is if not scanned)."""
  if not run.config.model.scan_layers:
    return run
  config = override(run.config, {'model.scan_layers': False})
  return dataclasses.replace(run, config=config, model=make_model(config.model, config.data),
                             params=unstack_layers(run.params, run.config.model))
