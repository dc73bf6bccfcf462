"""The config schema: every key declared once, and what is derived from the declarations."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from conftest import QUICKSTART, ROOT
from lm import config as config_lib
from lm import kinds
from lm.config import ConfigError, schema
from lm.training import workdirs


def test_every_key_has_a_default_check_doc_and_resume_rule():
  assert len(config_lib.KEYS) > 80
  for name, k in config_lib.KEYS.items():
    assert k.name == name
    assert k.check.problem(k.default) is None, name  # The default passes its own check ...
    assert k.check.allowed and k.doc.strip() and k.resume in schema.RESUME_RULES, name
  flat = config_lib.flatten(config_lib.base_config())
  assert set(flat) == set(config_lib.KEYS)  # ... and base_config() holds exactly the declared keys.
  assert all(flat[name] == k.default for name, k in config_lib.KEYS.items())


def test_a_field_not_declared_with_key_is_refused():
  @dataclasses.dataclass(frozen=True)
  class Broken:
    fine: int = schema.key(1, schema.integer(0), schema.FREE, 'A declared key.')
    bare: int = 3

  with pytest.raises(TypeError, match='Broken.bare must be declared'):
    schema.keys_of(Broken, 'broken')
  with pytest.raises(ValueError, match='resume rule'):
    schema.key(1, schema.integer(0), 'sometimes', 'doc')


def test_checks_say_what_is_allowed():
  assert schema.integer(1).allowed == 'integer >= 1'
  assert schema.number(0, 1, hi_open=True).allowed == 'number >= 0, < 1'
  assert schema.integer(0, 5).problem(6) == 'must be <= 5'
  assert schema.number(0, lo_open=True).problem(0.0) == 'must be > 0'
  assert schema.choice('a', 'b').problem('c') == "must be one of 'a', 'b'"
  assert schema.BOOLEAN.problem(1) == 'must be True or False'


def test_sections_come_back_typed():
  config = config_lib.load_experiment(QUICKSTART)
  model = config_lib.section(config, 'model')
  assert (model.d_model, model.num_layers) == (config.model.d_model, config.model.num_layers)
  assert config_lib.section(config, '').seed == config.seed
  with pytest.raises(dataclasses.FrozenInstanceError):
    model.d_model = 1


def test_keys_command_prints_every_key():
  out = subprocess.run([sys.executable, '-m', 'lm.config', '--keys'], capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout
  assert [line.split(' = ')[0] for line in out.splitlines() if not line.startswith(' ')] == list(config_lib.KEYS)
  assert "model.mlp = 'gelu'\n    allowed: 'gelu', 'relu', 'swiglu'; on resume: must match, also for init_from" in out


def _workdir(tmp_path: pathlib.Path, saved: dict) -> pathlib.Path:
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  return tmp_path


def _flat_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config_lib.flatten(config)))


def test_resume_rule_comes_from_each_keys_declaration(tmp_path):
  config = config_lib.validate(config_lib.load_experiment(QUICKSTART))
  saved = _flat_json(config) | {'data.eval_split': 'test', 'optimizer.learning_rate': 0.5, 'model.dtype': 'bfloat16'}
  changed = workdirs.check_workdir(_workdir(tmp_path / 'a', saved), config)
  assert set(changed) == {'data.eval_split', 'optimizer.learning_rate', 'model.dtype'}
  for name, value in [('data.seq_len', 64), ('seed', 3), ('model.sliding_window', 8)]:
    assert config_lib.must_match(name)
    with pytest.raises(ConfigError, match=f'{re.escape(name)} is {value!r} there'):
      workdirs.check_workdir(_workdir(tmp_path / name, _flat_json(config) | {name: value}), config)
  # For init_from, only what shapes the parameters (and the tokenizer) must match.
  assert config_lib.must_match('model.d_model', init_from=True) and config_lib.must_match('data.tokenizer', True)
  assert not config_lib.must_match('model.sliding_window', True) and not config_lib.must_match('data.seq_len', True)


def test_a_key_the_saved_config_predates_counts_as_its_default(tmp_path):
  config = config_lib.validate(config_lib.load_experiment(QUICKSTART))
  saved = _flat_json(config)
  del saved['model.qk_norm'], saved['train.max_nonfinite_steps']  # As if both were added after the run.
  assert workdirs.check_workdir(_workdir(tmp_path / 'old', saved), config) == {}
  config = config_lib.override(config, {'model.qk_norm': True})
  with pytest.raises(ConfigError, match="model.qk_norm is False there, True here"):
    workdirs.check_workdir(_workdir(tmp_path / 'old2', saved), config)


def test_every_model_kind_the_config_allows_has_a_seam():
  allowed = {c.strip("'") for c in config_lib.KEYS['model.kind'].check.allowed.split(', ')}
  assert set(kinds.KINDS) == allowed
  assert set(kinds.hf_families()) == {'gpt2', 'llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe'}
  assert all(f in kinds.KINDS['decoder'].hf_families for f in kinds.hf_families().values())
  with pytest.raises(ConfigError,
                     match="model_type='t5' in config.json: only 'mixtral', 'qwen3_moe', 'qwen3', .* checkpoints"):
    kinds.for_hf('t5')
  encoder_decoder = config_lib.override(config_lib.base_config(), {'model.kind': 'encoder_decoder'})
  with pytest.raises(ConfigError, match="model.kind='encoder_decoder' has no Hugging Face conversion"):
    kinds.hf_family_of(encoder_decoder.model)
