"""muP's coordinate check: how large each block's output is after a few training steps, width by
width. Under muP it keeps its size as the model widens; under SP it grows (Yang et al. 2022, fig. 5)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections

from lm.data import pipeline
from lm.nn.block import Block
from lm.parallel import sharding
from lm.training import train


def train_from_scratch(config: ml_collections.ConfigDict, corpus: pipeline.Corpus, steps: int):
  """`steps` train steps on one device from a fresh state: (losses, final state, the batches, layout)."""
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), steps))
  layout = train.make_layout(config, jax.devices()[:1])
  step = train.jit_train_step(layout, config.train)
  with sharding.activate(layout.mesh, layout.rules):
    state = train.init_train_state(layout)
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, layout.batch_sharding, config.data.batch_size))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state), batches, layout


def block_output_sizes(config: ml_collections.ConfigDict, corpus: pipeline.Corpus, steps: int = 3) -> dict[str, float]:
  """Mean |x| of each block's output ('block_0', ...) on the first batch, after `steps` train steps."""
  _, state, batches, layout = train_from_scratch(config, corpus, steps)
  _, captured = layout.model.apply({'params': state.params}, jnp.asarray(batches[0]['tokens'][:, :-1]),
                                   capture_intermediates=lambda module, _: isinstance(module, Block),
                                   mutable=['intermediates'])
  return {name: float(jnp.mean(jnp.abs(out['__call__'][0]))) for name, out in captured['intermediates'].items()}
