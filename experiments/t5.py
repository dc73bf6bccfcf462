"""An encoder-decoder Transformer, T5-style: --config=experiments/t5.py:span, then :seq2seq.

  span     span-corruption pretraining on the Shakespeare plays (15% of tokens masked in spans of
           mean length 3; each span a sentinel in the input, its tokens in the target)
  seq2seq  fine-tuning on (input, target) pairs: name them with --config.data.paths=FILE (.tsv or
           .jsonl; see data.name='text_pairs'), or point data.name at a TFDS dataset with two text
           features (data.input_key, data.target_key); start from the pretrained run with
           --config.checkpoint.init_from=WORKDIR (same model, same tokenizer)

Both share the model below (4 + 4 blocks, width 128, 2.4M parameters with the embedding), so a
span run's checkpoint starts a seq2seq run.
"""

import ml_collections

from lm.config import base_config


def get_config(arg: str = 'span') -> ml_collections.ConfigDict:
  if arg not in ('span', 'seq2seq'):
    raise ValueError(f"experiments/t5.py:{arg}: expected 'span' or 'seq2seq'")
  config = base_config()
  m = config.model
  m.kind = 'encoder_decoder'
  m.num_layers = m.num_encoder_layers = 4
  m.d_model, m.num_heads, m.mlp_dim = 128, 4, 0  # MLP 4 x 128.
  m.vocab_size = 4096  # The sentencepiece model takes 4096 minus the sentinels.
  m.max_len = 256
  m.positions = 'rope'  # No learned table: the decoder's shorter sequences need no positions of their own.
  m.norm = 'rmsnorm'
  m.use_bias = False
  m.residual_dropout = 0.1  # T5 used 0.1 throughout.

  config.data.seq_len = 256
  config.data.batch_size = 16
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.train.log_every = 50
  config.eval.num_batches = 4
  config.eval.sample_tokens = 64

  if arg == 'span':
    config.data.name = 'shakespeare'
    config.data.objective = 'span_corruption'
    config.train.steps = 1500  # 1.3 s per step on 2 CPU cores (about 33 minutes).
    config.eval.every = 500
    config.checkpoint.every = 500
    config.eval.sample_prompt = 'To be, or not to be, that is the question:'
    return config

  config.data.name = 'text_pairs'
  config.data.objective = 'seq2seq'
  config.data.target_len = 128
  config.optimizer.learning_rate = 1e-3
  config.train.steps = 1000
  config.eval.every = 250
  config.checkpoint.every = 250
  return config
