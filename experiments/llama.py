"""Llama-style decoders as presets: --config=experiments/llama.py:SIZE[,LAYOUT].

The Llama recipe on our knobs: RMSNorm before each sublayer, SwiGLU MLPs, rotary positions,
grouped-query attention, no biases, an untied output layer, no dropout.

  SIZE    tiny  4 layers, d_model 128, 4 heads / 2 kv heads, 4,096-token sentencepiece on the
                Shakespeare plays, 128-token sequences: trains on a laptop CPU (2.0M parameters; 0.6 s
                per step on 2 cores)
          125m  12 x 768, 12 / 4 heads, 32,000 tokens (124.7M parameters)
          1b    16 x 2048, 32 / 8 heads, MLP 8192, 32,000 tokens (1.10B parameters)
          7b    Llama 2 7B's shapes: 32 x 4096, 32 heads (multi-head: Llama 2 keeps GQA for 70B),
                MLP 11,008 by the 2/3 rule, 32,000 tokens; 6,738,415,616 parameters as published
          8b    Llama 3 8B's shapes: 32 x 4096, 32 / 8 heads, MLP 14,336, 128,256 tokens, RoPE base
                500,000; 8,030,261,248 parameters as published
          3.2-1b  Llama 3.2 1B: 16 x 2048, 32 / 8 heads, MLP 8192, 128,256 tokens, tied embeddings,
                RoPE base 500,000 with llama3 scaling (factor 32 over 8,192 positions); 1,235,814,400
                parameters as published
          3.2-3b  Llama 3.2 3B: 28 x 3072, 24 / 8 heads, MLP 8192, otherwise as 3.2-1b;
                3,212,749,824 parameters as published
  LAYOUT  dp (default), fsdp, hybrid, fsdp_tensor: as in experiments/gpt2.py

The larger sizes read any prepared TFDS text dataset (lm1b by default) and train a sentencepiece
tokenizer on it; they are for pods (see python -m lm.plan), not for this CPU.
"""

import ml_collections

from lm.config import MESH_LAYOUTS, base_config, preset_arg

# layers, d_model, heads, kv heads, mlp_dim (0: the 2/3 rule, rounded up to 256), vocab, rope base, seq_len.
SIZES = {
    'tiny': (4, 128, 4, 2, 0, 4096, 10_000.0, 128),
    '125m': (12, 768, 12, 4, 0, 32_000, 10_000.0, 2048),
    '1b': (16, 2048, 32, 8, 8192, 32_000, 10_000.0, 2048),
    '7b': (32, 4096, 32, 32, 0, 32_000, 10_000.0, 4096),
    '8b': (32, 4096, 32, 8, 14_336, 128_256, 500_000.0, 8192),
    '3.2-1b': (16, 2048, 32, 8, 8192, 128_256, 500_000.0, 8192),
    '3.2-3b': (28, 3072, 24, 8, 8192, 128_256, 500_000.0, 8192),
}
PUBLISHED_PARAMS = {'7b': 6_738_415_616, '8b': 8_030_261_248, '3.2-1b': 1_235_814_400, '3.2-3b': 3_212_749_824}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  size, layout = preset_arg('experiments/llama.py', arg, SIZES)
  layers, width, heads, kv_heads, mlp_dim, vocab, rope_base, seq_len = SIZES[size]
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = layers, width, heads, kv_heads
  m.mlp, m.mlp_dim, m.mlp_multiple_of = 'swiglu', mlp_dim, 256
  m.vocab_size, m.max_len = vocab, seq_len
  m.positions, m.rope_base = 'rope', rope_base
  m.norm, m.norm_position = 'rmsnorm', 'pre'
  m.use_bias, m.tie_embeddings = False, False
  m.init = 'normal'
  if size.startswith('3.2-'):  # Tied embeddings, and RoPE stretched from 8K to 128K positions.
    m.tie_embeddings = True
    m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_len = 'llama3', 32.0, 8192
    m.rope_low_freq_factor, m.rope_high_freq_factor = 1.0, 4.0

  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.min_lr_ratio = 0.1
  config.data.seq_len = seq_len
  config.mesh.shape = MESH_LAYOUTS[layout]

  if size == 'tiny':  # Laptop scale, on the shipped plays.
    config.data.name = 'shakespeare'
    config.data.batch_size = 16
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200
    config.train.steps = 2000  # About 20 minutes on 2 CPU cores.
    config.eval.every = 500
    config.checkpoint.every = 500
    return config

  m.dtype = 'bfloat16'  # float32 master weights and optimizer state.
  m.scan_layers = True
  m.remat = 'full' if size in ('7b', '8b', '3.2-3b') else 'none'
  config.data.name = 'lm1b'
  config.data.eval_split = 'test'
  config.data.batch_size = 2**22 // seq_len if size in ('7b', '8b') else 2**19 // seq_len  # 4M / 0.5M tokens.
  config.optimizer.learning_rate = 3e-4 if size in ('7b', '8b') else 1e-3 if size == '125m' else 6e-4
  config.optimizer.warmup_steps = 2000
  config.train.steps = 250_000
  config.train.log_every = 50
  config.eval.every = 2000
  config.eval.num_batches = 4
  config.eval.batch_size = config.data.batch_size
  config.checkpoint.every = 1000
  return config
