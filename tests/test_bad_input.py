"""Every bad input docs/reliability.md lists (bad data, damaged files, mismatched workdirs),
through the real commands: each is refused in one line starting `error:` that names the file, row or
key, with a non-zero exit status, no traceback, and every file of the case's folder (its inputs, its
workdir) as it was. A fresh workdir may be left existing, but empty (lm.main makes it first).

To add a case, append a Case to CASES: its setup writes the inputs into the case's own folder, and
'{dir}' in its argv and expected text stands for that folder. The commands start in parallel (each
mostly spends its time importing), so the file runs in about the time of a few of them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file
import zstandard

from conftest import QUICKSTART, ROOT, TINY
from lm import config as config_lib
from lm.data import builders
from lm.data.tokenizers import train_byte_level_bpe
from lm.training import workdirs

pytestmark = pytest.mark.slow  # About a minute: 25 commands, each starting JAX.

Snapshot = dict[str, 'bytes | None']  # Relative path: the file's bytes, or None for a folder.


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  setup: Callable[[pathlib.Path], None]  # Writes the case's inputs into its (empty) folder.
  argv: tuple[str, ...]  # After `python -m`; '{dir}' is the case's folder.
  expected: str  # Text of the one `error:` line; '{dir}' as in argv.


def _overrides(**extra) -> dict:
  """A tiny byte-level run on the case's text files; extra as {'data.name': ...} (keys with dots)."""
  return TINY | {'data.tokenizer': 'byte', 'data.name': 'text_files', 'data.paths': '{dir}/*.txt'} | extra


def _train(**extra) -> tuple[str, ...]:
  """python -m lm.main into the fresh workdir {dir}/run, with _overrides(**extra)."""
  flags = (f'--config.{k}={v}' for k, v in _overrides(**extra).items())
  return ('lm.main', f'--config={QUICKSTART}', '--workdir={dir}/run', *flags)


def _config(folder: pathlib.Path, **extra):
  """The config _train(**extra) runs with, built here."""
  values = {k: v.replace('{dir}', str(folder)) if isinstance(v, str) else v for k, v in _overrides(**extra).items()}
  return config_lib.validate(config_lib.override(config_lib.load_experiment(QUICKSTART), values))


def _text_files(folder: pathlib.Path) -> None:
  for name in ('a', 'b', 'c'):
    (folder / f'{name}.txt').write_text(f'The words of file {name}, said twice and more.\n' * 20)


def _files(**contents: bytes) -> Callable[[pathlib.Path], None]:
  """A setup writing files by name ('a_txt' is a.txt)."""
  def setup(folder: pathlib.Path) -> None:
    for name, content in contents.items():
      (folder / name.replace('_', '.')).write_bytes(content)
  return setup


ROWS = b''.join(b'{"text": "Row %d: %s"}\n' % (i, b'words ' * 20) for i in range(120))
FIRST_60 = ROWS.index(b'{"text": "Row 60')
GZIPPED = gzip.compress(ROWS, mtime=0)


def _cut_zstd(extra_bytes: int) -> Callable[[pathlib.Path], None]:
  """rows.jsonl.zst as a cut download leaves it: the blocks holding the first 60 rows (and extra_bytes
  of the 61st), but not the rest of the frame, nor its end."""
  def setup(folder: pathlib.Path) -> None:
    stream = zstandard.ZstdCompressor().compressobj()
    blob = stream.compress(ROWS[:FIRST_60 + extra_bytes]) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    (folder / 'rows.jsonl.zst').write_bytes(blob)
  return setup


def _cut_parquet(folder: pathlib.Path) -> None:
  pq.write_table(pa.table({'text': [f'Row {i}: ' + 'words ' * 20 for i in range(120)]}), folder / 'rows.parquet')
  whole = (folder / 'rows.parquet').read_bytes()
  (folder / 'rows.parquet').write_bytes(whole[:len(whole) * 2 // 3])


def _edited_since_checkpoints(folder: pathlib.Path) -> None:
  """A workdir as a run on the text files leaves it (config.json, dataset.json, a checkpoint folder:
  what the checks read), then a text file edited."""
  _text_files(folder)
  config = _config(folder)
  builder = builders.make_builder('text_files', None, config.data.paths, config.data.val_fraction)
  (folder / 'run' / 'checkpoints' / '4').mkdir(parents=True)
  workdirs.save_config(folder / 'run', config, {}, 4, f'{builder.info.full_name}:train')
  with open(folder / 'a.txt', 'a', encoding='utf-8') as f:
    f.write('A line added since.\n')


def _source_workdir(folder: pathlib.Path) -> None:
  """{dir}/source: the workdir of a TINY run with a checkpoint at step 4 (what check_init_from reads)."""
  _text_files(folder)
  (folder / 'source' / 'checkpoints' / '4').mkdir(parents=True)
  workdirs.save_config(folder / 'source', _config(folder), {}, 4, 'text_files')


def _export_into_a_used_folder(folder: pathlib.Path) -> None:
  _source_workdir(folder)
  (folder / 'out').mkdir()
  (folder / 'out' / 'notes.txt').write_text('Not to be overwritten.\n')


def _truncated_safetensors(folder: pathlib.Path) -> None:
  """A save_pretrained folder of a tiny GPT-2 whose model.safetensors lost its last 100 bytes."""
  hf = folder / 'hf'
  hf.mkdir()
  tokenizer = train_byte_level_bpe(['To be, or not to be, that is the question.'] * 10, 300)
  tokenizer.save(str(hf / 'tokenizer.json'))
  d, layers, vocab, positions = 16, 2, 300, 32
  (hf / 'config.json').write_text(json.dumps({'model_type': 'gpt2', 'vocab_size': vocab, 'n_positions': positions,
                                              'n_embd': d, 'n_layer': layers, 'n_head': 2}))
  rng = np.random.default_rng(0)
  tensors = {'wte.weight': (vocab, d), 'wpe.weight': (positions, d), 'ln_f.weight': (d,), 'ln_f.bias': (d,)}
  for i in range(layers):
    tensors |= {f'h.{i}.attn.c_attn.weight': (d, 3 * d), f'h.{i}.mlp.c_fc.weight': (d, 4 * d)}
  save_file({k: rng.normal(size=s).astype(np.float32) for k, s in tensors.items()}, str(hf / 'model.safetensors'))
  whole = (hf / 'model.safetensors').read_bytes()
  (hf / 'model.safetensors').write_bytes(whole[:-100])


_shards_lock = threading.Lock()
_shards_made: list[pathlib.Path] = []


def _shards(folder: pathlib.Path) -> pathlib.Path:
  """Token shards of the text files, written once by python -m lm.tokenize (under folder's parent)."""
  with _shards_lock:
    if not _shards_made:
      source = folder.parent / 'shards_source'
      source.mkdir()
      _text_files(source)
      subprocess.run([sys.executable, '-m', 'lm.tokenize', f'--config={QUICKSTART}', f'--out={source}/out',
                      '--config.data.name=text_files', f'--config.data.paths={source}/*.txt',
                      '--config.data.tokenizer=byte', f'--config.data.tfds_data_dir={source}/tfds', '--workers=1'],
                     check=True, capture_output=True, env=_env(), cwd=ROOT, timeout=300)
      _shards_made.append(source / 'out')
    return _shards_made[0]


def _short_shard(name: str) -> Callable[[pathlib.Path], None]:
  """{dir}/shards: the shards, with train/NAME three bytes short (a copy cut short)."""
  def setup(folder: pathlib.Path) -> None:
    shutil.copytree(_shards(folder), folder / 'shards')
    path = folder / 'shards' / 'train' / name
    path.write_bytes(path.read_bytes()[:-3])
  return setup


CASES = [
    Case('short_tokens_npy', _short_shard('00000.tokens.npy'),
         _train(**{'data.name': 'tokenized', 'data.paths': '{dir}/shards'}),
         "data.paths: '{dir}/shards/train/00000.tokens.npy' is truncated: "),
    Case('short_offsets_npy', _short_shard('00000.offsets.npy'),
         _train(**{'data.name': 'tokenized', 'data.paths': '{dir}/shards'}),
         "data.paths: '{dir}/shards/train/00000.offsets.npy' is truncated: 149 bytes, expected 152; tokenize again"),
    Case('missing_text_file', _files(), _train(**{'data.paths': '{dir}/absent.txt'}),
         "data.paths: '{dir}/absent.txt' is not a file"),
    Case('empty_text_file', _files(a_txt=b'Some text.\n', empty_txt=b''), _train(),
         "data.paths: '{dir}/empty.txt' is empty"),
    Case('non_utf8_text_file', _files(a_txt=b'Some text.\n', b_txt=b'Hello\n\xff world\n'), _train(),
         "data.paths: '{dir}/b.txt' is not UTF-8 text (byte 0xff at offset 6)"),
    Case('fewer_tokens_than_a_sequence', _files(a_txt=b'Hi.\n', b_txt=b'Yo.\n'), _train(),
         "data.train_split='train' holds 5 tokens, fewer than one training sequence (33 tokens for data.seq_len=32)"),
    Case('malformed_text_pairs', _files(pairs_tsv=b'a question\tan answer\nonly\ttwo\tthree\n'),
         _train(**{'model.kind': 'encoder_decoder', 'data.objective': 'seq2seq', 'data.name': 'text_pairs',
                   'data.paths': '{dir}/pairs.tsv', 'data.seq_len': 24, 'data.target_len': 24}),
         "data.paths: '{dir}/pairs.tsv' line 2 has 3 tab-separated fields; expected input<TAB>target"),
    Case('tfds_dataset_not_prepared', lambda folder: (folder / 'tfds').mkdir(),
         _train(**{'data.name': 'lm1b', 'data.paths': '', 'data.tfds_data_dir': '{dir}/tfds'}),
         "TFDS dataset 'lm1b' is not prepared in {dir}/tfds; prepare it once with: "
         'tfds build lm1b --file_format=array_record --data_dir={dir}/tfds'),
    Case('no_such_split', _text_files, _train(**{'data.eval_split': 'valid'}),
         "data.eval_split='valid' is not a split of 'text_files'; it has train, validation"),
    Case('no_such_feature', _files(), _train(**{'data.name': 'shakespeare', 'data.paths': '', 'data.text_key': 'body',
                                                'data.tfds_data_dir': '{dir}/tfds'}),
         "data.text_key='body' is not a feature of 'shakespeare'; it has doc, text"),
    Case('text_files_edited_since_checkpoints', _edited_since_checkpoints, _train(),
         "the data changed since this workdir's checkpoints were written"),
    Case('malformed_jsonl_row', _files(rows_jsonl=b'{"text": "a"}\n{"text": "b'),
         _train(**{'data.paths': '{dir}/rows.jsonl'}),
         "data.paths: '{dir}/rows.jsonl' row 2 is not JSON (Unterminated string starting at column 10)"),
    Case('jsonl_zst_cut_at_a_row', _cut_zstd(0), _train(**{'data.paths': '{dir}/rows.jsonl.zst'}),
         "data.paths: '{dir}/rows.jsonl.zst' is truncated after row 60"),
    Case('jsonl_zst_cut_in_a_row', _cut_zstd(25), _train(**{'data.paths': '{dir}/rows.jsonl.zst'}),
         "data.paths: '{dir}/rows.jsonl.zst' is truncated after row 60"),
    Case('jsonl_gz_cut', _files(rows_jsonl_gz=GZIPPED[:len(GZIPPED) // 2]),
         _train(**{'data.paths': '{dir}/rows.jsonl.gz'}), "data.paths: '{dir}/rows.jsonl.gz' is truncated after row"),
    Case('parquet_cut', _cut_parquet, _train(**{'data.paths': '{dir}/rows.parquet'}),
         "data.paths: '{dir}/rows.parquet' is truncated: it starts as a Parquet file but lacks the footer that "
         'ends one'),
    Case('init_from_of_another_shape', _source_workdir,
         _train(**{'checkpoint.init_from': '{dir}/source', 'model.max_len': 64, 'model.num_layers': 3,
                   'model.num_heads': 4, 'model.d_model': 64, 'model.mlp_dim': 128}),
         "checkpoint.init_from='{dir}/source' holds a differently shaped model: model.d_model is 32 there, 64 here, "
         'model.max_len is 32 there, 64 here, model.mlp_dim is 64 there, 128 here, model.num_heads is 2 there, 4 here, '
         'model.num_layers is 2 there, 3 here'),
    Case('truncated_safetensors', _truncated_safetensors,
         ('lm.hf', 'import', '--hf_dir={dir}/hf', '--workdir={dir}/run'),
         "'{dir}/hf/model.safetensors' is truncated: tensor "),
    Case('export_into_a_used_folder', _export_into_a_used_folder,
         ('lm.hf', 'export', '--workdir={dir}/source', '--hf_dir={dir}/out'),
         "'{dir}/out' is not empty; export into a new --hf_dir, or give --overwrite to replace its files"),
    Case('workdir_is_a_file', _files(run=b'notes\n'), _train(),
         "{dir}/run is a file, not a folder: "),
    Case('get_config_raises', _files(exp_py=b'def get_config():\n  return helper()\n\n\n'
                                     b'def helper():\n  raise ValueError("no such size")\n'),
         ('lm.main', '--config={dir}/exp.py', '--workdir={dir}/run'),
         '--config: {dir}/exp.py line 6 in helper: ValueError: no such size'),
    Case('harness_limit_zero', _files(), ('lm.harness', '--workdir={dir}/run', '--tasks=shakespeare', '--limit=0'),
         '--limit=0: must be > 0 (documents per task; below 1, a fraction of them)'),
    Case('harness_limit_negative', _files(), ('lm.harness', '--workdir={dir}/run', '--tasks=shakespeare',
                                              '--limit=-3'), '--limit=-3: must be > 0'),
    Case('generate_no_new_tokens', _files(), ('lm.generate', '--workdir={dir}/run', '--prompt=x',
                                              '--max_new_tokens=0'), '--max_new_tokens=0: must be >= 1'),
    Case('generate_greedy_copies', _files(), ('lm.generate', '--workdir={dir}/run', '--prompt=x', '--temperature=0',
                                              '--num_return_sequences=2'),
         'do not support --num_return_sequences different than 1 (got 2)'),
]


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')  # No accelerator probing: a faster start.


def _snapshot(folder: pathlib.Path) -> Snapshot:
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob('*'))}


@dataclasses.dataclass
class Outcome:
  folder: pathlib.Path
  result: subprocess.CompletedProcess
  before: Snapshot
  after: Snapshot


def _run(case: Case, folder: pathlib.Path) -> Outcome:
  folder.mkdir()
  case.setup(folder)
  before = _snapshot(folder)
  argv = [sys.executable, '-m', *(arg.replace('{dir}', str(folder)) for arg in case.argv)]
  result = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
  return Outcome(folder, result, before, _snapshot(folder))


@pytest.fixture(scope='module')
def outcomes(request, tmp_path_factory):
  """{case id: Future of its Outcome}: the cases this session runs, started at once, a few at a time."""
  ids = {item.callspec.id for item in request.session.items
         if item.module is request.module and hasattr(item, 'callspec')}
  root = tmp_path_factory.mktemp('bad_input')
  with concurrent.futures.ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
    yield {case.id: pool.submit(_run, case, root / case.id) for case in CASES if case.id in ids}


@pytest.mark.parametrize('case', CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_one_line(case, outcomes):
  out = outcomes[case.id].result()
  output = out.result.stdout + out.result.stderr
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert out.result.returncode != 0, output[-3000:]
  assert len(errors) == 1, output[-3000:]
  assert case.expected.replace('{dir}', str(out.folder)) in errors[0]
  assert 'Traceback' not in output, output[-3000:]
  after = dict(out.after)
  if 'run' not in out.before:  # lm.main makes its workdir before checking anything: it may exist, empty.
    after.pop('run', None)
  changed = sorted(k for k in out.before.keys() | after.keys() if out.before.get(k, 0) != after.get(k, 0))
  assert not changed, f'{case.id} changed {changed}'
