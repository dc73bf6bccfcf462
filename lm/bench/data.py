"""python -m lm.bench data: tokens per second each kind of source delivers, against what the train step consumes.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import tempfile
import time

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from lm.bench.timing import median
from lm.config import override
from lm.data import pipeline
from lm.parallel import sharding
from lm.tokenize import tokenize
from lm.training import train

DATA_KINDS = ('text', 'jsonl', 'parquet', 'tokenized', 'mixture')


def _write_data_formats(corpus: pipeline.Corpus, text_key: str, folder: pathlib.Path) -> dict[str, str]:
  """The corpus's train and eval documents as .txt, .jsonl.zst and .parquet files (train in 0_*, eval
  in 1_*, so that text_files splits them as they were): {kind: data.paths glob}."""
  for kind in ('text', 'jsonl', 'parquet'):
    (folder / kind).mkdir(parents=True, exist_ok=True)
  for index, source in enumerate((corpus.train_source, corpus.eval_source)):
    texts = [pipeline.example_text(source[i], text_key) for i in range(len(source))]
    (folder / 'text' / f'{index}_docs.txt').write_text('\n\n'.join(texts), encoding='utf-8')
    rows = ''.join(json.dumps({'text': t}) + '\n' for t in texts).encode()
    (folder / 'jsonl' / f'{index}_docs.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(rows))
    pq.write_table(pa.table({'text': texts}), folder / 'parquet' / f'{index}_docs.parquet')
  return {'text': str(folder / 'text' / '*.txt'), 'jsonl': str(folder / 'jsonl' / '*.jsonl.zst'),
          'parquet': str(folder / 'parquet' / '*.parquet')}


def _delivered_tokens_per_s(config, corpus, batches: int) -> float:
  """Tokens per second train_dataset delivers after its first batch (the threads started, the first
  shuffle window read) over `batches` batches, or over four shuffle windows' worth if that is more
  (each window is read whole before it is served)."""
  rows = config.data.batch_size
  batches = max(batches, -(-4 * config.data.shuffle_window // rows))
  data = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  next(data)
  start = time.perf_counter()
  for _ in range(batches):
    next(data)
  return batches * rows * config.data.seq_len / (time.perf_counter() - start)


def bench_data(config, workdir: pathlib.Path, data_batches: int = 50, steps: int = 5, repeats: int = 3) -> dict:
  """Tokens per second each source kind delivers (DATA_KINDS: the config's documents as text, JSONL,
  Parquet, lm.tokenize shards, and a half-and-half mixture of JSONL and shards), each read with this
  process pinned to one core, beside the tokens per second the config's train step consumes on all
  devices; and lm.tokenize's text MB/s on one worker."""
  folder = workdir / 'data'
  base = pipeline.load_corpus(config.data, config.model.vocab_size, folder / 'tokenizer')
  paths = _write_data_formats(base, config.data.text_key, folder)
  shards_dir = tempfile.mkdtemp(dir=folder, prefix='tokenized_')  # Fresh: lm.tokenize measured from scratch.
  shards = tokenize(override(config, {'data.name': 'text_files', 'data.paths': paths['jsonl']}).data,
                    config.model.vocab_size, shards_dir, workers=1, progress=False)
  configs = {kind: override(config, {'data.name': 'text_files', 'data.paths': paths[kind]})
             for kind in ('text', 'jsonl', 'parquet')}
  configs['tokenized'] = override(config, {'data.name': 'tokenized', 'data.paths': shards_dir})
  configs['mixture'] = override(config, {'data.mixture': f'text_files={paths["jsonl"]}:0.5,tokenized={shards_dir}:0.5',
                                         'data.paths': ''})
  corpora = {kind: pipeline.load_corpus(c.data, c.model.vocab_size, folder / f'tokenizer_{kind}')
             for kind, c in configs.items()}

  # What training consumes, on all devices, from batches made beforehand.
  layout = train.make_layout(config)
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, base, config.seed)), 2 + steps))
  state = train.init_train_state(layout)
  place = lambda b: sharding.global_batch(b, layout.batch_sharding, config.data.batch_size)
  with sharding.activate(layout.mesh, layout.rules):
    step = train.jit_train_step(layout, config.train).lower(state, place(batches[0])).compile()
  for batch in batches[:2]:
    state, step_metrics = step(state, place(batch))
  jax.block_until_ready(step_metrics)
  windows = []
  for _ in range(repeats):
    placed = [place(b) for b in batches[2:]]
    start = time.perf_counter()
    for batch in placed:
      state, step_metrics = step(state, batch)
    jax.block_until_ready(step_metrics)
    windows.append((time.perf_counter() - start) / steps)
  consumed = config.data.batch_size * config.data.seq_len / median(windows)

  cores = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(cores)})  # One core reads (Grain's thread and this one).
  try:
    delivered = {kind: _delivered_tokens_per_s(configs[kind], corpora[kind], data_batches) for kind in DATA_KINDS}
  finally:
    os.sched_setaffinity(0, cores)
  text_mb = shards['text_bytes_this_run'] / 1e6
  return {'bench': 'data', 'train_tokens_per_s': consumed, 'train_step_s': median(windows),
          'devices': layout.mesh.size, 'batch_size': config.data.batch_size, 'seq_len': config.data.seq_len,
          **{f'{kind}_tokens_per_s': v for kind, v in delivered.items()},
          **{f'{kind}_to_train_ratio': v / consumed for kind, v in delivered.items()},
          'tokenize_text_mb': text_mb, 'tokenize_worker_s': shards['worker_seconds_this_run'],
          'tokenize_mb_per_s_per_core': text_mb / shards['worker_seconds_this_run'],
          'tokenizer': config.data.tokenizer, 'vocab_size': shards['tokenizer']['vocab_size']}
