"""Tokenize a dataset once, for many runs:

  python -m lm.tokenize --config=experiments/quickstart.py --out=data/plays
  python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs \\
      --config.data.name=tokenized --config.data.paths=data/plays

The config's data section says what to read (any data.name a run reads: shakespeare, text_files in
any of its formats, a TFDS dataset) and the tokenizer (trained on the train split, as a run would,
or taken from --config.checkpoint.init_from). Both splits are written as token shards (see
lm/data/tokenized.py) by --workers processes; a rerun after a kill keeps the finished shards and
makes the rest. A run with another tokenizer or vocabulary is refused when it opens them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pathlib
import sys
import time

from absl import flags
import tqdm

from lm import cli
from lm.config import ConfigError, reserved_ids, validate
from lm.data import builders, pipeline, tokenized, tokenizers
from lm.training import lock

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.config_flag()
  flags.DEFINE_string('out', None, 'Folder for the shards, the tokenizer and manifest.json.')
  flags.DEFINE_integer('workers', None, 'Tokenizing processes (default: one per core).')
  flags.DEFINE_integer('shard_docs', 4096, 'Documents per shard (what a killed run redoes at most, per worker).',
                       lower_bound=1)

_worker = {}  # In each worker process: the opened splits and the tokenizer (see _start_worker).


def _start_worker(d, tokenizer_dir: str) -> None:
  where = builders.data_dir(d.name, d.tfds_data_dir, pathlib.Path(tokenizer_dir).parent / 'data')
  builder = builders.prepare_builder(d.name, where, d.paths, d.val_fraction, (d.input_key, d.target_key), d.text_key)
  tokenizer = tokenizers.load(d.tokenizer, pathlib.Path(tokenizer_dir))
  _worker.update(builder=builder, sources={}, tokenize=pipeline.Tokenize(tokenizer, (d.text_key,)),
                 text_key=d.text_key, dtype=tokenized.token_dtype(tokenizer.vocab_size))


def _tokenize_shard(job: tuple[str, str, int, int, int]) -> tuple[str, int, int, int, int, float]:
  """Tokenizes documents start .. stop - 1 of a split into shard `index`: (split, index, documents,
  tokens, text bytes, seconds)."""
  began = time.perf_counter()
  split, split_dir, index, start, stop = job
  sources = _worker['sources']
  if split not in sources:
    sources[split] = _worker['builder'].as_data_source(split)
  docs, text_bytes = [], 0
  for i in range(start, stop):
    example = sources[split][i]
    text_bytes += len(example[_worker['text_key']])
    docs.append(_worker['tokenize'].map(example))
  tokens = tokenized.write_shard(pathlib.Path(split_dir), index, docs, _worker['dtype'])
  return split, index, len(docs), tokens, text_bytes, time.perf_counter() - began


def _write_json(path: pathlib.Path, value: dict) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=1) + '\n')
  os.replace(tmp, path)


def tokenize(d, vocab_size: int, out: str, *, workers: int | None = None, shard_docs: int = 4096,
             init_from: str = '', progress: bool = True) -> dict:
  """Tokenizes data section d's train and eval splits into `out` (see the module docstring); returns
  the manifest. Already finished: returns it as it is. Holds the folder's lock meanwhile."""
  folder = pathlib.Path(os.path.expanduser(out))
  with lock.acquire(folder):
    return _tokenize(d, vocab_size, out, folder, workers, shard_docs, init_from, progress)


def _tokenize(d, vocab_size: int, out: str, folder: pathlib.Path, workers: int | None, shard_docs: int,
              init_from: str, progress: bool) -> dict:
  earlier = next((json.loads((folder / n).read_text()) for n in (tokenized.MANIFEST, tokenized.PLAN)
                  if (folder / n).exists()), None)
  tokenizer = None
  if earlier:  # Continue (or confirm) that output, with its tokenizer: never retrain over it.
    made_with = earlier.get('tokenizer', {})
    if (made_with.get('kind'), made_with.get('requested_vocab_size')) != (d.tokenizer, vocab_size - reserved_ids(d)):
      raise ConfigError(f'--out={out!r} holds shards of a {made_with.get("kind")!r} tokenizer for '
                        f'{made_with.get("requested_vocab_size")} ids; this config asks for {d.tokenizer!r} with '
                        f'{vocab_size - reserved_ids(d)}: use a new --out')
    tokenizer = tokenizers.load(d.tokenizer, folder / 'tokenizer')
  corpus = pipeline.load_corpus(d, vocab_size, folder / 'tokenizer', tokenizer=tokenizer, init_from=init_from,
                                files_dir=folder / 'data')
  splits = {d.train_split: corpus.train_source, d.eval_split: corpus.eval_source}
  plan = {'format': tokenized.FORMAT,
          'source': {'dataset': corpus.dataset, 'name': d.name, 'paths': d.paths, 'text_key': d.text_key,
                     'documents': {name: len(source) for name, source in splits.items()}},
          'tokenizer': {'kind': d.tokenizer, 'vocab_size': corpus.tokenizer.vocab_size,
                        'requested_vocab_size': vocab_size - reserved_ids(d),
                        'fingerprint': tokenized.tokenizer_fingerprint(folder / 'tokenizer', d.tokenizer)},
          'dtype': tokenized.token_dtype(corpus.tokenizer.vocab_size), 'shard_docs': shard_docs}
  if earlier:
    if {k: earlier.get(k) for k in plan} != plan:
      raise ConfigError(f'--out={out!r} holds shards of other data or --shard_docs '
                        f'({earlier.get("source", {}).get("dataset")}); use a new --out')
    if 'splits' in earlier:  # Finished.
      return earlier
  _write_json(folder / tokenized.PLAN, plan)

  jobs, done = [], {}
  for name, source in splits.items():
    for index in range(_shards(source, shard_docs)):
      finished = tokenized.finished_shard(folder / name, index)
      if finished:
        done[name, index] = finished
      else:
        jobs.append((name, str(folder / name), index, index * shard_docs, min(len(source), (index + 1) * shard_docs)))
  workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(jobs) or 1))
  total_docs = sum(len(s) for s in splits.values())
  bar = tqdm.tqdm(total=total_docs, initial=sum(n for n, _ in done.values()), unit='doc', desc='tokenize',
                  disable=not progress, dynamic_ncols=True)
  started, tokens, text_bytes, busy = time.perf_counter(), 0, 0, 0.0
  if jobs:
    context = multiprocessing.get_context('spawn')  # Nothing of this process (threads, JAX) is inherited.
    with context.Pool(workers, _start_worker, (d, str(folder / 'tokenizer'))) as pool:
      for name, index, docs, shard_tokens, shard_bytes, seconds in pool.imap_unordered(_tokenize_shard, jobs):
        done[name, index] = (docs, shard_tokens)
        tokens, text_bytes, busy = tokens + shard_tokens, text_bytes + shard_bytes, busy + seconds
        elapsed = time.perf_counter() - started
        bar.update(docs)
        bar.set_postfix(tokens=f'{tokens:,}', MB_s=f'{text_bytes / 1e6 / elapsed:.2f}')
  bar.close()
  shards = {name: [list(done[name, i]) for i in range(_shards(source, shard_docs))] for name, source in splits.items()}
  manifest = plan | {'splits': {name: {'documents': len(source), 'tokens': sum(t for _, t in shards[name]),
                                       'shards': shards[name]} for name, source in splits.items()},
                     'workers': workers, 'seconds': round(time.perf_counter() - started, 3),
                     'text_bytes_this_run': text_bytes, 'worker_seconds_this_run': round(busy, 3)}
  _write_json(folder / tokenized.MANIFEST, manifest)
  (folder / tokenized.PLAN).unlink()
  return manifest


def _shards(source, shard_docs: int) -> int:
  return math.ceil(len(source) / shard_docs)


def main(argv: list[str]) -> None:
  cli.start(argv, ('config', 'out'), 'python -m lm.tokenize --config=experiments/quickstart.py --out=data/plays')
  try:
    config = validate(FLAGS.config)
    if config.data.name == 'tokenized':
      raise ConfigError("data.name='tokenized' is what lm.tokenize writes: point --config at the text to tokenize")
    if config.data.mixture.strip():
      raise ConfigError('data.mixture names several sources: tokenize each on its own (--config.data.name=...), '
                        'then mix the folders as tokenized=DIR:WEIGHT')
    if config.data.objective == 'seq2seq':
      raise ConfigError("data.objective='seq2seq' reads (input, target) pairs, which runs tokenize as they go")
    manifest = tokenize(config.data, config.model.vocab_size, FLAGS.out, workers=FLAGS.workers,
                        shard_docs=FLAGS.shard_docs, init_from=config.checkpoint.init_from)
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')
  counts = ', '.join(f'{name}: {s["documents"]:,} documents, {s["tokens"]:,} tokens'
                     for name, s in manifest['splits'].items())
  made_with = manifest['tokenizer']
  print(f'{FLAGS.out}: {counts} ({made_with["kind"]} tokenizer, {made_with["vocab_size"]} ids)')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
