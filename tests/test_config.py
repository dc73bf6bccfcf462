import os
import subprocess
import sys

import jax
import pytest

from conftest import QUICKSTART, ROOT
from lm import config as config_lib
from lm.config import ConfigError
from lm.training import train


def _quickstart(**values):
  return config_lib.override(config_lib.load_experiment(QUICKSTART), values)


def test_quickstart_is_valid_and_every_key_has_a_check():
  config = config_lib.validate(_quickstart())
  assert set(config_lib.flatten(config)) == set(config_lib.KEYS)


@pytest.mark.parametrize('values, message', [
    ({'model.num_layers': 0}, 'model.num_layers=0: must be >= 1'),
    ({'model.num_layers': 2.5}, 'model.num_layers=2.5: must be an integer'),
    ({'model.init_std': 0.0}, 'model.init_std=0.0: must be > 0'),
    ({'model.d_model': 100, 'model.num_heads': 3}, 'model.d_model=100 must be divisible by model.num_heads=3'),
    ({'model.num_kv_heads': 3}, 'model.num_kv_heads=3 must divide model.num_heads=2'),
    ({'model.positions': 'rope', 'model.d_model': 98}, "model.positions='rope' needs an even head dimension: "
                                                       'model.d_model=98 / model.num_heads=2 = 49'),
    ({'model.mlp': 'silu'}, "model.mlp='silu': must be one of 'gelu', 'relu', 'swiglu'"),
    ({'data.seq_len': 300}, 'data.seq_len=300 exceeds the position table: must be <= model.max_len=256'),
    ({'data.tokenizer': 'wordpiece'}, "data.tokenizer='wordpiece': must be one of 'sentencepiece', 'byte'"),
    ({'data.tokenizer': 'byte', 'model.vocab_size': 200},
     "model.vocab_size=200 must be >= 258 with data.tokenizer='byte'"),
    ({'model.vocab_size': 100}, "model.vocab_size=100 must be >= 320 with data.tokenizer='sentencepiece'"),
    ({'data.name': 'text_files'}, "data.paths must name at least one file when data.name='text_files'"),
    ({'data.paths': 'a.txt'}, "data.paths is only read when data.name is 'text_files', 'text_pairs' or 'tokenized'"),
    ({'data.val_fraction': 0.0}, 'data.val_fraction=0.0: must be > 0'),
    ({'data.batch_size': 0}, 'data.batch_size=0: must be >= 1'),
    ({'optimizer.b2': 1.0}, 'optimizer.b2=1.0: must be < 1'),
    ({'optimizer.eps': 0.0}, 'optimizer.eps=0.0: must be > 0'),
    ({'optimizer.warmup_steps': 2400}, 'optimizer.warmup_steps=2400 must be < train.steps=2400'),
    ({'optimizer.min_lr_ratio': 1.5}, 'optimizer.min_lr_ratio=1.5: must be <= 1'),
    ({'optimizer.learning_rate': float('nan')}, 'optimizer.learning_rate=nan: must be a finite number'),
    ({'eval.sample_temperature': 0.0}, 'eval.sample_temperature=0.0: must be > 0'),
    ({'checkpoint.max_to_keep': 0}, 'checkpoint.max_to_keep=0: must be >= 1'),
    ({'seed': -1}, 'seed=-1: must be >= 0'),
    # Wrong types.
    ({'train.steps': '100'}, "train.steps='100': must be an integer"),
    ({'model.use_bias': 1}, 'model.use_bias=1: must be True or False'),
    ({'optimizer.learning_rate': '3e-4'}, "optimizer.learning_rate='3e-4': must be a finite number"),
    ({'mesh.shape': (8, 1)},
     'mesh.shape=(8, 1): must be 5 integers, devices along (data, fsdp, context, expert, tensor)'),
    ({'data.paths': 7}, 'data.paths=7: must be a string'),
    # Unknown keys.
    ({'model.dmodel': 64}, "unknown config key 'model.dmodel'; nearest valid keys: model.d_model"),
    ({'trainer.steps': 10}, "unknown config key 'trainer.steps'; nearest valid keys: train.steps"),
    # Out of range.
    ({'model.attention_dropout': 1.0}, 'model.attention_dropout=1.0: must be < 1'),
    ({'train.label_smoothing': 1.0}, 'train.label_smoothing=1.0: must be < 1'),
    ({'checkpoint.every_minutes': -1.0}, 'checkpoint.every_minutes=-1.0: must be >= 0'),
    ({'train.max_nonfinite_steps': -1}, 'train.max_nonfinite_steps=-1: must be >= 0'),
    ({'model.dtype': 'float16'}, "model.dtype='float16': must be one of 'float32', 'bfloat16'"),
    ({'mesh.shape': (-1, -1, 1)}, 'mesh.shape=(-1, -1, 1): entries must be >= 1, with at most one -1'),
    ({'mesh.shape': 'fsdp=-1,stage=2'}, "mesh.shape='fsdp=-1,stage=2': unknown mesh axis 'stage'; mesh axes: "
                                        'data, fsdp, context, expert, tensor'),
    ({'mesh.shape': 'data=-1,fsdp=-1'}, "mesh.shape='data=-1,fsdp=-1': entries must be >= 1, with at most one -1"),
    ({'mesh.shape': 'fsdp=2,fsdp=4'}, "mesh.shape='fsdp=2,fsdp=4': mesh axis 'fsdp' is named twice"),
    ({'mesh.shape': 'fsdp'}, "mesh.shape='fsdp': must name its axes (NAME=SIZE) or give sizes as integers"),
    # Keys that contradict each other, across model, data, optimizer and training.
    ({'model.kind': 'encoder_decoder'}, "model.kind='encoder_decoder' needs data.objective='span_corruption' or "
                                        "'seq2seq' (data.objective='lm')"),
    ({'data.objective': 'seq2seq'}, "data.objective='seq2seq' needs model.kind='encoder_decoder'"),
    ({'model.moe_experts': 2, 'model.moe_top_k': 3}, 'model.moe_top_k=3 must be <= model.moe_experts=2'),
    ({'model.moe_experts': 6, 'model.moe_groups': 4}, 'model.moe_groups=4 must divide model.moe_experts=6'),
    ({'model.moe_experts': 4, 'model.moe_first_dense': 4}, 'model.moe_first_dense=4 leaves no block with experts: '
                                                           'must be < model.num_layers=4'),
    ({'model.moe_experts': 4, 'model.moe_bias_rate': 0.001},
     'model.moe_bias_rate=0.001 needs model.moe_experts > 0 and model.moe_router_bias=True'),
    ({'model.moe_experts': 8, 'model.moe_groups': 4, 'model.moe_top_groups': 5},
     'model.moe_top_groups=5 must be <= model.moe_groups=4'),
    ({'model.moe_experts': 8, 'model.moe_groups': 4, 'model.moe_top_k': 3},
     'model.moe_top_k=3 must be <= the 2 experts in model.moe_top_groups=1 groups of 2'),
    ({'model.moe_experts': 4, 'model.moe_every': 2, 'model.scan_layers': True},
     'model.moe_every=2 mixes MLP and expert blocks, which model.scan_layers=True cannot scan'),
    ({'train.microbatches': 3}, 'data.batch_size=8 must be divisible by train.microbatches=3'),
    ({'data.name': 'text_pairs', 'data.paths': 'pairs.tsv'}, "data.name='text_pairs' holds (input, target) pairs: "
                                                             "needs data.objective='seq2seq'"),
    ({'model.num_encoder_layers': 2}, "model.num_encoder_layers=2 needs model.kind='encoder_decoder'"),
    # ... and against the devices (eight here), checked before anything compiles.
    ({'mesh.shape': (3, 1, 1)}, 'mesh.shape=(3, 1, 1) uses 3 devices but there are 8'),
    ({'data.batch_size': 12}, 'data.batch_size=12 must be divisible by the 8 batch shards'),
    ({'eval.batch_size': 4}, 'eval.batch_size=4 must be divisible by the 8 batch shards'),
    ({'mesh.shape': (1, 1, 8), 'data.batch_size': 1, 'eval.batch_size': 1},
     "model.num_heads=2 does not split over mesh tensor=8 (mesh.logical_axis_rules shard 'kv_heads' there"),
    ({'mesh.shape': (1, 8, 1), 'model.d_model': 100},
     "model.d_model=100 does not split over mesh fsdp=8 (mesh.logical_axis_rules shard 'embed' there"),
    ({'model.attention_impl': 'cudnn'}, "model.attention_impl='cudnn' needs a GPU (this backend: cpu)"),
])
def test_bad_values_are_refused_naming_the_key(values, message):
  values = {'data.batch_size': 8} | values  # Rows for the 8 devices (the quickstart itself has 4).
  with pytest.raises(ConfigError) as error:  # Checked as lm.main does, in this order, before any compile.
    train.make_layout(config_lib.validate(_quickstart(**values)), jax.devices())
  assert str(error.value) == message or str(error.value).startswith(message), str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('shape, sizes', [
    ((1, -1, 2), (1, 4, 1, 1, 2)), ((1, -1, 1, 2), (1, 4, 1, 1, 2)), ('1,-1,1,2', (1, 4, 1, 1, 2)),
    ('fsdp=-1,tensor=2', (1, 4, 1, 1, 2)), ('tensor=2, fsdp=-1', (1, 4, 1, 1, 2)),
    ('tensor=2,fsdp=4', (1, 4, 1, 1, 2)), ('data=2,fsdp=-1,context=2', (2, 2, 2, 1, 1)), ('data=-1', (8, 1, 1, 1, 1)),
    ('expert=4,fsdp=2', (1, 2, 1, 4, 1)), ((1, 2, 1, -1, 1), (1, 2, 1, 4, 1)),
])
def test_mesh_shape_takes_sizes_in_order_or_names_in_any_order(shape, sizes):
  """The mesh's devices are laid out in the declared axis order whichever form names them."""
  layout = train.make_layout(config_lib.validate(_quickstart(**{'mesh.shape': shape, 'data.batch_size': 8})),
                             jax.devices())
  assert tuple(layout.mesh.shape.values()) == sizes and tuple(layout.mesh.shape) == config_lib.MESH_AXES
  reference = train.make_layout(config_lib.validate(_quickstart(**{'mesh.shape': sizes, 'data.batch_size': 8})),
                                jax.devices())
  assert (layout.mesh.devices == reference.mesh.devices).all()
  assert config_lib.named_mesh(sizes) == ','.join(f'{a}={n}' for a, n in zip(config_lib.MESH_AXES, sizes) if n > 1)


def test_two_forms_of_mesh_shape_are_the_same_when_their_sizes_are():
  assert config_lib.same_mesh([-1, 1, 1], 'data=8') and config_lib.same_mesh('fsdp=-1,tensor=2', (1, 4, 1, 2))
  assert config_lib.same_mesh((1, 1, 1), 'data=1') and config_lib.same_mesh('fsdp=-1', (1, -1, 1))
  assert not config_lib.same_mesh('fsdp=8', (-1, 1, 1)) and not config_lib.same_mesh('data=2,fsdp=4', 'fsdp=8')
  assert not config_lib.same_mesh((2, 2, 1), 'data=8')


def test_default_logical_rules_come_from_the_declared_mesh_axes():
  rules = dict(config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  assert rules['batch'] == ('data', 'fsdp', 'expert') and rules['embed'] == 'fsdp' and rules['length'] == 'context'
  assert all(rules[n] == 'tensor' for n in ('vocab', 'heads', 'kv_heads', 'mlp'))
  assert rules['expert'] == 'expert' and set(rules) == set(config_lib.LOGICAL_AXES)


def test_unknown_keys_name_the_nearest_valid_ones():
  with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learning_rat'; nearest valid keys: "
                                        r'optimizer.learning_rate'):
    _quickstart(**{'optimizer.learning_rat': 1.0})
  config = _quickstart()
  config.train.unlock()
  config.train.epochs = 3  # An experiment file that adds a key.
  with pytest.raises(ConfigError, match="unknown config key 'train.epochs'"):
    config_lib.validate(config)


def test_a_broken_experiment_file_is_refused_naming_its_line(tmp_path):
  """lm.main's one line names the file and the line of it where the error was raised, whichever way
  config_flags hands the error on (as raised; a ValueError re-raised as a new one; an OSError kept)."""
  bodies = {
      'def helper():\n  return 1 / 0\n\n\ndef get_config():\n  return helper()\n':
          'line 2 in helper: ZeroDivisionError: division by zero',
      'def get_config():\n  raise ValueError("bad preset name")\n': 'line 2 in get_config: ValueError: bad preset name',
      'def get_config():\n  return open("/nonexistent/x").read()\n':
          "line 2 in get_config: FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/x'",
      'import ml_collections\nSIZES = {}["xl"]\n': "line 2: KeyError: 'xl'",
      'def get_config(:\n': 'line 1: SyntaxError: invalid syntax',
  }
  for i, (body, where) in enumerate(bodies.items()):
    path = tmp_path / f'x{i}.py'
    path.write_text(body)
    done = subprocess.run([sys.executable, '-m', 'lm.main', f'--config={path}', f'--workdir={tmp_path / "run"}'],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stderr, done.stdout) == (1, f'error: --config: {path} {where}\n', ''), body
  assert not (tmp_path / 'run').exists()
