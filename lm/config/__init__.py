"""The config schema: every key declared once (default, check, doc, resume rule), and validation.

The sections live beside this file (`model.py`, `data.py`, `run.py`), each key a `schema.key(...)`
field of a frozen dataclass. From them come `base_config()` (the `ml_collections.ConfigDict` that
experiments start from), `validate()` (each key's check, then the cross-key rules, one line per
problem naming the key), the resume rule `lm.training.checkpoint` applies, and the key reference that
`python -m lm.config --keys` prints. Nothing else in `lm` is imported here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import pathlib
from typing import Any

import ml_collections

from lm.config import data, model, run
from lm.config.data import (
  BYTE_VOCAB_SIZE,
  FILE_SOURCES,
  MIN_SENTENCEPIECE_VOCAB,
  PAD_IDS,
  Data,
  MixtureSource,
  mixture_sources,
  reserved_ids,
  span_lengths,
  target_len,
)
from lm.config.mesh import (
  DEFAULT_LOGICAL_AXIS_RULES,
  LOGICAL_AXES,
  MESH_AXES,
  mesh_sizes,
  named_mesh,
  resolve_mesh_shape,
  same_mesh,
)
from lm.config.model import Model, splash_length_misfit
from lm.config.run import (
  MESH_LAYOUTS,
  Checkpoint,
  Eval,
  Mesh,
  Optimizer,
  Train,
  preset_arg,
)
from lm.config.schema import MATCH, RESUME_RULES, SHAPE, ConfigError, Key, keys_of

__all__ = [  # What other modules import from here (besides the section modules).
    'BYTE_VOCAB_SIZE', 'DEFAULT_LOGICAL_AXIS_RULES', 'FILE_SOURCES', 'KEYS', 'LOGICAL_AXES', 'MESH_AXES',
    'MESH_LAYOUTS', 'MIN_SENTENCEPIECE_VOCAB', 'PAD_IDS', 'SECTIONS', 'ConfigError', 'Key', 'MixtureSource',
    'base_config', 'flatten', 'load_experiment', 'load_module', 'mesh_sizes', 'mixture_sources', 'must_match',
    'named_mesh', 'override', 'resolve_mesh_shape', 'same_mesh',
    'preset_arg', 'reserved_ids',
    'section', 'span_lengths', 'splash_length_misfit', 'split_spec', 'target_len', 'unknown_key_message', 'validate',
    # The sections' typed dataclasses.
    'Checkpoint', 'Data', 'Eval', 'Mesh', 'Model', 'Optimizer', 'Train',
]

# Section name -> its dataclass; '' holds the top-level keys (seed).
SECTIONS: dict[str, type] = {'': run.Root, 'model': Model, 'data': Data, 'optimizer': Optimizer, 'train': Train,
                             'mesh': Mesh, 'eval': Eval, 'checkpoint': Checkpoint}
KEYS: dict[str, Key] = {k: v for prefix, cls in SECTIONS.items() for k, v in keys_of(cls, prefix).items()}

# Cross-key rules, in the order their errors are reported; each lives beside the keys it relates.
RULES = (model.rules, data.length_rules, model.moe_rules, model.mtp_rules, model.mup_rules, data.objective_rules,
         run.rules, data.source_rules, data.mixture_rules)


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults. Experiments override values, never add keys."""
  c = ml_collections.ConfigDict()
  for name, k in KEYS.items():
    *groups, leaf = name.split('.')
    node = c
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    node[leaf] = ml_collections.FieldReference(k.default, field_type=object) if k.mixed else k.default
  return c


def section(config: ml_collections.ConfigDict, name: str) -> Any:
  """config's section `name` as its typed, frozen dataclass (e.g. section(config, 'model').d_model)."""
  cls = SECTIONS[name]
  values = config if name == '' else config[name]
  return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def must_match(name: str, init_from: bool = False) -> bool:
  """Whether key `name` must equal the checkpoint's value to resume (or, init_from=True, to start from
  another run's parameters). Unknown keys (removed since) never need to."""
  k = KEYS.get(name)
  return k is not None and (k.resume == SHAPE or (k.resume == MATCH and not init_from))


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'model.d_model': 256, ...} for every leaf of the config."""
  flat = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, f'{prefix}{name}.'))
    else:
      flat[f'{prefix}{name}'] = value
  return flat


def unknown_key_message(name: str) -> str:
  nearest = difflib.get_close_matches(name, list(KEYS), n=3, cutoff=0.5)
  if not nearest:  # Fall back to the keys of the same group.
    group = name.split('.')[0] + '.'
    nearest = [k for k in KEYS if k.startswith(group)][:6]
  hint = f'; nearest valid keys: {", ".join(nearest)}' if nearest else ''
  return f'unknown config key {name!r}{hint}'


def load_module(path: str | pathlib.Path):
  """The experiment file at path, imported as a module (get_config, and get_sweep if it sweeps)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f'no such experiment file {str(path)!r}')
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str | pathlib.Path) -> tuple[str, str | None]:
  """'path:arg' -> (path, arg); a bare path -> (path, None), as --config=path[:arg] reads it."""
  path, colon, arg = str(spec).partition(':')
  return path, arg if colon else None


def load_experiment(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
  """get_config() of an experiment file, or get_config(arg) for 'path:arg', as --config=spec gives it."""
  path, arg = split_spec(spec)
  module = load_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def _problem(name: str, value: Any) -> str | None:
  problem = KEYS[name].check.problem(value)
  return f'{name}={value!r}: {problem}' if problem else None


def override(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of config with {'group.key': value} set, as --config.group.key=value would."""
  config = copy.deepcopy(config)
  config.unlock()
  for name, value in values.items():
    if name not in KEYS:
      raise ConfigError(unknown_key_message(name))
    if problem := _problem(name, value):
      raise ConfigError(problem)
    *groups, leaf = name.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[leaf] = value
  return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key and cross-key rule; returns the config locked against new keys."""
  flat = flatten(config)
  for name in flat:
    if name not in KEYS:
      raise ConfigError(unknown_key_message(name))
  for name in KEYS:
    if name not in flat:
      raise ConfigError(f'missing config key {name!r}: start experiment configs from lm.config.base_config()')
    if problem := _problem(name, flat[name]):
      raise ConfigError(problem)
  for rule in RULES:
    if errors := rule(config):
      raise ConfigError(errors[0])
  config.lock()
  return config


def key_reference(markdown: bool = False) -> str:
  """Every key with its default, allowed values, resume rule and doc: what `--keys` prints."""
  if markdown:
    lines = ['| key | default | allowed | on resume | what |', '|---|---|---|---|---|']
    lines += [f'| `{k.name}` | `{k.default!r}` | {k.check.allowed} | {RESUME_RULES[k.resume]} | '
              f'{k.doc.replace("|", "/")} |' for k in KEYS.values() if k.name != 'mesh.logical_axis_rules']
    lines.append('| `mesh.logical_axis_rules` | see `lm/config/mesh.py` | (logical axis, mesh axes) pairs | may change '
                 f'| {KEYS["mesh.logical_axis_rules"].doc} |')
    return '\n'.join(lines)
  return '\n'.join(f'{k.name} = {k.default!r}\n    allowed: {k.check.allowed}; on resume: {RESUME_RULES[k.resume]}\n'
                   f'    {k.doc}' for k in KEYS.values())

