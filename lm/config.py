"""The config schema: defaults every experiment starts from, and validation.

Every key an experiment may set is defined in `base_config()`; `validate()` checks each key's
type and range and the rules that tie keys together, and raises `ConfigError` with one line that
names the key and what is allowed. Nothing else in `lm` is imported here.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import pathlib
from typing import Any, Callable

import ml_collections


class ConfigError(ValueError):
  """A bad config or bad input, explained in one line for the user."""


MESH_AXES = ('data', 'fsdp', 'tensor')
LOGICAL_AXES = ('batch', 'length', 'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp', 'expert', 'layers')

# Logical axis -> mesh axes, highest priority first. One rule set serves every layout: with the
# default mesh (-1, 1, 1) it is pure data parallelism; a larger fsdp axis shards parameters and
# optimizer state along `embed` (and the batch further); a tensor axis splits heads, MLP and vocab.
# A mesh axis is used once per array: activations [batch, length, embed] take fsdp for the batch,
# so their embed dimension stays whole.
DEFAULT_LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('expert', None),  # Expert parallelism: put ('expert', 'data') first, so experts (not the batch) take data.
    ('embed', 'fsdp'),
    ('kv', None),
    ('length', None),
    ('layers', None),
)


# Named mesh.shape layouts for presets (--config=experiments/gpt2.py:SIZE,LAYOUT); see the README.
MESH_LAYOUTS = {'dp': (-1, 1, 1), 'fsdp': (1, -1, 1), 'hybrid': (-1, 16, 1), 'fsdp_tensor': (1, -1, 4)}


def preset_arg(experiment: str, arg: str, sizes) -> tuple[str, str]:
  """(SIZE, LAYOUT) of a preset's 'SIZE[,LAYOUT]' argument (LAYOUT default 'dp'), or a one-line error."""
  size, _, layout = arg.partition(',')
  layout = layout or 'dp'
  if size not in sizes or layout not in MESH_LAYOUTS:
    raise ValueError(f'{experiment}:{arg}: expected SIZE[,LAYOUT] with SIZE one of {", ".join(sizes)} '
                     f'and LAYOUT one of {", ".join(MESH_LAYOUTS)}')
  return size, layout


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults. Experiments override values, never add keys."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root of all randomness: init, data order, sampling. Per-step keys fold in the step.

  c.model = ml_collections.ConfigDict()
  c.model.kind = 'decoder'  # 'decoder' (GPT) or 'encoder_decoder' (needs data.objective 'span_corruption' or 'seq2seq').
  c.model.vocab_size = 4096  # Rows of the embedding; the sentencepiece tokenizer is trained to this size.
  c.model.max_len = 256  # Rows of the learned position table: the longest sequence the model accepts.
  c.model.num_layers = 4  # Blocks of the decoder.
  c.model.num_encoder_layers = 0  # encoder_decoder only: blocks of the encoder; 0 = num_layers.
  c.model.num_heads = 4
  c.model.d_model = 256  # Residual stream width; must be divisible by num_heads.
  c.model.mlp_dim = 1024  # Hidden width of the MLP; 0 = 4 * d_model, or for swiglu 2/3 of that (same parameters).
  c.model.mlp_multiple_of = 1  # mlp_dim=0 with swiglu: round the width up to a multiple of this (Llama: 256).
  c.model.init_std = 0.02  # Std of the normal init of every matrix and embedding.
  c.model.init = 'gpt2'  # 'gpt2': residual output projections get init_std / sqrt(2 * num_layers); 'normal': all init_std.
  c.model.use_bias = True  # Biases in the attention and MLP projections (GPT-2 has them, Llama not).
  c.model.num_kv_heads = 0  # Key/value heads: 0 = num_heads (multi-head); 1 = multi-query; else grouped-query.
  c.model.positions = 'learned'  # 'learned' (a table of max_len rows), 'rope' (rotary), or 'none'.
  c.model.rope_base = 10000.0  # RoPE wavelength base (positions='rope').
  c.model.norm = 'layernorm'  # 'layernorm' or 'rmsnorm'.
  c.model.norm_position = 'pre'  # 'pre': x + f(norm(x)) with a final norm; 'post': norm(x + f(x)).
  c.model.qk_norm = False  # RMS-normalise queries and keys per head before the dot product.
  c.model.sliding_window = 0  # Attend only to the last this-many positions (self included); 0 = all.
  c.model.embed_multiplier = 1.0  # Token embeddings are scaled by this on input (e.g. sqrt(d_model)).
  c.model.mlp = 'gelu'  # 'gelu', 'relu', or 'swiglu' (three matrices; see mlp_dim=0).
  c.model.embed_dropout = 0.0  # Dropout rate on the embeddings (training only; masks drawn per step).
  c.model.attention_dropout = 0.0  # ... on the attention probabilities.
  c.model.residual_dropout = 0.0  # ... on each attention and MLP output before its residual add.
  c.model.moe_experts = 0  # Mixture of experts: experts per MoE layer; 0 = dense MLPs only.
  c.model.moe_top_k = 2  # Experts each token is routed to.
  c.model.moe_every = 1  # Every this-many-th block (counting from 1) has experts instead of an MLP.
  c.model.moe_capacity_factor = 1.25  # Slots per expert = factor * top_k * max_len / experts; overflow is dropped; 0 = none.
  c.model.tie_embeddings = True  # Output layer = the token embedding transposed; False: a separate matrix.
  c.model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (parameters and optimizer state stay float32).
  c.model.attention_impl = 'auto'  # 'xla', 'cudnn' (GPU, bf16: cuDNN flash attention), or 'auto': cudnn where it applies.
  c.model.remat = 'none'  # Recompute activations in the backward pass: 'none', 'full', or 'dots' (keep matmul outputs).
  c.model.scan_layers = False  # nn.scan over the blocks: compile time independent of depth; params get a 'layers' axis.

  c.data = ml_collections.ConfigDict()
  c.data.name = 'shakespeare'  # 'shakespeare', 'text_files', 'text_pairs', or any TFDS dataset prepared as array_record.
  c.data.paths = ''  # text_files / text_pairs: comma-separated files or globs (pairs: .tsv input<TAB>target, or .jsonl).
  c.data.tfds_data_dir = ''  # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.text_key = 'text'  # Feature holding the text in each example.
  # 'sentencepiece' (trained on the train split on first use), 'byte', or 'huggingface' (a tokenizer.json
  # taken from checkpoint.init_from: a GPT-2 brought in by python -m lm.hf import).
  c.data.tokenizer = 'sentencepiece'
  c.data.tokenizer_train_bytes = 50_000_000  # At most this much train text is used to train sentencepiece.
  c.data.objective = 'lm'  # 'lm' (next token), 'span_corruption' (T5, on the same text) or 'seq2seq' (input/target pairs).
  c.data.seq_len = 256  # Tokens per training sequence (the model sees seq_len inputs, predicts seq_len targets).
  c.data.target_len = 64  # seq2seq: decoder positions per example (targets are cut or padded to this).
  c.data.input_key = 'input'  # seq2seq: the feature holding the input text ...
  c.data.target_key = 'target'  # ... and the one holding the target text.
  c.data.noise_density = 0.15  # span_corruption: share of tokens masked ...
  c.data.mean_span_length = 3.0  # ... in spans of this mean length.
  c.data.batch_size = 32  # Sequences per step.
  c.data.shuffle_window = 1024  # Packed sequences shuffled together after packing; 0 = off.
  c.data.val_fraction = 0.1  # text_files: share of files (or of a lone file) held out for validation; text_pairs: of pairs.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # Peak, reached after warmup, then cosine decay to the end of training.
  c.optimizer.warmup_steps = 100
  c.optimizer.min_lr_ratio = 0.1  # Final learning rate as a fraction of the peak.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1  # Decoupled (AdamW); never applied to biases, norms or embeddings.
  c.optimizer.grad_clip_norm = 1.0  # Global-norm clipping threshold; 0 = off.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Total optimizer steps; the learning-rate schedule ends here.
  c.train.log_every = 10  # Steps between train metric records.
  c.train.z_loss = 0.0  # Weight of the auxiliary loss z_loss * log(sum(exp(logits)))^2 (keeps logits near 0).
  c.train.label_smoothing = 0.0  # Share of each target's probability spread evenly over the vocabulary.
  c.train.moe_balance_loss = 0.01  # Weight of the experts' load-balancing loss (mean over MoE layers).
  c.train.peak_flops_per_device = 0.0  # For train/mfu: peak FLOP/s of one device; 0 = known TPU/GPU kinds, none on CPU.
  c.train.microbatches = 1  # Gradient accumulation: each step's batch is split into this many sequential passes.
  c.train.logits_chunk = 0  # Positions whose logits the training loss computes at once (memory: B x this x V); 0 = all.
  # A step whose loss or gradient norm is not finite (NaN/Inf) is skipped: no update,
  # counted in train/skipped_steps. More than this many in a row stop the run with an error and no new
  # checkpoint (the last good one stays). 0 = stop at the first.
  c.train.max_nonfinite_steps = 10

  # The device mesh and how the model's logical axes map onto it (see lm/sharding.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # Devices along (data, fsdp, tensor); one entry may be -1: all remaining devices.
  c.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 200  # Steps between evaluations (and samples); training always ends with one.
  c.eval.num_batches = 8  # Batches per periodic eval; 0 = the whole split.
  c.eval.final_num_batches = 0  # Batches of the eval that ends training; 0 = the whole split.
  c.eval.batch_size = 32
  c.eval.sample_prompt = ''  # Text the samples continue; '' = start of a document.
  c.eval.sample_tokens = 128  # New tokens per sample (fewer if the prompt leaves less room in max_len).
  c.eval.num_samples = 2
  c.eval.sample_temperature = 0.8

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200  # Steps between checkpoints; training always ends with one.
  c.checkpoint.every_minutes = 0.0  # Also checkpoint when this many minutes passed since the last one; 0 = off.
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True  # Write checkpoints in the background while training continues.
  c.checkpoint.init_from = ''  # A workdir whose latest parameters (and tokenizer) start a fresh run: fine-tuning.
  return c


# ---------------------------------------------------------------------------------------------
# Sizes derived from several keys.

def span_lengths(seq_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int, int, int]:
  """Span corruption (lm/data/spans.py): (raw_len, num_noise, num_spans, target_len), the longest
  token window whose corrupted input fits in seq_len, and what it yields."""

  def counts(raw_len):
    num_noise = min(max(1, round(raw_len * noise_density)), raw_len - 1)
    num_spans = max(1, min(round(num_noise / mean_span_length), num_noise, raw_len - num_noise))
    return num_noise, num_spans

  raw_len = seq_len
  while True:  # The corrupted input of raw_len + 1 tokens would still fit: take it.
    noise, spans = counts(raw_len + 1)
    if raw_len + 1 - noise + spans > seq_len:
      break
    raw_len += 1
  num_noise, num_spans = counts(raw_len)
  return raw_len, num_noise, num_spans, num_noise + num_spans



def reserved_ids(config: ml_collections.ConfigDict) -> int:
  """Ids at the top of the vocabulary the tokenizer leaves free: span corruption's sentinels."""
  d = config.data
  return span_lengths(d.seq_len, d.noise_density, d.mean_span_length)[2] if d.objective == 'span_corruption' else 0


def target_len(config: ml_collections.ConfigDict) -> int:
  """Decoder positions of an encoder-decoder example (seq2seq: data.target_len)."""
  d = config.data
  if d.objective == 'span_corruption':
    return span_lengths(d.seq_len, d.noise_density, d.mean_span_length)[3]
  return d.target_len


# ---------------------------------------------------------------------------------------------
# Per-key checks. Each returns None when the value is fine, else a phrase saying what is allowed.

Check = Callable[[Any], 'str | None']


def _int(lo: int | None = None, hi: int | None = None) -> Check:
  def check(v):
    if isinstance(v, bool) or not isinstance(v, int):
      return 'must be an integer'
    if lo is not None and v < lo:
      return f'must be >= {lo}'
    if hi is not None and v > hi:
      return f'must be <= {hi}'
    return None
  return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Check:
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return 'must be a finite number'
    if lo is not None and (v <= lo if lo_open else v < lo):
      return f'must be {">" if lo_open else ">="} {lo}'
    if hi is not None and (v >= hi if hi_open else v > hi):
      return f'must be {"<" if hi_open else "<="} {hi}'
    return None
  return check


def _choice(*allowed: str) -> Check:
  def check(v):
    return None if v in allowed else f'must be one of {", ".join(repr(a) for a in allowed)}'
  return check


def _str(nonempty: bool = False) -> Check:
  def check(v):
    if not isinstance(v, str):
      return 'must be a string'
    if nonempty and not v:
      return 'must not be empty'
    return None
  return check


def _bool(v):
  return None if isinstance(v, bool) else 'must be True or False'


def _mesh_shape(v):
  if not isinstance(v, (tuple, list)) or len(v) != len(MESH_AXES) or not all(
      isinstance(n, int) and not isinstance(n, bool) for n in v):
    return f'must be {len(MESH_AXES)} integers, devices along {MESH_AXES}, e.g. (-1, 1, 1)'
  if any(n == 0 or n < -1 for n in v) or list(v).count(-1) > 1:
    return 'entries must be >= 1, with at most one -1 (all remaining devices)'
  return None


def _logical_axis_rules(v):
  if not isinstance(v, (tuple, list)):
    return 'must be a sequence of (logical axis, mesh axes) pairs'
  for rule in v:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      return f'rule {rule!r} must be a (logical axis, mesh axes) pair'
    logical, mesh_axes = rule
    if logical not in LOGICAL_AXES:
      return f'rule {tuple(rule)!r} names unknown logical axis {logical!r}; known: {", ".join(LOGICAL_AXES)}'
    names = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
    for name in names:
      if name is not None and name not in MESH_AXES:
        return f'rule {tuple(rule)!r} names unknown mesh axis {name!r}; mesh axes: {", ".join(MESH_AXES)}'
  return None


CHECKS: dict[str, Check] = {
    'seed': _int(0, 2**31 - 1),
    'model.kind': _choice('decoder', 'encoder_decoder'),
    'model.num_encoder_layers': _int(0),
    'model.vocab_size': _int(1),
    'model.max_len': _int(1),
    'model.num_layers': _int(1),
    'model.num_heads': _int(1),
    'model.d_model': _int(1),
    'model.mlp_dim': _int(0),
    'model.mlp_multiple_of': _int(1),
    'model.init_std': _float(0, lo_open=True),
    'model.init': _choice('gpt2', 'normal'),
    'model.use_bias': _bool,
    'model.num_kv_heads': _int(0),
    'model.positions': _choice('learned', 'rope', 'none'),
    'model.rope_base': _float(1, lo_open=True),
    'model.norm': _choice('layernorm', 'rmsnorm'),
    'model.norm_position': _choice('pre', 'post'),
    'model.qk_norm': _bool,
    'model.sliding_window': _int(0),
    'model.embed_multiplier': _float(0, lo_open=True),
    'model.mlp': _choice('gelu', 'relu', 'swiglu'),
    'model.embed_dropout': _float(0, 1, hi_open=True),
    'model.attention_dropout': _float(0, 1, hi_open=True),
    'model.residual_dropout': _float(0, 1, hi_open=True),
    'model.moe_experts': _int(0),
    'model.moe_top_k': _int(1),
    'model.moe_every': _int(1),
    'model.moe_capacity_factor': _float(0),
    'model.tie_embeddings': _bool,
    'model.dtype': _choice('float32', 'bfloat16'),
    'model.attention_impl': _choice('auto', 'xla', 'cudnn'),
    'model.remat': _choice('none', 'full', 'dots'),
    'model.scan_layers': _bool,
    'data.name': _str(nonempty=True),
    'data.paths': _str(),
    'data.tfds_data_dir': _str(),
    'data.train_split': _str(nonempty=True),
    'data.eval_split': _str(nonempty=True),
    'data.text_key': _str(nonempty=True),
    'data.tokenizer': _choice('sentencepiece', 'byte', 'huggingface'),
    'data.tokenizer_train_bytes': _int(1),
    'data.objective': _choice('lm', 'span_corruption', 'seq2seq'),
    'data.seq_len': _int(1),
    'data.target_len': _int(1),
    'data.input_key': _str(nonempty=True),
    'data.target_key': _str(nonempty=True),
    'data.noise_density': _float(0, 1, lo_open=True, hi_open=True),
    'data.mean_span_length': _float(1),
    'data.batch_size': _int(1),
    'data.shuffle_window': _int(0),
    'data.val_fraction': _float(0, 0.5, lo_open=True),
    'optimizer.learning_rate': _float(0, lo_open=True),
    'optimizer.warmup_steps': _int(0),
    'optimizer.min_lr_ratio': _float(0, 1),
    'optimizer.b1': _float(0, 1, hi_open=True),
    'optimizer.b2': _float(0, 1, hi_open=True),
    'optimizer.eps': _float(0, lo_open=True),
    'optimizer.weight_decay': _float(0),
    'optimizer.grad_clip_norm': _float(0),
    'train.steps': _int(1),
    'train.log_every': _int(1),
    'train.microbatches': _int(1),
    'train.logits_chunk': _int(0),
    'train.max_nonfinite_steps': _int(0),
    'train.z_loss': _float(0),
    'train.label_smoothing': _float(0, 1, hi_open=True),
    'train.moe_balance_loss': _float(0),
    'train.peak_flops_per_device': _float(0),
    'mesh.shape': _mesh_shape,
    'mesh.logical_axis_rules': _logical_axis_rules,
    'eval.every': _int(1),
    'eval.num_batches': _int(0),
    'eval.final_num_batches': _int(0),
    'eval.batch_size': _int(1),
    'eval.sample_prompt': _str(),
    'eval.sample_tokens': _int(0),
    'eval.num_samples': _int(0),
    'eval.sample_temperature': _float(0, lo_open=True),
    'checkpoint.every': _int(1),
    'checkpoint.every_minutes': _float(0),
    'checkpoint.max_to_keep': _int(1),
    'checkpoint.async_save': _bool,
    'checkpoint.init_from': _str(),
}

BYTE_VOCAB_SIZE = 258  # 256 bytes + pad + document separator; see lm/data/tokenizers.py.
PAD_IDS = {'byte': 256, 'sentencepiece': 0}  # The padding id of each data.tokenizer.
MIN_SENTENCEPIECE_VOCAB = 320  # 256 byte-fallback pieces + specials + room for merges.


def _cross_key_errors(c: ml_collections.ConfigDict) -> list[str]:
  m, d, o = c.model, c.data, c.optimizer
  errors = []
  if m.d_model % m.num_heads:
    errors.append(f'model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}')
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    errors.append(f'model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}')
  if m.positions == 'rope' and m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2:
    errors.append(f"model.positions='rope' needs an even head dimension: model.d_model={m.d_model} / "
                  f'model.num_heads={m.num_heads} = {m.d_model // m.num_heads}')
  if d.seq_len > m.max_len:
    errors.append(f'data.seq_len={d.seq_len} exceeds the position table: must be <= model.max_len={m.max_len}')
  if m.moe_experts and m.moe_top_k > m.moe_experts:
    errors.append(f'model.moe_top_k={m.moe_top_k} must be <= model.moe_experts={m.moe_experts}')
  if m.moe_experts and m.moe_every > m.num_layers:
    errors.append(f'model.moe_every={m.moe_every} leaves no block with experts: must be <= model.num_layers={m.num_layers}')
  if m.moe_experts and m.moe_every > 1 and m.scan_layers:
    errors.append(f'model.moe_every={m.moe_every} mixes MLP and expert blocks, which model.scan_layers=True cannot '
                  'scan: set moe_every=1 or scan_layers=False')
  if m.kind == 'decoder' and d.objective != 'lm':
    errors.append(f"data.objective={d.objective!r} needs model.kind='encoder_decoder' (model.kind='decoder')")
  if m.kind == 'encoder_decoder' and d.tokenizer not in PAD_IDS:
    errors.append(f"model.kind='encoder_decoder' needs data.tokenizer 'sentencepiece' or 'byte' (not {d.tokenizer!r})")
  if m.kind == 'encoder_decoder' and d.objective == 'lm':
    errors.append("model.kind='encoder_decoder' needs data.objective='span_corruption' or 'seq2seq' "
                  "(data.objective='lm')")
  if m.kind == 'decoder' and m.num_encoder_layers:
    errors.append(f"model.num_encoder_layers={m.num_encoder_layers} needs model.kind='encoder_decoder'")
  if m.kind == 'encoder_decoder' and target_len(c) > m.max_len:
    what = ('the span-corruption targets of data.seq_len' if d.objective == 'span_corruption'
            else f'data.target_len={d.target_len}')
    errors.append(f'{what} need {target_len(c)} decoder positions: must be <= model.max_len={m.max_len}')
  if o.warmup_steps >= c.train.steps:
    errors.append(f'optimizer.warmup_steps={o.warmup_steps} must be < train.steps={c.train.steps}')
  if c.data.batch_size % c.train.microbatches:
    errors.append(f'data.batch_size={d.batch_size} must be divisible by train.microbatches={c.train.microbatches}')
  if d.name in ('text_files', 'text_pairs') and not d.paths.strip():
    errors.append(f'data.paths must name at least one file when data.name={d.name!r}')
  if d.name not in ('text_files', 'text_pairs') and d.paths:
    errors.append(f"data.paths is only read when data.name is 'text_files' or 'text_pairs' (data.name={d.name!r})")
  if d.name == 'text_pairs' and d.objective != 'seq2seq':
    errors.append(f"data.name='text_pairs' holds (input, target) pairs: needs data.objective='seq2seq' "
                  f'(data.objective={d.objective!r})')
  reserved = reserved_ids(c)
  sentinels = f' + {reserved} span-corruption sentinels' if reserved else ''
  if d.tokenizer == 'byte' and m.vocab_size < BYTE_VOCAB_SIZE + reserved:
    errors.append(f"model.vocab_size={m.vocab_size} must be >= {BYTE_VOCAB_SIZE}{sentinels} with data.tokenizer='byte'")
  if d.tokenizer == 'sentencepiece' and m.vocab_size < MIN_SENTENCEPIECE_VOCAB + reserved:
    errors.append(f"model.vocab_size={m.vocab_size} must be >= {MIN_SENTENCEPIECE_VOCAB}{sentinels} "
                  "with data.tokenizer='sentencepiece'")
  return errors


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'model.d_model': 256, ...} for every leaf of the config."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def unknown_key_message(key: str) -> str:
  nearest = difflib.get_close_matches(key, list(CHECKS), n=3, cutoff=0.5)
  if not nearest:  # Fall back to the keys of the same group.
    group = key.split('.')[0] + '.'
    nearest = [k for k in CHECKS if k.startswith(group)][:6]
  hint = f'; nearest valid keys: {", ".join(nearest)}' if nearest else ''
  return f'unknown config key {key!r}{hint}'


def load_module(path: str | pathlib.Path):
  """The experiment file at path, imported as a module (get_config, and get_sweep if it sweeps)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f'no such experiment file {str(path)!r}')
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str | pathlib.Path) -> tuple[str, str | None]:
  """'path:arg' -> (path, arg); a bare path -> (path, None), as --config=path[:arg] reads it."""
  path, colon, arg = str(spec).partition(':')
  return path, arg if colon else None


def load_experiment(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
  """get_config() of an experiment file, or get_config(arg) for 'path:arg', as --config=spec gives it."""
  path, arg = split_spec(spec)
  module = load_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def override(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of config with {'group.key': value} set, as --config.group.key=value would."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in values.items():
    if key not in CHECKS:
      raise ConfigError(unknown_key_message(key))
    problem = CHECKS[key](value)
    if problem:
      raise ConfigError(f'{key}={value!r}: {problem}')
    *groups, leaf = key.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[leaf] = value
  return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key and cross-key rule; returns the config locked against new keys."""
  flat = flatten(config)
  for key in flat:
    if key not in CHECKS:
      raise ConfigError(unknown_key_message(key))
  for key, check in CHECKS.items():
    if key not in flat:
      raise ConfigError(f'missing config key {key!r}: start experiment configs from lm.config.base_config()')
    problem = check(flat[key])
    if problem:
      raise ConfigError(f'{key}={flat[key]!r}: {problem}')
  errors = _cross_key_errors(config)
  if errors:
    raise ConfigError(errors[0])
  config.lock()
  return config
