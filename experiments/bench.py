"""The throughput benchmark's model: GPT-2's shape at 6 layers, width 384, 6 heads, vocabulary 4,096,
sequences of 256 and batches of 16, AdamW, float32 (12.3M parameters, 10.7M outside the embedding).

  python -m lm.bench --config=experiments/bench.py [--compare=torch] [--json]

Small enough to time on a 2-core CPU in seconds per step, large enough that matmuls dominate, as
they do at scale. Trains like the quickstart, on the Shakespeare plays with a 4,096-token
sentencepiece vocabulary, so `python -m lm.main` runs it too.
"""

import ml_collections

from lm.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()

  # GPT-2's layout (learned positions, pre-LayerNorm, GELU MLP 4x wide, biases, tied embeddings).
  config.model.vocab_size = 4096
  config.model.max_len = 256
  config.model.num_layers = 6
  config.model.num_heads = 6
  config.model.d_model = 384
  config.model.mlp_dim = 0  # 4 * d_model.
  config.model.dtype = 'float32'

  config.data.name = 'shakespeare'
  config.data.tokenizer = 'sentencepiece'
  config.data.seq_len = 256
  config.data.batch_size = 16

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.1

  config.train.steps = 2000
  config.train.log_every = 10
  config.eval.every = 500
  config.eval.num_batches = 4
  config.checkpoint.every = 500
  return config
