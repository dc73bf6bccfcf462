"""The baseline every ablation varies: a byte-level GPT-2-style model on the Shakespeare plays.

  python -m lm.main --config=experiments/ablations/base.py[:cpu|gpu] --workdir=runs/base

  cpu  4 layers, width 64, 4 heads (0.21M parameters), 500 steps of 16 x 128 bytes (1M bytes, a
       fifth of the plays): about a minute on 2 CPU cores
  gpu  12 layers, width 768, 12 heads (85M parameters), 20k steps of 64 x 1024 bytes on lm1b
       (prepare it first: tfds build lm1b --file_format=array_record)
  smoke  cpu shrunk to 4 steps of a 1-layer model (SMOKE below): proves that a sweep or a notebook
       runs top to bottom (the tests run every notebook so), not the science

Bytes, not a trained tokenizer, so that every ablation is scored in bits per byte of the same text
and no point spends time training sentencepiece. The ablation files next to this one load it and
each sweep one knob (see lm.sweep), their get_config and get_sweep built by ablation_config and
ablation_sweep below.
"""

import ml_collections

from lm import sweep
from lm.config import base_config, override

SCALES = ('cpu', 'gpu', 'smoke')

# What differs between the cpu and gpu scales, key: (cpu, gpu).
BY_SCALE = {
    'model.num_layers': (4, 12),
    'model.d_model': (64, 768),
    'model.num_heads': (4, 12),
    'model.max_len': (128, 1024),
    'model.dtype': ('float32', 'bfloat16'),
    'data.name': ('shakespeare', 'lm1b'),
    'data.eval_split': ('validation', 'test'),
    'data.seq_len': (128, 1024),
    'data.batch_size': (16, 64),
    'optimizer.learning_rate': (3e-3, 6e-4),
    'optimizer.warmup_steps': (50, 1000),
    'train.steps': (500, 20_000),
    'train.log_every': (50, 100),
    'eval.every': (100, 2000),  # On cpu, five points on each loss curve (the scaling notebook fits them).
    'eval.num_batches': (8, 16),
    'eval.batch_size': (32, 64),
    # The eval that ends training: the whole validation split on cpu; lm1b's test split is 30M bytes,
    # so on gpu the same 200 batches.
    'eval.final_num_batches': (0, 200),
    'checkpoint.every': (250, 2000),
}


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  if arg not in SCALES:
    raise ValueError(f'experiments/ablations/base.py:{arg}: expected one of {", ".join(SCALES)}')
  if arg == 'smoke':
    return override(get_config('cpu'), SMOKE)
  config = base_config()
  config.data.tokenizer = 'byte'
  config.model.vocab_size = 258
  config.model.mlp_dim = 0  # 4 x d_model for GELU; SwiGLU gets 2/3 of that, for the same parameters.
  config.optimizer.weight_decay = 0.1
  config.eval.sample_prompt = '**HAMLET**\n'
  config.eval.num_samples = 1
  return override(config, {key: values[SCALES.index(arg)] for key, values in BY_SCALE.items()})


def scale_of(arg: str) -> str:
  """The scale a preset argument names ('rope,gpu' -> 'gpu'), default cpu."""
  return next((token for token in arg.split(',') if token in SCALES), SCALES[0])


def ablation_config(arg: str, points) -> ml_collections.ConfigDict:
  """An ablation's get_config(arg): this baseline at the scale arg names (default cpu), with the one
  point of the sweep arg names, if any ('rope', 'rope,gpu': see lm.sweep.preset); the point's keys
  override the scale's. points: the sweep's points, or a function giving them at a scale (where they
  differ by scale)."""
  scale, point = sweep.preset(arg, points(scale_of(arg)) if callable(points) else points, SCALES)
  return override(get_config(scale), point)


def ablation_sweep(arg: str, points) -> list[dict]:
  """An ablation's get_sweep(arg): its points, at the scale arg names where they differ by scale."""
  return points(scale_of(arg)) if callable(points) else points


# The smoke scale: 4 steps of a 1-layer model, evaluated at steps 2 and 4 on one batch; a sweep's
# points override these keys where they vary them.
SMOKE = {
    'model.num_layers': 1, 'model.d_model': 32, 'data.seq_len': 32, 'data.batch_size': 4,
    'train.steps': 4, 'optimizer.warmup_steps': 1, 'train.log_every': 2, 'checkpoint.every': 4,
    'eval.every': 2, 'eval.num_batches': 1, 'eval.final_num_batches': 1, 'eval.batch_size': 8,
    'eval.num_samples': 0,
}
