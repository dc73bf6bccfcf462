"""Every preset's parameter count from jax.eval_shape (shapes only: nothing is allocated)."""

import importlib.util

import flax.linen as nn
import jax
import pytest

from conftest import ROOT
from lm import config as config_lib
from lm import kinds
from lm.kinds import make_model
from lm.nn.layers import head_width, mlp_width
from lm.nn.model import count_active_params, count_params


def _preset(name: str, arg: str, **overrides):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'experiments' / f'{name}.py')
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  return experiment, config_lib.validate(config_lib.override(experiment.get_config(arg), overrides))


def _count(config) -> int:
  model = make_model(config.model, config.data)
  batch = kinds.of(config.model).example_batch(config.data)
  args = (batch['inputs'],) if 'inputs' in batch else ()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, batch['tokens'][:, :-1]))
  return count_params(shapes['params'])


@pytest.mark.parametrize('size', ['small', 'medium', 'large', 'xl'])
def test_gpt2_presets_have_the_published_parameter_counts(size):
  experiment, config = _preset('gpt2', size)
  assert _count(config) == experiment.PUBLISHED_PARAMS[size]


def _llama_count(m) -> int:
  """Embedding (+ an untied output), per block four attention matrices (query and output heads x
  head_dim wide, key and value kv_heads x head_dim), qk-norm scales if any, three SwiGLU matrices
  and two RMSNorm scales, and the final norm."""
  head = head_width(m)
  attention = 2 * m.d_model * m.num_heads * head + 2 * m.d_model * head * m.num_kv_heads + 2 * head * m.qk_norm
  block = attention + 3 * m.d_model * mlp_width(m) + 2 * m.d_model
  return (1 if m.tie_embeddings else 2) * m.vocab_size * m.d_model + m.num_layers * block + m.d_model


@pytest.mark.parametrize('name,size', [('llama', s) for s in ('tiny', '125m', '1b', '7b', '8b', '3.2-1b', '3.2-3b')]
                         + [('qwen3', s) for s in ('tiny', '0.6b', '8b')] + [('mistral', s) for s in ('tiny', '7b')])
def test_llama_family_presets_count_what_the_recipe_says(name, size):
  experiment, config = _preset(name, size)
  count = _count(config)
  assert count == _llama_count(config.model)
  if size in experiment.PUBLISHED_PARAMS:
    assert count == experiment.PUBLISHED_PARAMS[size]
  assert kinds.hf_family_of(config.model).model_type == name  # lm.hf exports it in its family's format.


def test_llama_7b_mlp_follows_the_two_thirds_rule():
  _, config = _preset('llama', '7b')
  assert config.model.mlp_dim == 0 and mlp_width(config.model) == 11008  # 2/3 * 4 * 4096 = 10922.7, up to 256s.


def test_gpt2_tensor_layout_pads_the_vocabulary():
  _, config = _preset('gpt2', 'small,fsdp_tensor')
  assert config.model.vocab_size % 128 == 0 and _count(config) == 124_439_808 + 47 * 768


def test_t5_presets_share_one_model():
  _, span = _preset('t5', 'span')
  _, seq2seq = _preset('t5', 'seq2seq', **{'data.paths': __file__})  # Pairs files are the user's to name.
  assert span.model.to_dict() == seq2seq.model.to_dict()  # So a span run's checkpoint starts a seq2seq run.


@pytest.mark.parametrize('size', ['30b-a3b', '235b-a22b'])
def test_qwen3_moe_presets_count_what_transformers_counts(size):
  """The mixtures' totals equal transformers' count for the config.json lm would export (built on the
  meta device: nothing allocated); active parameters count top_k of the experts."""
  torch, transformers = pytest.importorskip('torch'), pytest.importorskip('transformers')
  experiment, config = _preset('qwen3', size)
  m = config.model
  model = make_model(m, config.data)
  batch = kinds.of(m).example_batch(config.data)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch['tokens'][:, :-1]))['params'])
  family = kinds.hf_family_of(m)
  assert family.model_type == 'qwen3_moe'
  with torch.device('meta'):
    theirs = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**family.hf_config(m, None, None)))
  assert count_params(params) == sum(p.numel() for p in theirs.parameters()) == experiment.PUBLISHED_PARAMS[size]
  idle_experts = m.num_layers * (m.moe_experts - m.moe_top_k) * 3 * m.d_model * m.moe_mlp_dim
  assert count_active_params(params, m) == count_params(params) - idle_experts
