"""Loss, perplexity and bits per byte of a checkpoint on a text split:

  python -m lm.evaluate --workdir=runs/qs                      # the run's eval split, whole
  python -m lm.evaluate --workdir=runs/gpt2 --dataset=shakespeare --split=validation
  python -m lm.evaluate --workdir=runs/llama --seq_len=8192 --by_position   # loss by context length too

By default the data is the run's own (data.* of its config.json); --dataset, --paths and --split
point it elsewhere (any dataset lm.main could train on), read with the run's tokenizer.
--by_position adds the loss by how many tokens of context each prediction had, in buckets 1, 2-3,
4-7, ... (does the model use its context?); lm.analysis.results.plot_by_position draws it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any

from absl import flags
import jax
import numpy as np

from lm import cli, kinds
from lm.config import ConfigError, override
from lm.data import pipeline
from lm.inference import decode
from lm.inference.run import SavedRun
from lm.parallel import sharding
from lm.training import metrics, saved, train

FLAGS = flags.FLAGS


def evaluate(run, *, dataset: str | None = None, paths: str | None = None, split: str | None = None,
             tfds_data_dir: str | None = None, batch_size: int | None = None, num_batches: int = 0,
             seq_len: int | None = None, by_position: bool = False, weights_dtype: str = 'float32') -> dict[str, Any]:
  """{'loss', 'perplexity', 'bits_per_byte', 'tokens'} of run (a workdir or an lm.training.SavedRun)
  on `split` (default: the run's eval split) of `dataset` (default: the run's), num_batches of
  batch_size sequences of seq_len tokens (defaults: all of the split, the run's eval sizes).
  by_position adds 'by_position': the same figures for the predictions made from 1, 2-3, 4-7, ...
  tokens of context (of their document, under data.document_mask), each with its 'context' range.
  weights_dtype: score with the projections' weights as stored, or in 'bfloat16' or 'int8' (what
  generating with them costs in quality; lm.inference.decode.cast_weights)."""
  run = run if isinstance(run, SavedRun) else saved.load(run)
  run = dataclasses.replace(run, params=decode.cast_weights(run.params, weights_dtype))
  kinds.require_decoder(run.config.model, repr(str(run.workdir)), 'lm.evaluate')
  changes = {'data.name': dataset, 'data.paths': paths, 'data.eval_split': split,
             'data.tfds_data_dir': tfds_data_dir, 'eval.batch_size': batch_size, 'data.seq_len': seq_len}
  config = override(run.config, {k: v for k, v in changes.items() if v is not None})
  if config.data.seq_len > config.model.max_len:
    raise ConfigError(f'seq_len={config.data.seq_len} is longer than the model\'s context, '
                      f'model.max_len={config.model.max_len}')
  rules = sharding.logical_axis_rules(config.mesh)
  batch_sharding = sharding.batch_sharding(run.mesh, rules)
  sharding.check_batch('eval.batch_size', config.eval.batch_size, run.mesh, rules)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, run.workdir / 'tokenizer',
                                tokenizer=run.tokenizer, files_dir=run.workdir / 'data')
  step = train.jit_eval_step(run.model, _shardings(run.params), batch_sharding)
  token_bytes_V = train.padded_token_bytes(run.tokenizer, config.model.vocab_size)
  with sharding.activate(run.mesh, rules):
    result = train.evaluate_params(config.data, corpus, run.params, step, batch_sharding, token_bytes_V,
                                   seed=config.seed, batch_size=config.eval.batch_size, num_batches=num_batches)
    if by_position:
      if isinstance(corpus, pipeline.Mixture):
        raise ConfigError('--by_position scores one dataset: give --dataset for a run trained on a mixture')
      replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
      step = jax.jit(functools.partial(train.position_sums, model=run.model),
                     in_shardings=(_shardings(run.params), batch_sharding, replicated), out_shardings=replicated)
      start, stop = sharding.process_rows(batch_sharding, config.eval.batch_size)
      sums = [step(run.params, sharding.global_batch({k: v[start:stop] for k, v in batch.items()}, batch_sharding,
                                                     config.eval.batch_size), token_bytes_V)
              for batch in pipeline.eval_batches(config.data, corpus, config.seed, config.eval.batch_size, num_batches)]
      totals = {k: np.sum([np.float64(s[k]) for s in sharding.to_host(sums)], axis=0) for k in sums[0]}
      result['by_position'] = position_buckets(totals)
  return result


def position_buckets(totals: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """position_sums' [L] sums (over batches) in buckets of 1, 2-3, 4-7, ... tokens of context, each
  {'context': [first, last], 'loss', 'perplexity', 'bits_per_byte', 'tokens'}; empty buckets left out."""
  buckets, first = [], 1
  length = len(totals['tokens'])
  while first <= length:
    last = min(2 * first - 1, length)
    part = {k: float(v[first - 1:last].sum()) for k, v in totals.items()}
    if part['tokens']:
      buckets.append({'context': [first, last]} | metrics.eval_summary(part['loss_sum'], part['tokens'],
                                                                       part['bytes']))
    first *= 2
  return buckets


def _shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('workdir', None, 'A run\'s workdir (python -m lm.main, or python -m lm.hf import).')
  flags.DEFINE_integer('step', None, 'The checkpoint to evaluate (default: the latest).')
  flags.DEFINE_string('dataset', None, 'data.name to read (default: the run\'s).')
  flags.DEFINE_string('paths', None, 'data.paths, for --dataset=text_files or text_pairs.')
  flags.DEFINE_string('split', None, 'The split (default: the run\'s data.eval_split).')
  flags.DEFINE_string('tfds_data_dir', None, 'Where TFDS datasets are prepared.')
  flags.DEFINE_integer('seq_len', None, 'Tokens per sequence (default: the run\'s data.seq_len).')
  flags.DEFINE_integer('batch_size', None, 'Sequences per batch (default: the run\'s eval.batch_size).')
  flags.DEFINE_integer('num_batches', 0, 'Batches to evaluate (0: the whole split).')
  flags.DEFINE_bool('by_position', False, 'Also the loss by context length (buckets 1, 2-3, 4-7, ...).')
  flags.DEFINE_enum('weights_dtype', 'float32', ['float32', 'bfloat16', 'int8'],
                    'Score with the projections\' weights as stored, in bfloat16, or in int8 (per-column scales).')


def main(argv: list[str]) -> None:
  cli.start(argv, ('workdir',), 'python -m lm.evaluate --workdir=runs/qs')
  try:
    run = saved.load(FLAGS.workdir, FLAGS.step)
    result = evaluate(run, dataset=FLAGS.dataset, paths=FLAGS.paths, split=FLAGS.split,
                      tfds_data_dir=FLAGS.tfds_data_dir, batch_size=FLAGS.batch_size, num_batches=FLAGS.num_batches,
                      seq_len=FLAGS.seq_len, by_position=FLAGS.by_position, weights_dtype=FLAGS.weights_dtype)
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps({'workdir': FLAGS.workdir, 'step': run.step} | result))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
