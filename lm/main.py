"""Train an experiment: python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs.

Override any config value with --config.group.key=value. Re-running the same command resumes
from the workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from lm import cli
from lm.config import ConfigError, validate
from lm.training import lock

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.config_flag()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, tokenizer and samples.')
  flags.DEFINE_string(
      'coordinator_address', None, 'Multi-host: host:port of process 0, reachable from every process; with '
      '--num_processes and --process_id. Omit all three on Slurm or Cloud TPU, where JAX finds them.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes take part.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0 .. num_processes - 1.')
  flags.DEFINE_enum(
      'distributed', 'auto', ['auto', 'on', 'off'], 'Call jax.distributed.initialize: auto = when the '
      'flags above are given or a Slurm job step / multi-host Cloud TPU slice is detected.')
  flags.DEFINE_integer(
      'stop_after', None, 'Stop (with a checkpoint) once this step is reached, as a job with a time '
      'limit would; the next run resumes from there.')


def _cluster_detected() -> bool:
  """A multi-process Slurm job step, or a Cloud TPU slice of several hosts."""
  slurm = int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_STEP_NUM_TASKS', '1')) or 1) > 1
  tpu_hosts = len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
  return slurm or tpu_hosts


def distributed_args() -> tuple | None:
  """The arguments of jax.distributed.initialize from the flags, or None when this is one process."""
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if FLAGS.distributed == 'off' or (FLAGS.distributed == 'auto' and not any(v is not None for v in explicit)
                                     and not _cluster_detected()):
    return None
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    sys.exit('error: --coordinator_address, --num_processes and --process_id go together')
  return tuple(explicit)


def main(argv: list[str]) -> None:
  cli.start(argv, ('config', 'workdir'), 'python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs')
  distributed = distributed_args()
  try:
    config = validate(FLAGS.config)
    if distributed is None:  # Refused at once; the training half takes the lock (process 0 of a job).
      lock.check_free(FLAGS.workdir)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  # JAX, Flax and orbax are imported only now, so the mistakes above are reported at once.
  from lm.training import loop  # noqa: PLC0415
  cli.cpu_without_accelerators()  # JAX is imported now, and not started yet.
  loop.train_command(config, FLAGS.workdir, FLAGS.stop_after, distributed)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
