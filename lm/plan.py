"""Capacity report: will this config fit this mesh? Compiles the train step ahead of time, runs nothing.

  python -m lm.plan --config=experiments/gpt2.py:xl,hybrid --devices=256
  python -m lm.plan --config=experiments/gpt2.py:xl,hybrid --topology=v5e:16x16   # pip install 'lm[tpu]'

It plans for the devices present, or for --devices=N simulated CPU devices, or with --topology for
a TPU slice through jax.experimental.topologies (compile-only devices: no TPU needed).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time

from absl import flags
import jax
from jax.experimental import topologies
import numpy as np

from lm import cli, kinds
from lm.config import ConfigError, named_mesh, validate
from lm.nn import expert_parallel
from lm.nn.layers import dtype_of, mlp_width
from lm.nn.model import count_active_params, count_mtp_params, count_params
from lm.parallel import sharding
from lm.training import metrics, train

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.config_flag()
  flags.DEFINE_integer('devices', None, 'Simulate this many CPU devices instead of using the devices present.')
  flags.DEFINE_string('topology', None, "Compile for a TPU slice by name, e.g. 'v5e:16x16', 'v4:4x4x4', "
                      "'v5p:8x8x8' (needs the libtpu wheel: pip install 'lm[tpu]').")


GIB = 2**30


class DoesNotFit(Exception):
  """The compiled train step needs more memory than a device (or this host) has: an answer, said in one line."""


def _out_of_memory(error: Exception, where: str, params_bytes: int, optimizer_bytes: int) -> DoesNotFit | None:
  """XLA's RESOURCE_EXHAUSTED compile error as one line with the figures it gives, else None."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  found = re.search(r'HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)', text)
  state = f'parameters {params_bytes / GIB:.2f} GiB + optimizer state {optimizer_bytes / GIB:.2f} GiB per chip'
  if found:
    return DoesNotFit(f'does not fit on {where}: {float(found.group(1)):.2f} GiB of temporaries per chip '
                      f'({float(found.group(2)):.2f} GiB of HBM); {state}')
  line = next((l.strip() for l in text.splitlines() if 'RESOURCE_EXHAUSTED' in l), text.strip().splitlines()[0])
  return DoesNotFit(f'does not fit on {where}: {line}; {state}')


def _devices(config):
  if FLAGS.topology:
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # No slice to ask: this host alone.
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    try:
      return list(topologies.get_topology_desc(FLAGS.topology, 'tpu').devices)
    except Exception as e:  # No libtpu, or an unknown topology name.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(f'--topology={FLAGS.topology}: {first} (is libtpu installed? pip install \'lm[tpu]\')')
  return jax.devices()


def _shard_bytes(tree) -> int:
  """Bytes of the shards of `tree` (abstract arrays with shardings) on its most loaded device."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def report(config, devices, where: str = '') -> dict[str, float]:
  """Lowers and compiles train_step for config on a mesh over devices; returns the figures, or
  raises DoesNotFit (`where` names the devices in its message)."""
  layout = train.make_layout(config, devices)
  mesh, rules, batch_sharding = layout.mesh, layout.rules, layout.batch_sharding
  state = train.abstract_train_state(layout)
  b = config.data.batch_size
  batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding)
           for k, x in kinds.of(config.model).example_batch(config.data, b).items()}
  batch['loss_mask'] = jax.ShapeDtypeStruct((b, batch['tokens'].shape[1] - 1), np.bool_, sharding=batch_sharding)
  start = time.perf_counter()
  with sharding.activate(mesh, rules):
    lowered = train.jit_train_step(layout, config.train).lower(state, batch)
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises its runtime error; anything but running out of memory goes on up.
    problem = _out_of_memory(e, where or f'{mesh.size} {devices[0].platform} devices', _shard_bytes(state.params),
                             _shard_bytes(state.opt_state))
    if problem is None:
      raise
    raise problem from None
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  per_token = metrics.flops_per_token(config.model, config.data)
  figures = {
      'devices': mesh.size, 'mesh_shape': tuple(mesh.shape.values()), 'mesh': named_mesh(mesh.shape.values()),
      'parameters': count_params(state.params), 'active_parameters': count_active_params(state.params, config.model),
      'mtp_parameters': count_mtp_params(state.params),
      'flops_per_token': per_token, 'compile_seconds': compile_s,
      'flops_per_step_per_device': metrics.flops_per_example(config.model, config.data) * b / mesh.size,
      'params_bytes': _shard_bytes(state.params), 'optimizer_bytes': _shard_bytes(state.opt_state),
      'argument_bytes': memory.argument_size_in_bytes, 'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes, 'temp_bytes': memory.temp_size_in_bytes,
      'code_bytes': memory.generated_code_size_in_bytes,
  }
  with sharding.activate(mesh, rules):
    plan = expert_parallel.plan_of(config.model) if config.model.moe_impl == 'dropless' else None
  if plan is not None and plan.expert_axes and config.model.moe_experts:
    figures['expert_exchange_bytes'] = _exchange_bytes(config, mesh, rules, plan)
  # Donated state is aliased: inputs and outputs share it, so it counts once.
  figures['total_bytes'] = (figures['argument_bytes'] + figures['output_bytes'] - figures['alias_bytes']
                            + figures['temp_bytes'] + figures['code_bytes'])
  if devices[0].platform == 'cpu':  # Simulated devices share this host's memory.
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if figures['total_bytes'] * mesh.size > host:
      raise DoesNotFit(f'does not fit in this host\'s memory: {figures["total_bytes"] / GIB:.2f} GiB per device x '
                       f'{mesh.size} devices = {figures["total_bytes"] * mesh.size / GIB:.2f} GiB ({host / GIB:.2f} '
                       f'GiB of RAM); temporaries {figures["temp_bytes"] / GIB:.2f} GiB per device')
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and 'flops' in cost and not config.model.scan_layers:  # A scanned body is counted once.
    figures['xla_flops_per_step_per_device'] = float(cost['flops'])
  return figures


def _exchange_bytes(config, mesh, rules, plan: expert_parallel.ExpertPlan) -> int:
  """Bytes of one MoE layer's exchange buffers per device: rows sent and received, there and back."""
  m, d = config.model, config.data
  tokens = d.batch_size * d.seq_len // (sharding.batch_shards(mesh, rules) * config.train.microbatches)
  tokens //= math.prod(mesh.shape[a] for a in plan.length_axes)
  rows = plan.shards * expert_parallel.exchange_rows(tokens, m.moe_top_k, m.moe_experts, plan.shards,
                                                     m.moe_ep_capacity_factor)
  return 4 * rows * m.d_model * np.dtype(dtype_of(m)).itemsize


def _print(config, devices, f: dict[str, float]) -> None:
  where = FLAGS.topology or f'{len(devices)} {devices[0].platform} devices'
  m = config.model
  print(f'model: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, mlp {mlp_width(m)}, '
        f'vocab {m.vocab_size}: {f["parameters"] / 1e6:,.1f}M parameters'
        + (f' ({f["active_parameters"] / 1e6:,.1f}M active per token)' if m.moe_experts else '')
        + (f', {f["mtp_parameters"] / 1e6:,.1f}M of them in multi-token modules' if f['mtp_parameters'] else '')
        + f'; dtype {m.dtype}, '
        f'remat {m.remat}, scan_layers {m.scan_layers}, microbatches {config.train.microbatches}')
  print(f'mesh: {f["mesh"]} on {where}; batch {config.data.batch_size} x {config.data.seq_len} tokens')
  print(f'compiled the train step in {f["compile_seconds"]:.1f} s')
  print(f'FLOPs per token: {f["flops_per_token"]:.3e} (6 x weights + attention); '
        f'per step per device: {f["flops_per_step_per_device"]:.3e}')
  if 'xla_flops_per_step_per_device' in f:
    print(f'  XLA cost analysis per step per device: {f["xla_flops_per_step_per_device"]:.3e} '
          f'(ratio {f["xla_flops_per_step_per_device"] / f["flops_per_step_per_device"]:.2f})')
  print('bytes per device (total = arguments + outputs - aliased + temporaries + code):')
  rows = [('parameters (float32)', f['params_bytes']), ('optimizer state', f['optimizer_bytes']),
          ('arguments (state + batch)', f['argument_bytes']), ('outputs', f['output_bytes']),
          ('  of which aliased to (donated) arguments', f['alias_bytes']),
          ('temporaries (activations, gradients, collectives)', f['temp_bytes']), ('code', f['code_bytes']),
          ('total', f['total_bytes'])]
  for name, value in rows:
    print(f'  {name:<52} {value / GIB:10.3f} GiB')
  if 'expert_exchange_bytes' in f:
    bound = (f'moe_ep_capacity_factor={m.moe_ep_capacity_factor}' if m.moe_ep_capacity_factor else
             'the worst case, nothing dropped; model.moe_ep_capacity_factor bounds it')
    print(f'  expert exchange buffers, per MoE layer ({bound}): {f["expert_exchange_bytes"] / GIB:10.3f} GiB '
          '(within the temporaries)')


def main(argv: list[str]) -> None:
  cli.start(argv, ('config',), 'python -m lm.plan --config=experiments/gpt2.py:small')
  try:
    config = validate(FLAGS.config)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  if FLAGS.devices and not FLAGS.topology:
    jax.config.update('jax_platforms', 'cpu')  # Before any JAX op: simulated devices.
    jax.config.update('jax_num_cpu_devices', FLAGS.devices)
  try:
    devices = _devices(config)
    figures = report(config, devices, FLAGS.topology or '')
  except DoesNotFit as e:
    sys.exit(str(e))
  except ConfigError as e:
    hint = '' if FLAGS.devices or FLAGS.topology else ' (simulate devices with --devices=N)'
    sys.exit(f'error: {e}{hint}')
  _print(config, devices, figures)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
