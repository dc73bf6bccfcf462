"""Open-model weights in and out of Hugging Face's format (a `save_pretrained` folder: config.json,
model.safetensors or its shards, tokenizer.json), for the families lm.kinds converts: gpt2, llama,
mistral, mixtral, qwen2, qwen3. Needs the `hf` extra: pip install -e '.[hf]'.

  python -m lm.hf import --hf_dir=path/to/gpt2 --workdir=runs/gpt2    # then lm.generate, lm.evaluate,
                                                                      # or checkpoint.init_from=runs/gpt2
  python -m lm.hf export --workdir=runs/x --hf_dir=out/x              # transformers can load out/x

Only files on disk are read: nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags, logging
import jax
import ml_collections
import numpy as np

from lm import checkpoint, cli, kinds, saved, sharding, workdirs
from lm.config import ConfigError, flatten
from lm.data import tokenizers

FLAGS = flags.FLAGS

def require(module: str):
  """The module, or a ConfigError saying to install the hf extra."""
  try:
    return __import__(module, fromlist=['_'])
  except ImportError:
    raise ConfigError(f"Hugging Face import/export needs the '{module.split('.')[0]}' package: "
                      "pip install -e '.[hf]'") from None


class Tensors:
  """The tensors of a save_pretrained folder, read one at a time (model.safetensors, or the shards a
  model.safetensors.index.json lists): get(name, shape) is one float32 array, checked against shape."""

  def __init__(self, hf_dir: pathlib.Path, prefix: str = ''):
    safetensors = require('safetensors')
    index = hf_dir / 'model.safetensors.index.json'
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    elif (hf_dir / 'model.safetensors').is_file():
      files = ['model.safetensors']
    else:
      raise ConfigError(f'no model.safetensors or model.safetensors.index.json in {str(hf_dir)!r}: expected a '
                        'folder written by save_pretrained')
    self._files = {name: safetensors.safe_open(str(hf_dir / name), framework='numpy') for name in files}
    # Names as the family spells them: some checkpoints leave its prefix out (GPT-2's 'transformer.').
    self._where = {}
    for file_name, f in self._files.items():
      for name in f.keys():
        self._where[name] = (file_name, name)
        if prefix and not name.startswith(prefix):
          self._where[prefix + name] = (file_name, name)
    self.prefix = prefix

  def has(self, name: str) -> bool:
    return self.prefix + name in self._where or name in self._where

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    where = self._where.get(name) or self._where.get(self.prefix + name)
    if where is None:
      raise ConfigError(f'the checkpoint has no tensor {name!r} (config.json implies it)')
    tensor = self._files[where[0]].get_tensor(where[1])
    if tuple(tensor.shape) != tuple(shape):
      raise ConfigError(f'{name} in {where[0]} is {tuple(tensor.shape)}, config.json implies {tuple(shape)}')
    return np.asarray(tensor, np.float32)


def _eos_token(hf_dir: pathlib.Path) -> str | None:
  """tokenizer_config.json's eos_token (a string, or a dict with its content), if the folder has one."""
  path = hf_dir / 'tokenizer_config.json'
  eos = json.loads(path.read_text()).get('eos_token') if path.is_file() else None
  return eos.get('content') if isinstance(eos, dict) else eos


def import_hf(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Writes a workdir holding the model in hf_dir (of a model_type lm.kinds converts: see
  lm.kinds.hf_families) as step 0 (parameters only) with its tokenizer; returns its config. Generate
  from it, evaluate it, or fine-tune it with checkpoint.init_from."""
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
  for name in ('config.json', 'tokenizer.json'):
    if not (hf_dir / name).is_file():
      raise ConfigError(f'no {name} in {str(hf_dir)!r}: expected a folder written by save_pretrained '
                        '(config.json, model.safetensors) with the tokenizer\'s tokenizer.json')
  if workdirs.has_checkpoints(workdir / 'checkpoints'):
    raise ConfigError(f'{str(workdir)!r} already holds checkpoints; import into a new --workdir')
  hf_json = json.loads((hf_dir / 'config.json').read_text())
  family = kinds.for_hf(hf_json.get('model_type'))
  config = family.config_from_hf(hf_json)
  tokenizer = tokenizers.HuggingFaceTokenizer((hf_dir / 'tokenizer.json').read_text(encoding='utf-8'),
                                              _eos_token(hf_dir))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'tokenizer.json has {tokenizer.vocab_size} tokens but config.json vocab_size='
                      f'{config.model.vocab_size}: they do not belong together')
  params = family.params_from_hf(Tensors(hf_dir, getattr(family, 'prefix', '')), config.model)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizers.save(tokenizer, workdir / 'tokenizer', {'kind': 'huggingface', 'vocab_size': tokenizer.vocab_size,
                                                     'imported_from': str(hf_dir.absolute())})
  (workdir / 'config.json').write_text(json.dumps(flatten(config), indent=1, sort_keys=True))
  (workdir / workdirs.IMPORTED_FILE).write_text(json.dumps({'imported_from': str(hf_dir.absolute()),
                                                            'model_type': family.model_type}))
  checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints', config.checkpoint)
  checkpointer.save_params(0, jax.tree.map(np.asarray, params))
  checkpointer.close()
  return config


def export_hf(workdir: str | pathlib.Path, hf_dir: str | pathlib.Path, step: int | None = None,
              model_type: str | None = None) -> pathlib.Path:
  """Writes the run's parameters at `step` (default: latest) as a transformers folder of model_type
  (default: the most specific family that expresses the model, see lm.kinds.hf_family_of), with its
  tokenizer.json if the run uses a Hugging Face tokenizer."""
  safetensors_numpy = require('safetensors.numpy')
  workdir, hf_dir = pathlib.Path(workdir), pathlib.Path(hf_dir)
  run = saved.load(workdir, step, devices=jax.devices()[:1], mesh_shape=(1, 1, 1))
  family = kinds.hf_family_of(run.config.model, model_type)
  hf_dir.mkdir(parents=True, exist_ok=True)
  tensors = dict(family.params_to_hf(sharding.to_host(run.params), run.config.model))
  safetensors_numpy.save_file(tensors, str(hf_dir / 'model.safetensors'), metadata={'format': 'pt'})
  tokenizer = run.tokenizer
  config = family.hf_config(run.config.model, tokenizer.bos_id, tokenizer.eos_id)
  (hf_dir / 'config.json').write_text(json.dumps(config, indent=2))
  if isinstance(tokenizer, tokenizers.HuggingFaceTokenizer):
    (hf_dir / 'tokenizer.json').write_text(tokenizer.json_text, encoding='utf-8')
    bos, eos = tokenizer.token(tokenizer.bos_id), tokenizer.token(tokenizer.eos_id)
    (hf_dir / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': bos, 'eos_token': eos, 'unk_token': eos,
        'pad_token': eos, 'model_max_length': run.config.model.max_len}, indent=2))
    (hf_dir / 'generation_config.json').write_text(json.dumps({
        'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id, 'pad_token_id': tokenizer.pad_id}))
  return hf_dir


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('hf_dir', None, 'The Hugging Face folder to read (import) or write (export).')
  flags.DEFINE_string('workdir', None, 'The lm workdir to write (import) or read (export).')
  flags.DEFINE_integer('step', None, 'export: the checkpoint to write (default: the latest).')
  flags.DEFINE_string('model_type', None, "export: the family to write (default: the most specific that "
                      "expresses the model), e.g. 'mistral' for a Llama-shaped run.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ('import', 'export') or not FLAGS.hf_dir or not FLAGS.workdir:
    sys.exit('usage: python -m lm.hf import --hf_dir=DIR --workdir=runs/NAME | '
             'python -m lm.hf export --workdir=runs/NAME --hf_dir=DIR')
  logging.set_verbosity(logging.WARNING)
  try:
    if argv[1] == 'import':
      config = import_hf(FLAGS.hf_dir, FLAGS.workdir)
      m = config.model
      family = json.loads((pathlib.Path(FLAGS.workdir) / workdirs.IMPORTED_FILE).read_text())['model_type']
      print(f'imported a {family} model of {m.num_layers} layers, width {m.d_model}, {m.vocab_size} tokens into '
            f'{FLAGS.workdir}/ (step 0)')
    else:
      print(f'exported to {export_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.step, FLAGS.model_type)}/')
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
