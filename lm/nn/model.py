"""The models: a GPT-style decoder (token ids -> next-token logits) and an encoder-decoder
Transformer (input ids, target ids -> next-target-token logits), both stacks of lm.nn.block.Block.

`model.kind` picks one; every other model key applies to both where it makes sense (the encoder
is bidirectional, so it takes no sliding window).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm.nn import mup
from lm.nn.attention import causal_mask, same_segment, segment_positions
from lm.nn.block import Block
from lm.nn.layers import Projection, dropout, dtype_of, hidden_std, norm_layer, param_init

# What the backward pass keeps of a block's activations; the rest it recomputes.
REMAT_POLICIES = {'full': jax.checkpoint_policies.nothing_saveable, 'dots': jax.checkpoint_policies.dots_saveable}


def is_moe_layer(config, index: int) -> bool:
  """Whether block `index` (from 0) holds a mixture of experts: every moe_every-th block after the
  first moe_first_dense."""
  return bool(config.moe_experts) and index >= config.moe_first_dense and (index + 1) % config.moe_every == 0


def _block_class(config, num_layers: int) -> type[nn.Module]:
  block = Block
  if config.remat != 'none':
    block = nn.remat(block, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)
  if config.scan_layers:
    block = nn.scan(block, variable_axes={'params': 0, 'aux_loss': 0, 'moe_stats': 0, 'cache': 0},
                    split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,) * 6, length=num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
  return block


def scanned_stacks(config, num_layers: int) -> list[tuple[str, range]]:
  """(name, the blocks it holds) of each scanned stack of num_layers blocks (model.scan_layers): the
  blocks with a dense MLP before the first expert block (model.moe_first_dense) as 'dense_blocks', the
  rest as 'blocks' (validation forbids moe_every > 1 here, which would mix the two kinds within it)."""
  first = min(config.moe_first_dense, num_layers) if config.moe_experts else 0
  return [(name, layers) for name, layers in (('dense_blocks', range(first)), ('blocks', range(first, num_layers)))
          if layers]


def _stack(config, x_BLD: jax.Array, *, num_layers: int, train: bool, causal: bool = True, cross: bool = False,
           context_BSD=None, self_mask=None, context_mask=None, decode: bool = False, positions_BL=None,
           valid_BL=None, segments_BL=None) -> jax.Array:
  """num_layers blocks, made in the calling module's compact scope: the scanned stacks of
  `scanned_stacks` if model.scan_layers, else block_0 ... block_{n-1}."""
  args = (context_BSD, self_mask, context_mask, positions_BL, valid_BL, segments_BL)
  if config.scan_layers:
    for name, layers in scanned_stacks(config, num_layers):
      block = _block_class(config, len(layers))
      x_BLD, _ = block(config, train, causal, cross, is_moe_layer(config, layers[0]), decode, name=name)(x_BLD, *args)
    return x_BLD
  block = _block_class(config, num_layers)
  for i in range(num_layers):
    x_BLD = block(config, train, causal, cross, is_moe_layer(config, i), decode, name=f'block_{i}')(x_BLD, *args)
  return x_BLD


def _embed(module: nn.Module, embedding: nn.Embed, tokens_BL: jax.Array, table_PD, train: bool,
           positions_BL: jax.Array | None = None) -> jax.Array:
  """Token embeddings times embed_multiplier, plus learned positions if any (rows 0 .. L-1 of the
  table, or those of positions_BL), then embedding dropout."""
  c = module.config
  x_BLD = embedding(tokens_BL) * jnp.asarray(c.embed_multiplier, dtype_of(c))
  if table_PD is not None:
    rows = table_PD[:tokens_BL.shape[1]][None] if positions_BL is None else table_PD[positions_BL]
    x_BLD = x_BLD + rows.astype(dtype_of(c))
  x_BLD = dropout(module, x_BLD, c.embed_dropout, train)
  return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))


def _token_embedding(config) -> nn.Embed:
  return nn.Embed(config.vocab_size, config.d_model, dtype=dtype_of(config), name='token_embedding',
                  embedding_init=param_init(config.init_std, ('vocab', 'embed')))


def _position_table(module: nn.Module, name: str) -> jax.Array | None:
  # 'rope' rotates queries and keys instead; 'none' relies on the causal mask.
  c = module.config
  if c.positions != 'learned':
    return None
  return module.param(name, param_init(c.init_std, (None, 'embed')), (c.max_len, c.d_model))


def _output_layer(config) -> Projection:
  return Projection('BLD,DV->BLV', (config.d_model, config.vocab_size), ('embed', 'vocab'), config.init_std,
                    dtype_of(config), use_bias=False, name='output')


def _logits(config, logits_BLV: jax.Array) -> jax.Array:
  """float32 logits; under muP times mup.readout_multiplier."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  if config.parametrization == 'mup':
    logits_BLV = logits_BLV * mup.readout_multiplier(config)
  return nn.with_logical_constraint(logits_BLV, ('batch', 'length', 'vocab'))


class GPT(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32). `train` turns dropout on (its
  randomness comes from the 'dropout' rng).

  With decode=True the tokens continue those of earlier calls through a KV cache (the mutable
  'cache' collection, made by `lm.kinds.init_cache`): positions_BL says where each token sits in its
  sequence and valid_BL which tokens are real (False: left padding, never attended to).
  """

  config: ml_collections.FrozenConfigDict

  @staticmethod
  def arguments(batch: dict[str, jax.Array]) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """The arguments and keywords of a call predicting batch['tokens'][:, 1:] from the tokens before."""
    segments = {'segments_BL': batch['segment_ids'][:, :-1]} if 'segment_ids' in batch else {}
    return (batch['tokens'][:, :-1],), segments

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, train: bool = False, decode: bool = False,
               positions_BL: jax.Array | None = None, valid_BL: jax.Array | None = None,
               hidden: bool = False, segments_BL: jax.Array | None = None) -> jax.Array:
    """hidden=True returns the final hidden states [B, L, D] instead: see `vocab_logits`.

    segments_BL (data.document_mask) says which document each token belongs to: attention stays
    within it and positions restart at its first token."""
    c = self.config
    self_mask = None if decode else causal_mask(tokens_BL.shape[1], c.sliding_window)
    if segments_BL is not None:
      self_mask, positions_BL = self_mask & same_segment(segments_BL, segments_BL), segment_positions(segments_BL)
    embedding = _token_embedding(c)
    x_BLD = _embed(self, embedding, tokens_BL, _position_table(self, 'position_embedding'), train, positions_BL)
    x_BLD = _stack(c, x_BLD, num_layers=c.num_layers, train=train, self_mask=self_mask,
                   decode=decode, positions_BL=positions_BL, valid_BL=valid_BL, segments_BL=segments_BL)
    if c.mtp_depth and not decode and (self.is_initializing() or self.is_mutable_collection('mtp')):
      # Each module's final hidden states go to the 'mtp' collection: the training loss scores them.
      h_BLD = x_BLD
      for k in range(1, c.mtp_depth + 1):
        ahead_BL = jnp.pad(tokens_BL[:, k:], ((0, 0), (0, k)))  # The last k positions have no token k ahead.
        h_BLD, out_BLD = MultiToken(c, train, name=f'mtp_{k}')(h_BLD, embedding(ahead_BL), self_mask, positions_BL,
                                                               segments_BL)
        self.sow('mtp', f'hidden_{k}', out_BLD)
    if c.norm_position == 'pre':  # Post-norm blocks already end normalised.
      x_BLD = norm_layer('ln_final', c)(x_BLD)
    if hidden:
      return x_BLD
    return _logits(c, embedding.attend(x_BLD) if c.tie_embeddings else _output_layer(c)(x_BLD))


class MultiToken(nn.Module):
  """One multi-token prediction module (DeepSeek-V3's MTP): the previous depth's hidden states and the
  embeddings of the tokens one further ahead, each normalised, joined by a projection from 2D to D, then
  one block of the model's kind. Returns (its hidden states, the same after its own final norm), the
  latter for the shared output layer."""

  config: ml_collections.FrozenConfigDict
  train: bool = False

  @nn.compact
  def __call__(self, h_BLD: jax.Array, ahead_BLD: jax.Array, self_mask, positions_BL, segments_BL):
    c = self.config
    joined_BLE = jnp.concatenate([norm_layer('ln_hidden', c)(h_BLD), norm_layer('ln_embedding', c)(ahead_BLD)], -1)
    # A hidden matrix (Muon and muP treat it so); its 2D input split like an MLP's units.
    x_BLD = Projection('BLE,ED->BLD', (2 * c.d_model, c.d_model), ('mlp', 'embed'), hidden_std(c), dtype_of(c),
                       use_bias=False, name='projection')(joined_BLE)
    block = Block(c, self.train, moe=is_moe_layer(c, c.num_layers - 1), name='block')
    x_BLD = block(x_BLD, None, self_mask, None, positions_BL, None, segments_BL)
    x_BLD = x_BLD[0] if c.scan_layers else x_BLD
    return x_BLD, norm_layer('ln_final', c)(x_BLD) if c.norm_position == 'pre' else x_BLD


class Stack(nn.Module):
  """Blocks and (pre-norm) a final norm: the encoder or the decoder of an EncoderDecoder."""

  config: ml_collections.FrozenConfigDict
  num_layers: int
  causal: bool
  cross: bool

  @nn.compact
  def __call__(self, x_BLD: jax.Array, train: bool, context_BSD=None, self_mask=None, context_mask=None,
               decode: bool = False, positions_BL=None, valid_BL=None):
    x_BLD = _stack(self.config, x_BLD, num_layers=self.num_layers, train=train, causal=self.causal,
                   cross=self.cross, context_BSD=context_BSD, self_mask=self_mask, context_mask=context_mask,
                   decode=decode, positions_BL=positions_BL, valid_BL=valid_BL)
    return norm_layer('ln_final', self.config)(x_BLD) if self.config.norm_position == 'pre' else x_BLD


class EncoderDecoder(nn.Module):
  """The original Transformer layout: a bidirectional encoder over the inputs [B, S], and a causal
  decoder over the targets [B, L] that cross-attends to the encoder output; one token embedding
  serves inputs, targets and (tied) the output. Returns next-target logits [B, L, V]; input
  positions holding `pad_id` are invisible to both stacks."""

  config: ml_collections.FrozenConfigDict
  pad_id: int = 0

  @staticmethod
  def arguments(batch: dict[str, jax.Array]) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """The arguments and keywords of a call predicting batch['tokens'][:, 1:] from batch['inputs'] and
    the tokens before."""
    segments = {}  # data.document_mask: each token's document, the inputs' too.
    if 'segment_ids' in batch:
      segments['segments_BL'] = batch['segment_ids'][:, :-1]
    if 'input_segment_ids' in batch:
      segments['input_segments_BS'] = batch['input_segment_ids']
    return (batch['inputs'], batch['tokens'][:, :-1]), segments

  def setup(self):
    c = self.config
    self.token_embedding = _token_embedding(c)
    self.encoder_position_embedding = _position_table(self, 'encoder_position_embedding')
    self.position_embedding = _position_table(self, 'position_embedding')
    self.encoder = Stack(c, c.num_encoder_layers or c.num_layers, causal=False, cross=False)
    self.decoder = Stack(c, c.num_layers, causal=True, cross=True)
    if not c.tie_embeddings:
      self.output = _output_layer(c)

  def __call__(self, inputs_BS: jax.Array, tokens_BL: jax.Array, train: bool = False,
               hidden: bool = False, input_segments_BS: jax.Array | None = None,
               segments_BL: jax.Array | None = None) -> jax.Array:
    """hidden=True returns the decoder's final hidden states [B, L, D] instead: see `vocab_logits`.

    With segment ids of the inputs and the targets (data.document_mask) every attention stays within
    a document, and positions restart at each."""
    encoded_BSD = self.encode(inputs_BS, train, input_segments_BS)
    return self.decode(encoded_BSD, inputs_BS, tokens_BL, train, hidden, input_segments_BS=input_segments_BS,
                       segments_BL=segments_BL)

  def encode(self, inputs_BS: jax.Array, train: bool = False,
             input_segments_BS: jax.Array | None = None) -> jax.Array:
    self_mask, positions_BS = (inputs_BS != self.pad_id)[:, None, :], None
    if input_segments_BS is not None:
      self_mask = self_mask & same_segment(input_segments_BS, input_segments_BS)
      positions_BS = segment_positions(input_segments_BS)
    x_BSD = _embed(self, self.token_embedding, inputs_BS, self.encoder_position_embedding, train, positions_BS)
    return self.encoder(x_BSD, train, self_mask=self_mask, positions_BL=positions_BS)

  def decode(self, encoded_BSD: jax.Array, inputs_BS: jax.Array, tokens_BL: jax.Array, train: bool = False,
             hidden: bool = False, decode: bool = False, positions_BL: jax.Array | None = None,
             valid_BL: jax.Array | None = None, input_segments_BS: jax.Array | None = None,
             segments_BL: jax.Array | None = None):
    """The decoder over tokens_BL given the encoder output. With decode=True the tokens continue
    earlier calls' through the decoder's self-attention KV cache, as in GPT (positions_BL, valid_BL)."""
    c = self.config
    self_mask = None if decode else causal_mask(tokens_BL.shape[1], c.sliding_window)
    context_mask = (inputs_BS != self.pad_id)[:, None, :]
    if segments_BL is not None:
      self_mask, positions_BL = self_mask & same_segment(segments_BL, segments_BL), segment_positions(segments_BL)
      context_mask = context_mask & same_segment(segments_BL, input_segments_BS)
    x_BLD = _embed(self, self.token_embedding, tokens_BL, self.position_embedding, train, positions_BL)
    x_BLD = self.decoder(x_BLD, train, encoded_BSD, self_mask, context_mask, decode, positions_BL, valid_BL)
    if hidden:
      return x_BLD
    return _logits(c, self.token_embedding.attend(x_BLD) if c.tie_embeddings else self.output(x_BLD))


def apply_model(model: nn.Module, params, batch: dict[str, jax.Array], *, train: bool = False,
                rngs: dict | None = None, mutable=False, hidden: bool = False):
  """Logits predicting batch['tokens'][:, 1:] from what the model reads of the batch (its `arguments`);
  with hidden=True the final hidden states they come from (see `vocab_logits`)."""
  args, segments = model.arguments(batch)
  return model.apply({'params': params}, *args, train=train, rngs=rngs, mutable=mutable, hidden=hidden, **segments)


def vocab_logits(config, params, x_BLD: jax.Array, readout_DV: jax.Array | None = None) -> jax.Array:
  """The model's output layer on its final hidden states: float32 logits [B, L, V], as the model
  computes them (the tied embedding transposed, or the separate output matrix, in model.dtype), or
  by readout_DV, that matrix as given."""
  dtype = dtype_of(config)
  if readout_DV is not None:
    logits_BLV = jnp.dot(x_BLD.astype(dtype), readout_DV.astype(dtype))
  elif config.tie_embeddings:
    logits_BLV = jnp.einsum('BLD,VD->BLV', x_BLD.astype(dtype), params['token_embedding']['embedding'].astype(dtype))
  else:
    logits_BLV = jnp.einsum('BLD,DV->BLV', x_BLD.astype(dtype), params['output']['kernel'].astype(dtype))
  return _logits(config, logits_BLV)


# Each cache variable's slot axis (counted from the end; the scanned layout adds a leading layer axis).
_CACHE_SLOT_AXIS = {'cached_key': -1, 'cached_value': -2, 'cached_positions': -1, 'cached_valid': -1}


def empty_cache(init_shapes: dict, length: int | None = None) -> dict:
  """Zeros shaped like the 'cache' collection of `init_shapes` (jax.eval_shape of a model.init that
  decodes), with room for `length` tokens (default: max_len)."""
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(init_shapes['cache']))
  return cache if length is None else resize_cache(cache, length)


def resize_cache(cache: dict, length: int) -> dict:
  """The cache with room for `length` tokens: empty slots added (or unused ones dropped) at the end."""
  def resize(path, x):
    axis = _CACHE_SLOT_AXIS.get(path[-1].key)
    if axis is None:
      return x
    axis %= x.ndim
    if x.shape[axis] >= length:
      return jax.lax.slice_in_dim(x, 0, length, axis=axis)
    return jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
  return jax.tree_util.tree_map_with_path(resize, cache)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


EXPERT_WEIGHTS = ('gate_kernel', 'up_kernel', 'down_kernel', 'gate_bias', 'up_bias', 'down_bias')


def count_active_params(params, config) -> int:
  """Parameters a token passes through: all but the routed experts it was not sent to (each MoE layer's
  expert weights count top_k of their moe_experts shares)."""
  inactive = 0.0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(k, 'key', None) for k in path]
    if len(names) > 1 and names[-2] == 'moe' and names[-1] in EXPERT_WEIGHTS:
      inactive += x.size * (config.moe_experts - config.moe_top_k) / config.moe_experts
  return count_params(params) - round(inactive)


def count_mtp_params(params) -> int:
  """Parameters of the multi-token prediction modules (model.mtp_depth), which generation never runs."""
  return sum(count_params(v) for k, v in params.items() if k.startswith('mtp_'))


def count_embedding_params(params) -> int:
  """Parameters of the token and position tables and an untied output layer: those that scale with
  the vocabulary or context, not the depth (scaling laws count the rest)."""
  return sum(count_params(v) for k, v in params.items() if 'embedding' in k or k == 'output')


def stack_layers(params: dict, config) -> dict:
  """Parameters of the unscanned model (block_0 ... block_{n-1}) in the scanned layout of model section
  `config` (the stacks of `scanned_stacks`)."""
  params = dict(params)
  blocks = [params.pop(f'block_{i}') for i in range(config.num_layers)]
  for name, layers in scanned_stacks(config, config.num_layers):
    params[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks[layers.start:layers.stop])
  return params


def unstack_layers(params: dict, config) -> dict:
  """The inverse of stack_layers (params already unscanned are returned as they are)."""
  params = dict(params)
  for name, layers in scanned_stacks(config, config.num_layers):
    if name not in params:
      continue
    stacked = params.pop(name)
    for index, i in enumerate(layers):
      params[f'block_{i}'] = jax.tree.map(lambda x, index=index: x[index], stacked)
  return params
