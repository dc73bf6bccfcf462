"""The baseline every ablation varies: a byte-level GPT-2-style model on the Shakespeare plays.

  python -m lm.main --config=experiments/ablations/base.py[:cpu|gpu] --workdir=runs/base

  cpu  4 layers, width 64, 4 heads (0.21M parameters), 500 steps of 16 x 128 bytes (1M bytes, a
       fifth of the plays): about a minute on 2 CPU cores
  gpu  12 layers, width 768, 12 heads (85M parameters), 20k steps of 64 x 1024 bytes on lm1b
       (prepare it first: tfds build lm1b --file_format=array_record)

Bytes, not a trained tokenizer, so that every ablation is scored in bits per byte of the same text
and no point spends time training sentencepiece. The ablation files next to this one load it and
each sweep one knob (see lm/sweep.py).
"""

import ml_collections

from lm.config import base_config, load_module

SCALES = ('cpu', 'gpu')


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  if arg not in SCALES:
    raise ValueError(f'experiments/ablations/base.py:{arg}: expected one of {", ".join(SCALES)}')
  config = base_config()
  config.data.tokenizer = 'byte'
  config.model.vocab_size = 258
  config.model.mlp_dim = 0  # 4 x d_model for GELU; SwiGLU gets 2/3 of that, for the same parameters.
  config.optimizer.weight_decay = 0.1
  if arg == 'cpu':
    config.model.num_layers = 4
    config.model.d_model = 64
    config.model.num_heads = 4
    config.model.max_len = 128
    config.data.name = 'shakespeare'
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.train.steps = 500
    config.train.log_every = 50
    config.eval.every = 100  # Five points on each loss curve (the scaling notebook fits them).
    config.eval.num_batches = 8
    config.eval.batch_size = 32
    config.checkpoint.every = 250
  else:
    config.model.num_layers = 12
    config.model.d_model = 768
    config.model.num_heads = 12
    config.model.max_len = 1024
    config.model.dtype = 'bfloat16'
    config.data.name = 'lm1b'
    config.data.eval_split = 'test'
    config.data.seq_len = 1024
    config.data.batch_size = 64
    config.optimizer.learning_rate = 6e-4
    config.optimizer.warmup_steps = 1000
    config.train.steps = 20_000
    config.train.log_every = 100
    config.eval.every = 2000
    config.eval.num_batches = 16
    config.eval.batch_size = 64
    config.eval.final_num_batches = 200  # lm1b's test split is 30M bytes: score the same 200 batches.
    config.checkpoint.every = 2000
  config.eval.sample_prompt = '**HAMLET**\n'
  config.eval.num_samples = 1
  return config



# What the notebooks' SMOKE setting adds to every point, less the keys the sweep varies: 4 steps of a
# 1-layer model, evaluated at steps 2 and 4 on one batch. It proves that a notebook runs top to
# bottom (the tests run it so), not the science.
SMOKE = {
    'model.num_layers': 1, 'model.d_model': 32, 'data.seq_len': 32, 'data.batch_size': 4,
    'train.steps': 4, 'optimizer.warmup_steps': 1, 'train.log_every': 2, 'checkpoint.every': 4,
    'eval.every': 2, 'eval.num_batches': 1, 'eval.final_num_batches': 1, 'eval.batch_size': 8,
    'eval.num_samples': 0,
}


def smoke_overrides(experiment: str) -> dict:
  """SMOKE without the keys that experiment's sweep varies."""
  swept = {key for point in load_module(experiment).get_sweep() for key in point}
  return {key: value for key, value in SMOKE.items() if key not in swept}
