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
  # GPT-2's layout (learned positions, pre-LayerNorm, GELU MLP 4x wide, biases, tied embeddings: the
  # defaults) at 6 layers of 384.
  config.model.update(vocab_size=4096, max_len=256, num_layers=6, num_heads=6, d_model=384,
                      mlp_dim=0,  # 4 * d_model.
                      dtype='float32')
  config.data.update(name='shakespeare', tokenizer='sentencepiece', seq_len=256, batch_size=16)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.1)
  config.train.update(steps=2000, log_every=10)
  config.eval.update(every=500, num_batches=4)
  config.checkpoint.every = 500
  return config
