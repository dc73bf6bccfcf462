"""Extending a trained RoPE run to a longer context: checkpoint.init_from with a larger model.max_len
and data.seq_len, the RoPE stretched (here by YaRN) from the context it was trained at."""

import jax
import pytest

from conftest import tiny_config
from lm.config import ConfigError
from lm.training.loop import Trainer
from lm.training.workdirs import read_metrics

ROPE = {'model.positions': 'rope', 'eval.num_samples': 0, 'train.log_every': 1}


@pytest.mark.slow
def test_a_run_extends_to_four_times_its_context_from_its_checkpoint(tfds_dir, play_files, tmp_path):
  short = tiny_config(tfds_dir, play_files, **ROPE, **{'train.steps': 24, 'eval.every': 24, 'checkpoint.every': 24})
  Trainer(short, tmp_path / 'short', devices=jax.devices()[:1]).run()
  longer = {'model.max_len': 128, 'data.seq_len': 128, 'train.steps': 2, 'eval.every': 2, 'checkpoint.every': 2,
            'optimizer.warmup_steps': 1}
  extended = tiny_config(tfds_dir, play_files, **ROPE, **longer, **{
      'checkpoint.init_from': str(tmp_path / 'short'), 'model.rope_scaling': 'yarn', 'model.rope_scaling_factor': 4.0,
      'model.rope_original_max_len': 32})
  Trainer(extended, tmp_path / 'long', devices=jax.devices()[:1]).run()
  fresh = tiny_config(tfds_dir, play_files, **ROPE, **longer)
  Trainer(fresh, tmp_path / 'fresh', devices=jax.devices()[:1]).run()
  first = lambda run: next(r['train/loss'] for r in read_metrics(tmp_path / run) if 'train/loss' in r)
  assert first('long') < first('fresh') - 0.5  # It starts from the short run's weights, at 128 tokens.
  # A learned position table has max_len rows: it cannot grow so.
  with pytest.raises(ConfigError, match="model.max_len is 32 there, 128 here"):
    Trainer(tiny_config(tfds_dir, play_files, **longer, **{'checkpoint.init_from': str(tmp_path / 'short'),
                                                            'eval.num_samples': 0}), tmp_path / 'learned',
            devices=jax.devices()[:1])
