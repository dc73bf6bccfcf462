"""The `model.*` keys: the network's shape and its variants, and the rules tying them together."""

from __future__ import annotations

import dataclasses

from lm.config.mesh import mesh_sizes
from lm.config.schema import BOOLEAN, FREE, MATCH, SHAPE, choice, integer, key, number


@dataclasses.dataclass(frozen=True)
class Model:
  kind: str = key('decoder', choice('decoder', 'encoder_decoder'), SHAPE,
                  "'decoder' (GPT) or 'encoder_decoder' (needs data.objective 'span_corruption' or 'seq2seq').")
  vocab_size: int = key(4096, integer(1), SHAPE,
                        'Rows of the embedding; the sentencepiece tokenizer is trained to this size.')
  max_len: int = key(256, integer(1), SHAPE,
                     'Rows of the learned position table: the longest sequence the model accepts.')
  num_layers: int = key(4, integer(1), SHAPE, 'Blocks of the decoder.')
  num_encoder_layers: int = key(0, integer(0), SHAPE, 'encoder_decoder only: blocks of the encoder; 0 = num_layers.')
  num_heads: int = key(4, integer(1), SHAPE, 'Attention heads (query heads).')
  d_model: int = key(256, integer(1), SHAPE,
                     'Residual stream width; must be divisible by num_heads unless head_dim is set.')
  head_dim: int = key(0, integer(0), SHAPE,
                      'Width of each attention head; 0 = d_model / num_heads (Qwen3 and Gemma set it apart).')
  mlp_dim: int = key(1024, integer(0), SHAPE,
                     'Hidden width of the MLP; 0 = 4 * d_model, or for swiglu 2/3 of that (same parameters).')
  mlp_multiple_of: int = key(1, integer(1), SHAPE,
                             'mlp_dim=0 with swiglu: round the width up to a multiple of this (Llama: 256).')
  init_std: float = key(0.02, number(0, lo_open=True), SHAPE, 'Std of the normal init of every matrix and embedding.')
  init: str = key('gpt2', choice('gpt2', 'normal'), SHAPE,
                  "'gpt2': residual output projections get init_std / sqrt(2 * num_layers); 'normal': all init_std.")
  use_bias: bool = key(True, BOOLEAN, SHAPE, 'Biases in the attention and MLP projections (GPT-2 has them, Llama not).')
  qkv_bias: bool = key(False, BOOLEAN, SHAPE,
                       'Biases on the query, key and value projections even with use_bias=False (Qwen2).')
  num_kv_heads: int = key(0, integer(0), SHAPE,
                          'Key/value heads: 0 = num_heads (multi-head); 1 = multi-query; else grouped-query.')
  positions: str = key('learned', choice('learned', 'rope', 'none'), SHAPE,
                       "'learned' (a table of max_len rows), 'rope' (rotary), or 'none'.")
  rope_base: float = key(10000.0, number(1, lo_open=True), MATCH, "RoPE wavelength base (positions='rope').")
  rope_scaling: str = key('none', choice('none', 'linear', 'dynamic', 'llama3', 'yarn'), MATCH,
                          "RoPE frequencies stretched for longer contexts, as transformers defines them: 'linear' "
                          "(positions / factor), 'dynamic' (NTK: the base grows with the length past "
                          "rope_original_max_len), 'llama3' (low frequencies / factor, smoothed between), 'yarn' "
                          '(YaRN: frequencies of under rope_yarn_beta_slow rotations in rope_original_max_len / '
                          'factor, of over rope_yarn_beta_fast kept, ramped between; scores scaled).')
  rope_scaling_factor: float = key(1.0, number(1), MATCH, 'rope_scaling: the stretch factor.')
  rope_low_freq_factor: float = key(1.0, number(0, lo_open=True), MATCH,
                                    "rope_scaling='llama3': wavelengths over rope_original_max_len / this are "
                                    'divided by the factor.')
  rope_high_freq_factor: float = key(4.0, number(0, lo_open=True), MATCH,
                                     "rope_scaling='llama3': wavelengths under rope_original_max_len / this are kept.")
  rope_original_max_len: int = key(8192, integer(1), MATCH,
                                   "rope_scaling 'llama3', 'dynamic' and 'yarn': the context the RoPE was trained at.")
  rope_yarn_beta_fast: float = key(32.0, number(0, lo_open=True), MATCH,
                                   "rope_scaling='yarn': frequencies turning more often than this over "
                                   'rope_original_max_len keep their value.')
  rope_yarn_beta_slow: float = key(1.0, number(0, lo_open=True), MATCH,
                                   "rope_scaling='yarn': frequencies turning less often than this are divided by "
                                   'the factor.')
  rope_yarn_attention_factor: float = key(0.0, number(0), MATCH,
                                          "rope_scaling='yarn': cos and sin (so q and k) times this; 0 = "
                                          '0.1 ln(factor) + 1, as YaRN derives it.')
  norm: str = key('layernorm', choice('layernorm', 'rmsnorm'), SHAPE, "'layernorm' or 'rmsnorm'.")
  norm_eps: float = key(1e-5, number(0, lo_open=True), MATCH, 'Epsilon of the block and final norms.')
  qk_norm_eps: float = key(1e-6, number(0, lo_open=True), MATCH, 'Epsilon of the query and key norms (qk_norm).')
  norm_position: str = key('pre', choice('pre', 'post'), SHAPE,
                           "'pre': x + f(norm(x)) with a final norm; 'post': norm(x + f(x)).")
  qk_norm: bool = key(False, BOOLEAN, SHAPE, 'RMS-normalise queries and keys per head before the dot product.')
  sliding_window: int = key(0, integer(0), MATCH,
                            'Attend only to the last this-many positions (self included); 0 = all.')
  embed_multiplier: float = key(1.0, number(0, lo_open=True), SHAPE,
                                'Token embeddings are scaled by this on input (e.g. sqrt(d_model)).')
  mlp: str = key('gelu', choice('gelu', 'relu', 'swiglu'), SHAPE,
                 "'gelu', 'relu', or 'swiglu' (three matrices; see mlp_dim=0).")
  embed_dropout: float = key(0.0, number(0, 1, hi_open=True), FREE,
                             'Dropout rate on the embeddings (training only; masks drawn per step).')
  attention_dropout: float = key(0.0, number(0, 1, hi_open=True), FREE, 'Dropout rate on the attention probabilities.')
  residual_dropout: float = key(0.0, number(0, 1, hi_open=True), FREE,
                                'Dropout rate on each attention and MLP output before its residual add.')
  mtp_depth: int = key(0, integer(0), SHAPE, "Multi-token prediction (DeepSeek-V3's sequential form): this many "
                       'modules after the blocks, module k predicting the token k + 1 ahead from module k - 1 and the '
                       'embedding of the token k ahead; trained with train.mtp_weight, ignored by generation.')
  moe_experts: int = key(0, integer(0), SHAPE, 'Mixture of experts: experts per MoE layer; 0 = dense MLPs only.')
  moe_top_k: int = key(2, integer(1), SHAPE, 'Experts each token is routed to.')
  moe_every: int = key(1, integer(1), SHAPE,
                       'Every this-many-th block (counting from 1) has experts instead of an MLP.')
  moe_mlp_dim: int = key(0, integer(0), SHAPE, "Each expert's hidden width (fine-grained experts: narrower than "
                         'the dense MLP); 0 = the MLP width (model.mlp_dim or its rule).')
  moe_shared_experts: int = key(0, integer(0), SHAPE, 'Shared experts every token passes through besides its top_k: '
                                'one MLP that many experts wide, added to the routed output.')
  moe_first_dense: int = key(0, integer(0), SHAPE, 'The first this-many blocks keep a dense MLP (DeepSeek-V3: 3); '
                             'experts start after them.')
  moe_router_score: str = key('softmax', choice('softmax', 'sigmoid'), MATCH,
                              "Router scores from its logits: 'softmax' over the experts, or 'sigmoid' per expert "
                              '(DeepSeek-V3).')
  moe_norm_top_k: bool = key(True, BOOLEAN, MATCH, 'Renormalise the chosen scores to sum to 1 (when top_k > 1: a '
                             "top-1 gate stays the raw score, so the router learns from the task).")
  moe_routed_scale: float = key(1.0, number(0, lo_open=True), MATCH, 'Factor on the routed experts\' gates.')
  moe_groups: int = key(1, integer(1), MATCH, 'Group-limited routing: the experts in this many groups; each token '
                        'chooses moe_top_groups groups (by the sum of their two best scores), then its top_k experts '
                        'within them. 1 = no groups.')
  moe_top_groups: int = key(1, integer(1), MATCH, 'moe_groups > 1: the groups each token chooses from.')
  moe_router_bias: bool = key(False, BOOLEAN, SHAPE, "A per-expert bias (a 'router_bias' parameter) added to the "
                              'scores when choosing experts, not to the gates: DeepSeek-V3\'s load balancing, set by '
                              'moe_bias_rate (the optimizer never changes it).')
  moe_bias_rate: float = key(0.0, number(0), FREE, 'moe_router_bias: after each step every expert\'s bias moves '
                             'this much up if it got fewer than the mean of its layer\'s tokens, down if more '
                             '(DeepSeek-V3: 0.001); 0 = held where it is.')
  moe_balance_per_sequence: bool = key(False, BOOLEAN, FREE, 'The load-balancing loss (train.moe_balance_loss) '
                                       "of each sequence's tokens, averaged over sequences (DeepSeek-V3's "
                                       'sequence-wise loss, there at a weight of 1e-4); False: of the whole batch.')
  moe_impl: str = key('capacity', choice('capacity', 'dropless'), FREE,
                      "'capacity': GShard dispatch into moe_capacity_factor slots per expert (overflow dropped); "
                      "'dropless': tokens sorted by expert, grouped products, none dropped.")
  moe_grouped_impl: str = key('auto', choice('auto', 'ragged_dot', 'blocks'), FREE,
                              "moe_impl='dropless': the grouped product: 'ragged_dot' (jax.lax.ragged_dot: GPU, "
                              "TPU), 'blocks' (groups padded to blocks of rows: CPU), 'auto': the backend's.")
  moe_ep_capacity_factor: float = key(0.0, number(0), FREE, "moe_impl='dropless' over an expert mesh axis: rows each "
                                      'device sends each expert shard = factor x its mean share of token-expert '
                                      'pairs (overflow dropped, counted in train/moe/dropped); 0 = the worst case, '
                                      'nothing dropped.')
  moe_capacity_factor: float = key(1.25, number(0), FREE,
                                   'Slots per expert = factor * top_k * max_len / experts; overflow is dropped; '
                                   '0 = none.')
  tie_embeddings: bool = key(True, BOOLEAN, SHAPE,
                             'Output layer = the token embedding transposed; False: a separate matrix.')
  dtype: str = key('float32', choice('float32', 'bfloat16'), FREE,
                   "Compute dtype: 'float32' or 'bfloat16' (parameters and optimizer state stay float32).")
  attention_impl: str = key('auto', choice('auto', 'xla', 'cudnn', 'splash'), FREE,
                            "'xla', 'cudnn' (GPU, bf16: cuDNN flash attention), 'splash' (Pallas splash "
                            "attention: TPU, or interpreted elsewhere), or 'auto': cudnn or splash where it applies.")
  splash_block_q: int = key(512, integer(128), FREE, "attention_impl='splash': queries per block (a multiple of "
                            "128; a sequence shorter than it is one block).")
  splash_block_kv: int = key(512, integer(128), FREE, "attention_impl='splash': keys per block (a multiple of 128).")
  remat: str = key('none', choice('none', 'full', 'dots'), FREE,
                   "Recompute activations in the backward pass: 'none', 'full', or 'dots' (keep matmul outputs).")
  parametrization: str = key('sp', choice('sp', 'mup'), SHAPE,
                             "'sp' (standard) or 'mup': hyperparameters tuned at mup_base_width carry to other "
                             'widths (Adam-type optimizers; docs/optimizers.md, muP).')
  mup_base_width: int = key(256, integer(1), SHAPE,
                            "parametrization='mup': the d_model at which muP equals SP (where its learning rate "
                            'was tuned).')
  scan_layers: bool = key(False, BOOLEAN, SHAPE,
                          "nn.scan over the blocks: compile time independent of depth; params get a 'layers' axis.")


def splash_length_misfit(m, length: int, context: int = 1) -> tuple[str, int] | None:
  """Why splash attention does not take `length` tokens of queries split over `context` devices, or
  None: ('length', the block key it is not a multiple of) or ('per_device', the tokens per device).
  Lengths must be multiples of 128 and of each block size (or shorter than it), as must each device's
  stretch of queries. The one rule: the config's check refuses a seq_len by it, and the attention
  layer sends the other lengths it meets (a prompt, the harness's buckets) to plain attention."""
  for name in ('splash_block_q', 'splash_block_kv'):
    if length % 128 or length % min(m[name], length):
      return 'length', name
  per_device = length // context
  if per_device % 128 or per_device % min(m.splash_block_q, per_device):
    return 'per_device', per_device
  return None


def splash_problems(c) -> list[str]:
  """Why model.attention_impl='splash' cannot run this config, one line each."""
  m, errors = c.model, []
  for name in ('splash_block_q', 'splash_block_kv'):
    if m[name] % 128:
      errors.append(f'model.{name}={m[name]} must be a multiple of 128 (the TPU lane width)')
  if m.attention_dropout:
    errors.append(f"model.attention_impl='splash' cannot apply model.attention_dropout={m.attention_dropout}: "
                  "set it to 0 or use attention_impl='xla'")
  if m.kind != 'decoder':
    errors.append(f"model.attention_impl='splash' needs model.kind='decoder' (not {m.kind!r})")
  length = c.data.seq_len
  misfit = splash_length_misfit(m, length, mesh_sizes(c.mesh.shape)[2])
  if misfit and misfit[0] == 'length':
    errors.append(f"model.attention_impl='splash' needs data.seq_len={length} to be a multiple of 128 and of "
                  f'model.{misfit[1]}={m[misfit[1]]} (or shorter than it)')
  elif misfit and not errors:
    errors.append(f"model.attention_impl='splash' needs the {misfit[1]} tokens per device along the context axis "
                  f'of mesh.shape={c.mesh.shape!r} to be a multiple of 128 and of '
                  f'model.splash_block_q={m.splash_block_q} (or shorter than it)')
  return errors


def rules(c) -> list[str]:
  """The model's cross-key rules: each broken one as a line naming the keys."""
  m = c.model
  errors = []
  if m.attention_impl == 'splash':
    errors += splash_problems(c)
  if not m.head_dim and m.d_model % m.num_heads:
    errors.append(f'model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads} '
                  '(or set model.head_dim)')
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    errors.append(f'model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}')
  if m.positions == 'rope' and m.head_dim % 2:
    errors.append(f"model.positions='rope' needs an even head dimension: model.head_dim={m.head_dim}")
  elif m.positions == 'rope' and not m.head_dim and m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2:
    errors.append(f"model.positions='rope' needs an even head dimension: model.d_model={m.d_model} / "
                  f'model.num_heads={m.num_heads} = {m.d_model // m.num_heads}')
  if m.rope_scaling != 'none' and m.positions != 'rope':
    errors.append(f"model.rope_scaling={m.rope_scaling!r} needs model.positions='rope', not {m.positions!r}")
  if m.rope_scaling == 'llama3' and m.rope_high_freq_factor <= m.rope_low_freq_factor:
    errors.append(f'model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed '
                  f'model.rope_low_freq_factor={m.rope_low_freq_factor}')
  return errors


def mtp_rules(c) -> list[str]:
  m = c.model
  if m.mtp_depth and m.kind != 'decoder':
    return [f"model.mtp_depth={m.mtp_depth} needs model.kind='decoder' (not {m.kind!r})"]
  return []


def moe_rules(c) -> list[str]:
  m = c.model
  errors = []
  if m.moe_experts and m.moe_top_k > m.moe_experts:
    errors.append(f'model.moe_top_k={m.moe_top_k} must be <= model.moe_experts={m.moe_experts}')
  if m.moe_experts and m.moe_experts % m.moe_groups:
    errors.append(f'model.moe_groups={m.moe_groups} must divide model.moe_experts={m.moe_experts}')
  elif m.moe_experts and m.moe_top_groups > m.moe_groups:
    errors.append(f'model.moe_top_groups={m.moe_top_groups} must be <= model.moe_groups={m.moe_groups}')
  elif m.moe_experts and m.moe_groups > 1 and m.moe_top_k > m.moe_top_groups * (m.moe_experts // m.moe_groups):
    errors.append(f'model.moe_top_k={m.moe_top_k} must be <= the {m.moe_top_groups * (m.moe_experts // m.moe_groups)} '
                  f'experts in model.moe_top_groups={m.moe_top_groups} groups of '
                  f'{m.moe_experts // m.moe_groups}')
  if m.moe_bias_rate and not (m.moe_experts and m.moe_router_bias):
    errors.append(f'model.moe_bias_rate={m.moe_bias_rate} needs model.moe_experts > 0 and model.moe_router_bias=True '
                  '(the bias it moves)')
  if m.moe_experts and m.moe_every > m.num_layers:
    errors.append(f'model.moe_every={m.moe_every} leaves no block with experts: '
                  f'must be <= model.num_layers={m.num_layers}')
  if m.moe_experts and m.moe_every > 1 and m.scan_layers:
    errors.append(f'model.moe_every={m.moe_every} mixes MLP and expert blocks, which model.scan_layers=True cannot '
                  'scan: set moe_every=1 or scan_layers=False')
  if m.moe_experts and m.moe_first_dense >= m.num_layers:
    errors.append(f'model.moe_first_dense={m.moe_first_dense} leaves no block with experts: must be < '
                  f'model.num_layers={m.num_layers}')
  return errors


def mup_rules(c) -> list[str]:
  """muP's recipe is for Adam-type updates (entries of size ~ the learning rate): refuse the others."""
  m, o = c.model, c.optimizer
  if m.parametrization != 'mup':
    return []
  if o.name in ('sgd', 'muon'):
    return [f"model.parametrization='mup' is defined here for optimizer.name 'adamw', 'lion' or 'adafactor', "
            f'not {o.name!r}']
  if o.name == 'adafactor' and o.adafactor_parameter_scale:
    return ["model.parametrization='mup' needs optimizer.adafactor_parameter_scale=False: updates relative to "
            "the parameters' scale are not the Adam-type recipe"]
  return []
