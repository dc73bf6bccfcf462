"""Downstream tasks against validation loss: the baseline at three widths, each scoring
lm-evaluation-harness tasks at every evaluation (eval.harness_*), so that every (run, step) gives a
validation loss and task scores side by side. Does lower loss give higher task scores here?

  python -m lm.sweep --config=experiments/ablations/downstream.py --workdir=runs/ablations/downstream
  notebooks/downstream.ipynb draws the comparison. Needs the `eval` extra. Add ':gpu' (or ',gpu') for
  the larger preset: lm1b and the harness's standard tasks (their datasets in the Hugging Face cache,
  HF_DATASETS_OFFLINE=1).
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module, override

base = load_module(pathlib.Path(__file__).with_name('base.py'))

WIDTHS = {'cpu': [32, 64, 128], 'gpu': [384, 768, 1536], 'smoke': [32, 64]}
# cpu: lm's offline tasks from the validation plays (lm/harness_tasks), 200 documents each, at each eval.
HARNESS = {
    'cpu': {'eval.harness_tasks': 'shakespeare', 'eval.harness_every': 100, 'eval.harness_limit': 200},
    'gpu': {'eval.harness_tasks': 'lambada_openai,hellaswag,arc_easy,piqa', 'eval.harness_every': 2000,
            'eval.harness_limit': 1000},
    'smoke': {'eval.harness_tasks': 'shakespeare', 'eval.harness_every': 4, 'eval.harness_limit': 4},
}


def points(scale: str) -> list[dict]:
  return sweep.axis('model.d_model', WIDTHS[scale])


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu') with its harness tasks, or one point: 'd_model=128'."""
  return override(base.ablation_config(arg, points), HARNESS[base.scale_of(arg)])


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
