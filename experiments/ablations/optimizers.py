"""Optimizers: AdamW, Lion, Adafactor, Muon and SGD with momentum on the baseline, each at peak
learning rates a factor of two (SGD: about three) apart, three around where it is known to work and
more where the first three left the optimum at an end, so that each is compared at its own best
rate (same warmup-cosine schedule, weight decay, clipping).

  python -m lm.sweep --config=experiments/ablations/optimizers.py --workdir=runs/ablations/optimizers
  python -m lm.main --config=experiments/ablations/optimizers.py:name=lion,learning_rate=0.003 \
      --workdir=runs/one_point
  notebooks/optimizers.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))

# Peak learning rates per optimizer at each scale. AdamW's cpu optimum is 1.2e-2
# (notebooks/learning_rate.ipynb); Lion wants a 3-10x smaller rate; Muon's update is rescaled to
# AdamW's RMS (optimizer.muon_consistent_rms), so it shares AdamW's range; SGD's steps are gradients.
RATES = {
    'cpu': {'adamw': [6e-3, 1.2e-2, 2.4e-2], 'lion': [3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3],
            'adafactor': [1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2], 'muon': [6e-3, 1.2e-2, 2.4e-2, 4.8e-2, 9.6e-2],
            'sgd': [0.03, 0.1, 0.3, 1.0, 3.0]},
    'gpu': {'adamw': [3e-4, 6e-4, 1.2e-3], 'lion': [1e-4, 2e-4, 4e-4], 'adafactor': [3e-4, 6e-4, 1.2e-3],
            'muon': [3e-4, 6e-4, 1.2e-3], 'sgd': [0.1, 0.3, 1.0]},
}


# Two more seeds of the two best optimizers at their best cpu rates, for the noise between them.
SEEDS = sweep.product(sweep.zip(sweep.axis('optimizer.name', ['adamw', 'muon']),
                                sweep.axis('optimizer.learning_rate', [1.2e-2, 2.4e-2])), sweep.axis('seed', [1, 2]))


def points(scale: str) -> list[dict]:
  """Each optimizer at each of its rates, and at cpu the seeds; smoke keeps the first cpu rate of each
  and no seeds (each point is a program of its own to compile)."""
  grid = RATES['gpu' if scale == 'gpu' else 'cpu']
  if scale == 'smoke':
    grid = {name: lrs[:1] for name, lrs in grid.items()}
  rates = sweep.chain(*(sweep.product(sweep.axis('optimizer.name', [name]), sweep.axis('optimizer.learning_rate', lrs))
                        for name, lrs in grid.items()))
  return rates + SEEDS if scale == 'cpu' else rates


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: 'name=lion,learning_rate=0.003'."""
  return base.ablation_config(arg, points)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
