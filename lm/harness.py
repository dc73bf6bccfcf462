"""Downstream tasks through EleutherAI's lm-evaluation-harness (the `eval` extra), with lm as its model:

  python -m lm.harness --workdir=runs/qs --tasks=shakespeare
  python -m lm.harness --workdir=runs/llama --tasks=hellaswag,arc_easy --num_fewshot=0 --output=scores.json

--tasks takes the harness's task, group and tag names, lm's offline tasks in lm/harness_tasks/ (the
`shakespeare` tag: four tasks built from the validation plays) and tasks under --include_path.
Standard tasks read their datasets through Hugging Face `datasets`: with them cached, set
HF_DATASETS_OFFLINE=1 and nothing is downloaded.

From Python, importing this module registers the model as 'lm' with the harness:
`lm_eval.simple_evaluate(model='lm', model_args='workdir=runs/qs', tasks=[...])`. The harness's own
command line (`lm_eval --model lm`) cannot find it: it looks models up only in its built-in table and
loads no plugins, so it never imports lm; this command takes its flags instead.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from lm import cli
from lm.config import ConfigError
from lm.inference.harness import (
  RunModel,
  check_tasks,
  evaluate,
  flat_metrics,
  harness_utils,
  require_harness,
  task_manager,
)
from lm.training import saved

try:  # Optional: the `eval` extra.
  from lm_eval.api.registry import register_model
except ImportError:
  register_model = lambda name: (lambda cls: cls)

__all__ = ['HarnessModel', 'check_tasks', 'evaluate', 'flat_metrics', 'require_harness', 'task_manager']
FLAGS = flags.FLAGS


@register_model('lm')
class HarnessModel(RunModel):
  """The harness's 'lm' model: a run's workdir (python -m lm.main or lm.hf import) and its checkpoint
  (step, default: the latest), or run: one already in memory. See lm.inference.harness.RunModel."""

  def __init__(self, workdir: str | None = None, step: int | str | None = None, run=None, **kwargs):
    if run is None:
      if workdir is None:
        raise ConfigError("the harness's lm model needs workdir=W (a run's workdir)")
      run = saved.load(workdir, None if step in (None, '') else int(step))
    super().__init__(run, **kwargs)


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('workdir', None, "A run's workdir (python -m lm.main, or python -m lm.hf import).")
  flags.DEFINE_list('tasks', None, 'Harness task, group or tag names, comma-separated (e.g. shakespeare).')
  flags.DEFINE_integer('num_fewshot', None, "Examples in each prompt (default: each task's own).")
  flags.DEFINE_float('limit', None, 'At most this many documents per task (below 1: this fraction).')
  flags.DEFINE_string('include_path', None, 'A folder of more task YAML files.')
  flags.DEFINE_integer('batch_size', 8, 'Rows per forward pass.')
  flags.DEFINE_string('output', None, "Write the harness's results JSON here.")
  flags.DEFINE_integer('step', None, 'The checkpoint to evaluate (default: the latest).')
  flags.DEFINE_integer('bootstrap_iters', 1000, 'Bootstrap resamples for the standard errors of perplexities.')
  flags.DEFINE_bool('list_tasks', False, 'List the task names and exit.')


def main(argv: list[str]) -> None:
  try:
    if FLAGS.list_tasks:
      print('\n'.join(sorted(task_manager(FLAGS.include_path).all_tasks)))
      return
    cli.start(argv, ('workdir', 'tasks'), 'python -m lm.harness --workdir=runs/qs --tasks=shakespeare')
    if FLAGS.limit is not None and not FLAGS.limit > 0:
      raise ConfigError(f'--limit={FLAGS.limit:g}: must be > 0 (documents per task; below 1, a fraction of them)')
    manager = task_manager(FLAGS.include_path, FLAGS.tasks)
    check_tasks(FLAGS.tasks, manager)
    model = HarnessModel(FLAGS.workdir, FLAGS.step, batch_size=FLAGS.batch_size)
    limit = None if FLAGS.limit is None else (int(FLAGS.limit) if FLAGS.limit >= 1 else FLAGS.limit)
    results = evaluate(model, FLAGS.tasks, num_fewshot=FLAGS.num_fewshot, limit=limit, manager=manager,
                       bootstrap_iters=FLAGS.bootstrap_iters, check=False)
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')
  print(harness_utils.make_table(results))
  if 'groups' in results:
    print(harness_utils.make_table(results, 'groups'))
  if FLAGS.output:
    path = pathlib.Path(FLAGS.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + '\n')
    print(f'results in {path}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
