"""Loss, perplexity and bits per byte of a checkpoint on a text split:

  python -m lm.evaluate --workdir=runs/qs                      # the run's eval split, whole
  python -m lm.evaluate --workdir=runs/gpt2 --dataset=shakespeare --split=validation

By default the data is the run's own (data.* of its config.json); --dataset, --paths and --split
point it elsewhere (any dataset lm.main could train on), read with the run's tokenizer.
"""

from __future__ import annotations

import json
import sys

from absl import flags
import jax

from lm import cli, kinds, saved, sharding, train
from lm.config import ConfigError, override
from lm.data import pipeline

FLAGS = flags.FLAGS


def evaluate(run, *, dataset: str | None = None, paths: str | None = None, split: str | None = None,
             tfds_data_dir: str | None = None, batch_size: int | None = None, num_batches: int = 0,
             seq_len: int | None = None) -> dict[str, float]:
  """{'loss', 'perplexity', 'bits_per_byte', 'tokens'} of run (a workdir or an lm.saved.SavedRun)
  on `split` (default: the run's eval split) of `dataset` (default: the run's), num_batches of
  batch_size sequences of seq_len tokens (defaults: all of the split, the run's eval sizes)."""
  run = run if isinstance(run, saved.SavedRun) else saved.load(run)
  if kinds.of(run.config.model).prompt_is_input:
    raise ConfigError('lm.evaluate scores decoders; an encoder-decoder\'s eval runs with its training')
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
                                tokenizer=run.tokenizer)
  step = train.jit_eval_step(run.model, _shardings(run.params), batch_sharding)
  with sharding.activate(run.mesh, rules):
    return train.evaluate_params(config.data, corpus, run.params, step, batch_sharding,
                                 train.padded_token_bytes(run.tokenizer, config.model.vocab_size), seed=config.seed,
                                 batch_size=config.eval.batch_size, num_batches=num_batches)


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


def main(argv: list[str]) -> None:
  cli.start(argv, ('workdir',), 'python -m lm.evaluate --workdir=runs/qs')
  try:
    run = saved.load(FLAGS.workdir, FLAGS.step)
    result = evaluate(run, dataset=FLAGS.dataset, paths=FLAGS.paths, split=FLAGS.split,
                      tfds_data_dir=FLAGS.tfds_data_dir, batch_size=FLAGS.batch_size, num_batches=FLAGS.num_batches,
                      seq_len=FLAGS.seq_len)
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps({'workdir': FLAGS.workdir, 'step': run.step} | result))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
