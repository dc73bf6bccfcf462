"""lm.plan: the capacity report, compiled for meshes of 8 simulated devices."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from conftest import QUICKSTART, ROOT
from lm import config as config_lib
from lm import plan


def _config(**values):
  """The quickstart with AdamW (whose two moments the memory checks count; Muon's orthogonalisation is
  optimizer work, not model FLOPs), at 8 rows of 128 tokens (rows for 8 devices; one attention block,
  whose L x L FLOPs the formula counts whole)."""
  values = {'optimizer.name': 'adamw', 'data.batch_size': 8, 'data.seq_len': 128} | values
  return config_lib.validate(config_lib.override(config_lib.load_experiment(QUICKSTART), values))


def test_flops_per_token_agrees_with_xla():
  figures = plan.report(_config(**{'mesh.shape': (1, 1, 1)}), jax.devices()[:1])
  # XLA also counts the elementwise work (softmax, SwiGLU, LayerNorm, RoPE, Adam): a few percent more.
  ratio = figures['xla_flops_per_step_per_device'] / figures['flops_per_step_per_device']
  assert 1.0 <= ratio < 1.1, ratio
  assert figures['parameters'] == 1_564_608  # The quickstart's, as lm.main prints it.


def test_encoder_decoder_flops_agree_with_xla():
  config = config_lib.load_experiment(ROOT / 'experiments' / 't5.py')
  config = config_lib.validate(config_lib.override(config, {'mesh.shape': (1, 1, 1), 'data.batch_size': 4,
                                                            'data.seq_len': 64, 'model.residual_dropout': 0.0}))
  figures = plan.report(config, jax.devices()[:1])
  ratio = figures['xla_flops_per_step_per_device'] / figures['flops_per_step_per_device']
  assert 1.0 <= ratio < 1.1, ratio


@pytest.mark.slow
def test_fsdp_splits_parameters_and_optimizer_state():
  dp = plan.report(_config(**{'mesh.shape': (8, 1, 1)}), jax.devices())
  fsdp = plan.report(_config(**{'mesh.shape': (1, 8, 1)}), jax.devices())
  assert dp['params_bytes'] == 4 * dp['parameters']  # Replicated float32.
  assert dp['params_bytes'] / 8 <= fsdp['params_bytes'] < dp['params_bytes'] / 7  # Only small biases stay whole.
  for f in (dp, fsdp):
    assert 2 * f['params_bytes'] <= f['optimizer_bytes'] < 2 * f['params_bytes'] + 64  # Adam's mu and nu.
    assert f['alias_bytes'] >= f['params_bytes'] + f['optimizer_bytes']  # The state is donated.


@pytest.mark.slow
def test_a_plan_over_an_expert_axis_counts_active_parameters_and_the_exchange_buffers():
  experts = {'model.moe_experts': 8, 'model.moe_top_k': 2, 'model.moe_impl': 'dropless', 'model.moe_capacity_factor': 0}
  figures = plan.report(_config(**experts, **{'mesh.shape': 'expert=8'}), jax.devices())
  m = _config(**experts).model
  per_expert = 3 * m.d_model * m.mlp_dim + (2 * m.mlp_dim + m.d_model) * m.use_bias  # SwiGLU's gate, up, down
  assert figures['parameters'] - figures['active_parameters'] == m.num_layers * (8 - 2) * per_expert
  # 8 x 128 tokens over 8 devices: 128 each, sending at most one pair per token to each of 8 shards (one
  # expert each), there and back: 4 buffers of 8 x 128 rows of d_model float32s.
  assert figures['expert_exchange_bytes'] == 4 * 8 * 128 * m.d_model * 4
  assert figures['temp_bytes'] > figures['expert_exchange_bytes']  # Within the temporaries.


def _plan(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, '-m', 'lm.plan', f'--config={QUICKSTART}', *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_plan_command_reports_a_simulated_mesh():
  result = _plan('--devices=8', '--config.mesh.shape=fsdp=4,data=2', '--config.data.batch_size=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'mesh: data=2,fsdp=4 on 8 cpu devices' in result.stdout
  assert 'total' in result.stdout and 'FLOPs per token' in result.stdout


@pytest.mark.parametrize('args, message', [
    (('--devices=8', '--config.mesh.shape=(3,1,1)'), 'error: mesh.shape=(3, 1, 1) uses 3 devices but there are 8'),
    (('--devices=8', '--config.mesh.shape=(1,1,8)'), 'error: model.num_heads=2 does not split over mesh tensor=8'),
    (('--devices=8', "--config.mesh.logical_axis_rules=(('batch','pipe'),)"), "names unknown mesh axis 'pipe'"),
])
def test_plan_refuses_bad_meshes_in_one_line(args, message):
  result = _plan(*args)
  assert result.returncode != 0
  assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr[-3000:]


def test_a_plan_that_does_not_fit_is_one_line(monkeypatch):
  # XLA's message when a TPU compile runs out of HBM (as lm.plan --topology=v5e:2x2 got for Llama 1B at 8K).
  error = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
                       'temporaries (145.96G) exceeds available HBM (15.75G).')
  assert str(plan._out_of_memory(error, 'v5e:2x2', 4.11 * plan.GIB, 8.23 * plan.GIB)) == (
      'does not fit on v5e:2x2: 145.96 GiB of temporaries per chip (15.75 GiB of HBM); parameters 4.11 GiB + '
      'optimizer state 8.23 GiB per chip')
  assert plan._out_of_memory(RuntimeError('INTERNAL: something else'), 'v5e:2x2', 0, 0) is None
  # Simulated devices share the host's memory: a host of 1 MiB holds no 8-device plan.
  sysconf = {'SC_PAGE_SIZE': 4096, 'SC_PHYS_PAGES': 256}
  monkeypatch.setattr(plan.os, 'sysconf', lambda name: sysconf[name])
  message = r"does not fit in this host's memory: .* x 8 devices = .* \(0.00 GiB of RAM"
  with pytest.raises(plan.DoesNotFit, match=message):
    plan.report(_config(**{'mesh.shape': (8, 1, 1)}), jax.devices())
