"""What a model kind provides: the one object each kind registers in lm.kinds (see __init__.py)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from lm.config import ConfigError
from lm.nn.layers import expert_width, head_width, mlp_width
from lm.nn.model import is_moe_layer


class Kind:
  """A kind of model (model.kind): how it is built, what a batch of it holds, its FLOPs, how it
  decodes with a KV cache, and its Hugging Face families (none where it has none)."""
  name: str = ''
  # A text prompt is the encoder's input (the decoder starts afresh), not the start of the output; such
  # kinds are not served by python -m lm.generate and lm.evaluate, which read text as one sequence.
  prompt_is_input: bool = False

  # `m` is a config's model section, `d` its data section.
  def build(self, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> nn.Module:
    raise NotImplementedError

  def example_batch(self, d: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zeros shaped like a batch of that data (see lm/data/pipeline.py)."""
    raise NotImplementedError

  def target_positions(self, d: ml_collections.ConfigDict) -> int:
    """Positions per example whose next token the loss predicts."""
    raise NotImplementedError

  def tokens_per_example(self, d: ml_collections.ConfigDict) -> int:
    """Tokens one row of a training batch holds (what tokens per second counts)."""
    raise NotImplementedError

  def flops_per_example(self, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one row (see lm.training.metrics.flops_per_example)."""
    raise NotImplementedError

  def decoding_context(self, model: nn.Module, params, inputs_NS: jax.Array | None) -> Any:
    """What every decoding step reads besides the cache: nothing for a decoder."""
    return None

  def decode_step(self, model: nn.Module, params, cache, tokens_NL: jax.Array, positions_NL: jax.Array,
                  valid_NL: jax.Array, context) -> tuple[jax.Array, Any]:
    """(logits [N, L, V], the updated cache) of tokens_NL continuing the cached ones."""
    raise NotImplementedError

  def init_cache(self, model: nn.Module, batch_size: int, length: int | None = None, context=None) -> dict:
    """An empty KV cache for batch_size sequences of up to `length` tokens (default: max_len)."""
    raise NotImplementedError

  def sample_request(self, prompt_ids: np.ndarray, text_ids: np.ndarray, bos_id: int, pad_id: int,
                     d: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray | None]:
    """(the decoder's prompt, the encoder's input or None) of the samples training draws from a text:
    its prompt ids (see lm.data.tokenizers.prompt_ids), or a start token alone when it has none."""
    return (prompt_ids if len(prompt_ids) else np.array([bos_id], np.int32)), None

  def sample_text(self, prompt: str, row: np.ndarray, tokenizer) -> str:
    """A sample as shown: the text, then what the model made of it (row: the new token ids)."""
    return prompt + tokenizer.decode(row)

  # Hugging Face families this kind converts to and from (python -m lm.hf), most specific first: export
  # writes a config in the first one that expresses it.
  hf_families: tuple['HfFamily', ...] = ()


class HfFamily:
  """One transformers model_type: its config.json and weight names in and out of an lm config and
  parameters. `get(name, shape)` reads one tensor of the checkpoint (as float32), so import streams."""
  model_type: str = ''
  architecture: str = ''  # config.json's architectures entry, e.g. 'LlamaForCausalLM'.

  def config_from_hf(self, hf: dict[str, Any]) -> ml_collections.ConfigDict:
    """An lm config whose model is the one config.json describes, or a ConfigError naming the field
    lm cannot represent."""
    raise NotImplementedError

  def problem(self, m: ml_collections.ConfigDict) -> str | None:
    """Why this family cannot express the model section m (one line naming the key), or None."""
    raise NotImplementedError

  def params_from_hf(self, get: Callable[[str, tuple[int, ...]], np.ndarray],
                     m: ml_collections.ConfigDict) -> Iterator[tuple[str, np.ndarray]]:
    """(lm parameter path joined by '/', float32 array) of each parameter, one at a time, so that an
    import holds one tensor on the host at once."""
    raise NotImplementedError

  def params_to_hf(self, params: dict, m: ml_collections.ConfigDict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of each tensor of the transformers state dict, one at a time."""
    raise NotImplementedError

  def hf_config(self, m: ml_collections.ConfigDict, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    raise NotImplementedError

  def check(self, m: ml_collections.ConfigDict) -> None:
    if (problem := self.problem(m)) is not None:
      raise ConfigError(problem)


def hf_value(hf: dict[str, Any], key: str, default: Any = None, allowed: tuple | None = None) -> Any:
  """config.json's `key` (default where absent or null); a ConfigError naming the field if it is not
  one of `allowed`."""
  value = hf.get(key)
  value = default if value is None else value
  if allowed is not None and value not in allowed:
    raise ConfigError(f'{key}={value!r} in config.json is not supported (lm can represent: '
                      f'{", ".join(map(repr, allowed))})')
  return value


def attention_widths(m) -> tuple[int, int]:
  """Weights per token of the query and output projections together, and of the key and value ones."""
  head = head_width(m)
  return 2 * m.d_model * head * m.num_heads, 2 * m.d_model * head * (m.num_kv_heads or m.num_heads)


def self_attention_stack_flops(m, layers: int, length: int) -> float:
  """Training FLOPs of `layers` self-attending blocks over `length` tokens: 6 per weight a token passes
  through (attention projections, MLP or the top_k experts and the router), plus 12 * heads * head_dim
  per (query, key) pair of the whole L x L square."""
  q_out, kv = attention_widths(m)
  per_width = (3 if m.mlp == 'swiglu' else 2) * m.d_model
  dense = per_width * mlp_width(m)  # The top_k and the shared experts, and the router:
  moe = (m.moe_top_k + m.moe_shared_experts) * per_width * expert_width(m) + m.d_model * m.moe_experts
  moe_layers = sum(is_moe_layer(m, i) for i in range(layers))
  mlps = moe_layers * moe + (layers - moe_layers) * dense
  return 6 * length * (layers * (q_out + kv) + mlps) + 12 * layers * m.num_heads * head_width(m) * length**2
