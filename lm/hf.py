"""Open-model weights in and out of Hugging Face's format (a `save_pretrained` folder: config.json,
model.safetensors or its shards, tokenizer.json), for the families lm.kinds converts: gpt2, llama,
mistral, mixtral, qwen2, qwen3, qwen3_moe. Needs the `hf` extra: pip install -e '.[hf]'.

  python -m lm.hf import --hf_dir=path/to/gpt2 --workdir=runs/gpt2    # then lm.generate, lm.evaluate,
                                                                      # or checkpoint.init_from=runs/gpt2
  python -m lm.hf export --workdir=runs/x --hf_dir=out/x              # transformers can load out/x (a new
                                                                      # or empty folder; else --overwrite)
  python -m lm.hf import --hf_dir=DIR --workdir=W --config.mesh.shape=1,8,1   # straight into FSDP shards

Only files on disk are read: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Iterable

from absl import flags, logging
from flax import traverse_util
import jax
import ml_collections
import numpy as np

from lm import cli, kinds
from lm.config import ConfigError, flatten, override, validate
from lm.data import tokenizers
from lm.inference.run import SavedRun
from lm.training import checkpoint, lock, saved, train, workdirs

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
  model.safetensors.index.json lists): get(name, shape) is one float32 array, checked against shape.
  Read through PyTorch, which knows bfloat16 (numpy does not); each file is opened for one tensor and
  closed again, so its memory map does not keep the tensors read before in memory."""

  def __init__(self, hf_dir: pathlib.Path, prefix: str = ''):
    self._safetensors = require('safetensors')
    require('torch')
    index = hf_dir / 'model.safetensors.index.json'
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    elif (hf_dir / 'model.safetensors').is_file():
      files = ['model.safetensors']
    else:
      raise ConfigError(f'no model.safetensors or model.safetensors.index.json in {str(hf_dir)!r}: expected a '
                        'folder written by save_pretrained')
    for file_name in files:
      if (hf_dir / file_name).is_file():
        check_safetensors(hf_dir / file_name)
    self._dir = hf_dir
    # Names as the family spells them: some checkpoints leave its prefix out (GPT-2's 'transformer.').
    self._where = {}
    for file_name in files:
      with self._open(file_name) as f:
        for name in f.keys():
          self._where[name] = (file_name, name)
          if prefix and not name.startswith(prefix):
            self._where[prefix + name] = (file_name, name)
    self.prefix = prefix

  def _open(self, file_name: str):
    if not (self._dir / file_name).is_file():
      raise ConfigError(f'{str(self._dir / file_name)!r} is missing (model.safetensors.index.json lists it)')
    return self._safetensors.safe_open(str(self._dir / file_name), framework='pt')

  def has(self, name: str) -> bool:
    return self.prefix + name in self._where or name in self._where

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    where = self._where.get(name) or self._where.get(self.prefix + name)
    if where is None:
      raise ConfigError(f'the checkpoint has no tensor {name!r} (config.json implies it)')
    with self._open(where[0]) as f:
      tensor = f.get_tensor(where[1])
    if tuple(tensor.shape) != tuple(shape):
      raise ConfigError(f'{name} in {where[0]} is {tuple(tensor.shape)}, config.json implies {tuple(shape)}')
    return tensor.float().numpy()


SAFETENSORS_DTYPE_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E4M3': 1, 'F8_E5M2': 1, 'I16': 2, 'U16': 2, 'F16': 2,
                           'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}


def check_safetensors(path: pathlib.Path) -> None:
  """Refuses, in one line naming the file, a safetensors file that is cut short or malformed: its
  8-byte header length, its JSON header, and each tensor's data_offsets (within the file, of the size
  its shape and dtype take) are checked before anything is memory-mapped."""
  where, size = repr(str(path)), path.stat().st_size
  with open(path, 'rb') as f:
    length = int.from_bytes(f.read(8), 'little')
    if size < 8 or 8 + length > size:
      raise ConfigError(f'{where} is truncated: its safetensors header ends at byte {8 + length if size >= 8 else 8}, '
                        f'but the file holds {size}')
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConfigError(f'{where} is not a safetensors file: its header is not JSON ({e})') from None
  if not isinstance(header, dict):
    raise ConfigError(f'{where} is not a safetensors file: its header is not a JSON object')
  data_bytes = size - 8 - length
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    try:
      begin, end = entry['data_offsets']
      shape, itemsize = entry['shape'], SAFETENSORS_DTYPE_BYTES.get(entry['dtype'])
    except (TypeError, KeyError, ValueError):
      raise ConfigError(f'{where} is not a safetensors file: tensor {name!r} has no dtype, shape and '
                        'data_offsets') from None
    if end > data_bytes:
      raise ConfigError(f'{where} is truncated: tensor {name!r} ends at byte {8 + length + end}, but the '
                        f'file holds {size}')
    if itemsize and end - begin != itemsize * np.prod(shape, dtype=np.int64):
      raise ConfigError(f'{where} is not a safetensors file: tensor {name!r} of shape {tuple(shape)} '
                        f'{entry["dtype"]} takes {end - begin} bytes')


def read_hf(hf_dir: str | pathlib.Path, mesh: ml_collections.ConfigDict | dict | None = None,
            devices: list[jax.Device] | None = None) -> SavedRun:
  """The model in hf_dir (of a model_type lm.kinds converts: see lm.kinds.hf_families) with its
  tokenizer, in memory as a run of step 0 (what lm.training.saved.load gives for a workdir).

  Tensors stream: each is read from its safetensors file, converted and placed straight into its
  shards on the mesh that `mesh` (mesh.* keys, e.g. {'shape': (1, 8, 1)}) lays over `devices`
  (default: all), so the host holds one tensor at a time and a model larger than one device imports
  onto devices that hold it together. Without `mesh`, one device."""
  hf_dir = pathlib.Path(hf_dir)
  family, config = _family_and_config(hf_dir)
  tokenizer = tokenizers.HuggingFaceTokenizer((hf_dir / 'tokenizer.json').read_text(encoding='utf-8'),
                                              _eos_token(hf_dir))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'tokenizer.json has {tokenizer.vocab_size} tokens but config.json vocab_size='
                      f'{config.model.vocab_size}: they do not belong together')
  if mesh:
    config = validate(override(config, {f'mesh.{k}': v for k, v in dict(mesh).items()}))
    layout = train.make_layout(config, devices, check_batches=False)
  else:
    config = override(config, {'mesh.shape': (1, 1, 1)})
    layout = train.make_layout(config, list(devices or jax.devices())[:1], check_batches=False)
  tensors = Tensors(hf_dir, getattr(family, 'prefix', ''))
  like = traverse_util.flatten_dict(train.abstract_train_state(layout).params, sep='/')
  params = {}
  for path, array in family.params_from_hf(tensors, config.model):
    target = like[path]
    assert array.shape == target.shape, f'{family.model_type} converter: {path} is {array.shape}, not {target.shape}'
    params[path] = jax.make_array_from_callback(target.shape, target.sharding,
                                                lambda index, a=array, t=target: np.asarray(a[index], t.dtype))
    del array  # Only its shards stay, on their devices.
  assert params.keys() == like.keys(), f'{family.model_type} converter left out {sorted(like.keys() - params.keys())}'
  return SavedRun(config, layout.model, traverse_util.unflatten_dict(params, sep='/'), tokenizer, 0, layout.mesh,
                        hf_dir)


def import_hf(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path,
              mesh: ml_collections.ConfigDict | dict | None = None,
              devices: list[jax.Device] | None = None) -> ml_collections.ConfigDict:
  """Writes a workdir holding the model in hf_dir (read by `read_hf`, which see) as step 0
  (parameters only) with its tokenizer; returns its config. Generate from it, evaluate it, or
  fine-tune it with checkpoint.init_from."""
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
  with lock.acquire(workdir):  # One writer: refused at once while another holds the workdir.
    if workdirs.has_checkpoints(workdir / 'checkpoints'):
      raise ConfigError(f'{str(workdir)!r} already holds checkpoints; import into a new --workdir')
    run = read_hf(hf_dir, mesh, devices)
    family, config = _family_and_config(hf_dir)
    config = run.config if mesh else config  # Without a mesh, the workdir keeps the default mesh.shape.
    tokenizer = run.tokenizer
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizers.save(tokenizer, workdir / 'tokenizer', {'kind': 'huggingface', 'vocab_size': tokenizer.vocab_size,
                                                       'imported_from': str(hf_dir.absolute())})
    (workdir / 'config.json').write_text(json.dumps(flatten(config), indent=1, sort_keys=True))
    (workdir / workdirs.IMPORTED_FILE).write_text(json.dumps({'imported_from': str(hf_dir.absolute()),
                                                              'model_type': family.model_type}))
    checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints', config.checkpoint)
    checkpointer.save_params(0, run.params)
    checkpointer.close()
    return config


def _family_and_config(hf_dir: pathlib.Path):
  """The lm.kinds family of a save_pretrained folder and the lm config of its config.json."""
  for name in ('config.json', 'tokenizer.json'):
    if not (hf_dir / name).is_file():
      raise ConfigError(f'no {name} in {str(hf_dir)!r}: expected a folder written by save_pretrained '
                        '(config.json, model.safetensors) with the tokenizer\'s tokenizer.json')
  hf_json = json.loads((hf_dir / 'config.json').read_text())
  family = kinds.for_hf(hf_json.get('model_type'))
  return family, family.config_from_hf(hf_json)


def _eos_token(hf_dir: pathlib.Path) -> str | None:
  """tokenizer_config.json's eos_token (a string, or a dict with its content), if the folder has one."""
  path = hf_dir / 'tokenizer_config.json'
  eos = json.loads(path.read_text()).get('eos_token') if path.is_file() else None
  return eos.get('content') if isinstance(eos, dict) else eos


SHARD_BYTES = 2 << 30  # Export's largest safetensors file (one tensor larger than this is a file alone).


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], hf_dir: pathlib.Path,
                      max_shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Writes (name, array) pairs as save_pretrained does: model.safetensors, or shards
  model-0000i-of-0000N.safetensors of at most max_shard_bytes with model.safetensors.index.json.
  Holds one shard on the host at a time; replaces the weight files of an earlier export. Returns the
  files written."""
  safetensors_numpy = require('safetensors.numpy')
  for old in [*hf_dir.glob('model*.safetensors'), hf_dir / 'model.safetensors.index.json']:
    old.unlink(missing_ok=True)
  written, shard, size = [], {}, 0

  def flush():
    path = hf_dir / f'model-{len(written) + 1:05d}.safetensors.partial'
    safetensors_numpy.save_file(shard, str(path), metadata={'format': 'pt'})
    written.append((path, list(shard), sum(a.nbytes for a in shard.values())))
    shard.clear()

  for name, array in tensors:
    if shard and size + array.nbytes > max_shard_bytes:
      flush()
      size = 0
    shard[name], size = array, size + array.nbytes
  flush()
  for path, _, _ in written:  # safetensors writes 0600, as a temporary file; the rest are the usual 0666 - umask.
    path.chmod(_usual_mode())
  if len(written) == 1:
    written[0][0].rename(hf_dir / 'model.safetensors')
    return ['model.safetensors']
  names = [f'model-{i + 1:05d}-of-{len(written):05d}.safetensors' for i in range(len(written))]
  weight_map = {}
  for (path, tensor_names, _), name in zip(written, names):
    path.rename(hf_dir / name)
    weight_map |= {t: name for t in tensor_names}
  index = {'metadata': {'total_size': sum(n for _, _, n in written)}, 'weight_map': weight_map}
  (hf_dir / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))
  return names


def _usual_mode() -> int:
  """The mode a new file gets from open(): 0666 less the process's umask (0644 under the default)."""
  umask = os.umask(0o022)
  os.umask(umask)
  return 0o666 & ~umask


def export_hf(workdir: str | pathlib.Path, hf_dir: str | pathlib.Path, step: int | None = None,
              model_type: str | None = None, mesh: ml_collections.ConfigDict | dict | None = None,
              devices: list[jax.Device] | None = None, max_shard_bytes: int = SHARD_BYTES,
              overwrite: bool = False) -> pathlib.Path:
  """Writes the run's parameters at `step` (default: latest) as a transformers folder of model_type
  (default: the most specific family that expresses the model, see lm.kinds.hf_family_of), with its
  tokenizer.json if the run uses a Hugging Face tokenizer. The parameters are restored onto the mesh
  that `mesh` (mesh.* keys) lays over `devices` (default: one device) and come to the host one tensor
  at a time, written in shards of at most max_shard_bytes. A folder that holds anything is refused
  unless `overwrite` (then the files of the same names are replaced)."""
  workdir, hf_dir = pathlib.Path(workdir), pathlib.Path(hf_dir)
  with lock.acquire(hf_dir):  # Refuses a file, or a folder another writer holds.
    if not overwrite and hf_dir.is_dir() and any(p.name != lock.LOCK_FILE for p in hf_dir.iterdir()):
      raise ConfigError(f'{str(hf_dir)!r} is not empty; export into a new --hf_dir, or give --overwrite to replace '
                        'its files')
    require('safetensors')
    mesh_shape = tuple(dict(mesh)['shape']) if mesh and 'shape' in dict(mesh) else None
    run = saved.load(workdir, step, devices=devices if mesh_shape else list(devices or jax.devices())[:1],
                     mesh_shape=mesh_shape or (1, 1, 1))
    family = kinds.hf_family_of(run.config.model, model_type)
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(family.params_to_hf(run.params, run.config.model), hf_dir, max_shard_bytes)
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
  flags.DEFINE_float('max_shard_gb', SHARD_BYTES / 2**30, 'export: the largest safetensors file, in GiB.')
  flags.DEFINE_bool('overwrite', False, 'export: write into a --hf_dir that holds files, replacing those of the '
                    'same names.')
  cli.mesh_flag()


def _mesh_flags() -> dict | None:
  """The mesh.* keys given on the command line (None: one device)."""
  given = {arg[len('--config.mesh.'):].split('=', 1)[0] for arg in sys.argv if arg.startswith('--config.mesh.')}
  return {k: FLAGS.config.mesh[k] for k in given} or None


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ('import', 'export') or not FLAGS.hf_dir or not FLAGS.workdir:
    sys.exit('usage: python -m lm.hf import --hf_dir=DIR --workdir=runs/NAME [--config.mesh.shape=D,F,T] | '
             'python -m lm.hf export --workdir=runs/NAME --hf_dir=DIR [--config.mesh.shape=D,F,T] [--max_shard_gb=G] '
             '[--overwrite]')
  logging.set_verbosity(logging.WARNING)
  try:
    if argv[1] == 'import':
      config = import_hf(FLAGS.hf_dir, FLAGS.workdir, mesh=_mesh_flags())
      m = config.model
      family = json.loads((pathlib.Path(FLAGS.workdir) / workdirs.IMPORTED_FILE).read_text())['model_type']
      print(f'imported a {family} model of {m.num_layers} layers, width {m.d_model}, {m.vocab_size} tokens into '
            f'{FLAGS.workdir}/ (step 0)')
    else:
      hf_dir = export_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.step, FLAGS.model_type, mesh=_mesh_flags(),
                         max_shard_bytes=int(FLAGS.max_shard_gb * 2**30), overwrite=FLAGS.overwrite)
      print(f'exported to {hf_dir}/')
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
