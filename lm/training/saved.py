"""A run read back from its workdir for inference: its config, model, parameters and tokenizer."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections

from lm.config import ConfigError, base_config, override, validate
from lm.data import tokenizers
from lm.inference.run import SavedRun, unrolled
from lm.training import checkpoint, train, workdirs


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def saved_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The validated config of the run in workdir (its config.json)."""
  flat = json.loads((workdir / 'config.json').read_text())
  return validate(override(base_config(), {k: _tuples(v) for k, v in flat.items()}))


def _layout(config: ml_collections.ConfigDict, devices, mesh_shape) -> tuple[train.Layout, ml_collections.ConfigDict]:
  """The layout on a mesh of mesh_shape, or else of the run's shape if that fits these devices, else of one device."""
  if mesh_shape is not None:
    config = override(config, {'mesh.shape': tuple(mesh_shape)})
    return train.make_layout(config, devices, check_batches=False), config
  try:
    return train.make_layout(config, devices, check_batches=False), config
  except ConfigError:
    config = override(config, {'mesh.shape': (1, 1, 1)})
    return train.make_layout(config, list(devices or jax.devices())[:1], check_batches=False), config


def load(workdir: str | pathlib.Path, step: int | None = None, devices: list[jax.Device] | None = None,
         mesh_shape: tuple[int, int, int] | None = None, unroll_layers: bool = True) -> SavedRun:
  """The parameters at `step` (default: the latest checkpoint) of the run in workdir, on a mesh over
  `devices` (default: all) of mesh_shape (default: the run's, or one device if that does not fit;
  the run's logical axis rules apply). ConfigError if workdir holds no such run.

  A model trained with scanned layers comes back unrolled (block_0 ... block_{n-1}; unroll_layers=
  False keeps the scan): decoding then reads each layer's weights in place instead of slicing them
  out of the stack every step (2.3x the tokens per second of GPT-2 small at batch 8 on a CPU).
  """
  workdir = pathlib.Path(workdir)
  if not workdirs.has_checkpoints(workdir / 'checkpoints') or not (workdir / 'config.json').exists():
    raise ConfigError(f'{str(workdir)!r} holds no model: expected a workdir with config.json and checkpoints/ '
                      '(made by python -m lm.main or python -m lm.hf import)')
  config = saved_config(workdir)
  steps = workdirs.checkpoint_steps(workdir / 'checkpoints')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ConfigError(f'{str(workdir)!r} has no checkpoint of step {step}; it has {", ".join(map(str, steps))}')
  tokenizer = tokenizers.load(config.data.tokenizer, workdir / 'tokenizer')
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'the tokenizer in {str(workdir / "tokenizer")!r} has {tokenizer.vocab_size} tokens but the '
                      f'model only model.vocab_size={config.model.vocab_size}: they do not belong together')
  layout, config = _layout(config, devices, mesh_shape)
  model = layout.model
  like = train.abstract_train_state(layout).params
  checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints', config.checkpoint)
  try:
    params = checkpointer.restore_params(step, like)
  except checkpoint.ChecksumError as e:
    raise ConfigError(f'checkpoint {step} of {str(workdir)!r} is damaged: {e}; read another with --step '
                      f'({", ".join(map(str, steps))})') from None
  except Exception:
    if (workdir / 'checkpoints' / str(step)).exists():
      raise
    now = workdirs.checkpoint_steps(workdir / 'checkpoints')
    raise ConfigError(f'checkpoint {step} of {str(workdir)!r} was deleted while it was read (the run writing it '
                      f'keeps checkpoint.max_to_keep={config.checkpoint.max_to_keep}); read again: the latest now '
                      f'is {now[-1] if now else "none"}') from None
  finally:
    checkpointer.close()
  run = SavedRun(config, model, params, tokenizer, step, layout.mesh, workdir)
  return unrolled(run) if unroll_layers else run
