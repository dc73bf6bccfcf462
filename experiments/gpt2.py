"""GPT-2 sizes (Radford et al. 2019) as presets: --config=experiments/gpt2.py:SIZE[,LAYOUT].

  SIZE    small, medium, large, xl: the published shapes and parameter counts (see PUBLISHED_PARAMS),
          with GPT-2's 50,257-token vocabulary, 1,024 learned positions, tied embeddings, biases
          everywhere (the key bias too) and GELU MLPs 4x wide
  LAYOUT  dp           data parallel: parameters replicated, batch split over all devices
          fsdp         parameters, gradients and optimizer state split along embed over all devices
          hybrid       fsdp within groups of 16 devices, data parallel across groups (for meshes
                       larger than d_model allows: xl's 1600 splits 16 or 64 ways, not 256)
          fsdp_tensor  fsdp over devices / 4, and heads, MLP and vocab split 4 ways (tensor parallel;
                       needs heads divisible by 4, so not xl with its 25). The vocabulary is padded
                       to 50,304 (a multiple of 128) so it splits: 47 x d_model parameters more
                       than published (36,096 for small).

For example, what GPT-2 XL needs per chip of a v5e 16x16 slice:
  python -m lm.plan --config=experiments/gpt2.py:xl,hybrid --topology=v5e:16x16
"""

import ml_collections

from lm.config import MESH_LAYOUTS, base_config, preset_arg

# (layers, d_model, heads) of each size; mlp_dim is 4 * d_model.
SIZES = {'small': (12, 768, 12), 'medium': (24, 1024, 16), 'large': (36, 1280, 20), 'xl': (48, 1600, 25)}
PUBLISHED_PARAMS = {'small': 124_439_808, 'medium': 354_823_168, 'large': 774_030_080, 'xl': 1_557_611_200}


def get_config(arg: str = 'small') -> ml_collections.ConfigDict:
  size, layout = preset_arg('experiments/gpt2.py', arg, SIZES)
  config = base_config()
  layers, width, heads = SIZES[size]
  config.model.num_layers = layers
  config.model.d_model = width
  config.model.num_heads = heads
  config.model.mlp_dim = 0  # 4 * d_model.
  config.model.max_len = 1024
  config.model.vocab_size = 50304 if layout == 'fsdp_tensor' else 50257
  config.model.dtype = 'bfloat16'  # float32 master weights and optimizer state.
  config.model.scan_layers = True  # Compile time independent of depth.
  config.model.remat = 'full' if size in ('large', 'xl') else 'none'

  # Any prepared TFDS text dataset, e.g. `tfds build lm1b --file_format=array_record`.
  config.data.name = 'lm1b'
  config.data.eval_split = 'test'
  config.data.seq_len = 1024
  config.data.batch_size = 512  # 0.5M tokens per step, as GPT-3 used for these sizes.

  config.optimizer.learning_rate = 6e-4 if size == 'small' else 3e-4 if size == 'medium' else 2e-4
  config.optimizer.warmup_steps = 2000
  config.optimizer.weight_decay = 0.1
  config.train.steps = 100_000
  config.train.log_every = 50
  config.eval.every = 2000
  config.eval.num_batches = 4
  config.eval.batch_size = 512  # Also split over every batch shard.
  config.checkpoint.every = 1000

  config.mesh.shape = MESH_LAYOUTS[layout]
  return config
