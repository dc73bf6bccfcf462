"""python -m lm.bench (training), compile and optimizers: the train step's time, tokens per second and
MFU against the measured matmul rate and the matmul floor; compile time by depth; optimizers side by side;
the same-shaped GPT-2 in PyTorch (lm.bench.torch_side) for the ratio.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import kinds
from lm.bench import matmuls
from lm.bench.timing import best_of, median
from lm.cli import CPU_XLA_FLAGS
from lm.config import ConfigError, override, validate
from lm.data import pipeline
from lm.nn.layers import mlp_width
from lm.nn.model import count_params
from lm.parallel import sharding
from lm.training import metrics, train


def _default_flags_matmul_flops(dtype: str, sizes: tuple[int, ...] | None) -> float:
  """measure_matmul_flops in a child process without lm's CPU XLA flag (see lm.cli.set_default_xla_flags)."""
  env = dict(os.environ, LM_DEFAULT_XLA_FLAGS='0', XLA_FLAGS=os.environ.get('XLA_FLAGS', '').replace(CPU_XLA_FLAGS, ''))
  args = [sys.executable, '-m', 'lm.bench', 'matmul_peak', dtype] + ([','.join(map(str, sizes))] if sizes else [])
  done = subprocess.run(args, capture_output=True, text=True,
                        env=env, check=True, cwd=pathlib.Path(__file__).resolve().parents[2])
  return float(done.stdout.strip().splitlines()[-1])


def matmul_floor_s(products, device, repeats: int = 5) -> float:
  """Summed over lm.bench.matmuls products, count x the fastest of `repeats` runs of the product alone on
  device (jitted, on random operands, after one run that compiles it)."""
  total = 0.0
  for i, (m, times) in enumerate(products.items()):
    key = jax.random.PRNGKey(i)
    lhs = jax.device_put(jax.random.normal(key, m.lhs_shape, m.lhs_dtype), device)
    rhs = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), m.rhs_shape, m.rhs_dtype), device)
    product = jax.jit(lambda a, b, m=m: jax.lax.dot_general(a, b, (m.contracting, m.batch),
                                                            preferred_element_type=np.dtype(m.out_dtype)))
    run = lambda product=product, lhs=lhs, rhs=rhs: jax.block_until_ready(product(lhs, rhs))
    run()
    total += times * best_of(repeats, run)[0]
  return total


def bench_train(config, tokenizer_dir: str | pathlib.Path, steps: int = 5, repeats: int = 3,
                data_batches: int = 50, profile_dir: str | None = None,
                matmul_sizes: tuple[int, ...] | None = None, products=None) -> dict:
  """Compile and train-step figures of config's experiment on all devices (see the module docstring).

  Step time is the median over `repeats` windows of `steps` steps each (after two warm-up steps),
  each step on a fresh batch from the data pipeline, the host queuing steps as the training loop
  does; a window ends when the device has finished its last step. `products` (train_step_matmuls,
  traced here if None) are the step's matmuls; on one device, their floor is timed last.
  """
  device = jax.devices()[0]
  products = train_step_matmuls(config) if products is None else products
  matmul_rates = {'lm_xla_flags': metrics.measure_matmul_flops(device, config.model.dtype, matmul_sizes)}
  if device.platform == 'cpu':  # XLA's own CPU default (YNNPACK matmuls) too: the peak is the faster one.
    matmul_rates['xla_default_flags'] = _default_flags_matmul_flops(config.model.dtype, matmul_sizes)
  measured_peak = max(matmul_rates.values())
  layout = train.make_layout(config)
  mesh, rules, batch_sharding = layout.mesh, layout.rules, layout.batch_sharding
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, pathlib.Path(tokenizer_dir))
  shard = sharding.data_shard(batch_sharding, config.data.batch_size)
  tokens_per_row = metrics.tokens_per_example(config.model, config.data)

  # The data pipeline alone, from a fresh iterator: filling the shuffle window, then data_batches more.
  rows = config.data.batch_size // shard[1]
  batches = -(-config.data.shuffle_window // rows) + data_batches
  start = time.perf_counter()
  data = iter(pipeline.train_dataset(config.data, corpus, config.seed, *shard))
  for _ in range(batches):
    next(data)
  data_tokens_per_s = batches * rows * tokens_per_row / (time.perf_counter() - start)

  state = train.init_train_state(layout)
  next_batch = lambda: sharding.global_batch(next(data), batch_sharding, config.data.batch_size)
  batch = next_batch()
  with sharding.activate(mesh, rules):
    start = time.perf_counter()
    compiled = train.jit_train_step(layout, config.train).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  for _ in range(2):
    state, step_metrics = compiled(state, next_batch())
  jax.block_until_ready(step_metrics)
  windows = []
  for repeat in range(repeats):
    trace = profile_dir is not None and repeat == repeats - 1
    if trace:
      jax.profiler.start_trace(profile_dir)
    start = time.perf_counter()
    for _ in range(steps):
      state, step_metrics = compiled(state, next_batch())
    jax.block_until_ready(step_metrics)
    windows.append((time.perf_counter() - start) / steps)
    if trace:
      jax.profiler.stop_trace()
  step_s = median(windows)
  # Per-device shapes are the global ones only on one device; a sharded step's are XLA's to choose.
  floor_s = matmul_floor_s(products, device) if mesh.size == 1 else None

  tokens_per_s = config.data.batch_size * tokens_per_row / step_s
  flops_per_token = metrics.flops_per_token(config.model, config.data)
  achieved = flops_per_token * tokens_per_s / mesh.size  # Per device.
  hardware_peak = metrics.peak_flops_per_device(device, config.train.peak_flops_per_device)
  memory_stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in memory_stats:
    peak_memory, memory_source = memory_stats['peak_bytes_in_use'], 'device'
  else:  # CPU: what XLA planned for one step (arguments, outputs and temporaries, less donated buffers).
    m = compiled.memory_analysis()
    peak_memory = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    memory_source = 'compiler'
  return {
      'bench': 'train', 'params': count_params(state.params), 'batch_size': config.data.batch_size,
      'tokens_per_example': tokens_per_row, 'devices': mesh.size, 'device_kind': device.device_kind,
      'platform': device.platform, 'dtype': config.model.dtype, 'compile_s': compile_s, 'step_s': step_s,
      'step_s_windows': windows, 'train_tokens_per_s': tokens_per_s, 'flops_per_token': flops_per_token,
      'achieved_flops_per_device': achieved, 'measured_peak_flops': measured_peak, 'matmul_flops': matmul_rates,
      'mfu_measured_peak': achieved / measured_peak, 'hardware_peak_flops': hardware_peak,
      'mfu_hardware_peak': achieved / hardware_peak if hardware_peak else None,
      'peak_memory_bytes': int(peak_memory), 'memory_source': memory_source,
      'data_tokens_per_s': data_tokens_per_s, 'data_to_train_ratio': data_tokens_per_s / tokens_per_s,
      'final_loss': float(step_metrics['loss']), 'matmul_count': sum(products.values()),
      'matmul_flops_per_step': matmuls.flops(products), 'matmul_floor_s': floor_s,
      'matmul_floor_share': floor_s / step_s if floor_s else None,
  }


def _time_variants(configs: dict[str, ml_collections.ConfigDict], tokenizer_dir: str | pathlib.Path, steps: int,
                   repeats: int) -> dict[str, dict]:
  """Each config's train step timed in interleaved windows (one window of each, then the next round,
  so that drift in the machine's speed falls on all alike) on the same pre-loaded batches (the first
  config's data): {name: {'compile_s', 'step_s' (the median window), 'windows'}}."""
  first = next(iter(configs.values()))
  corpus = pipeline.load_corpus(first.data, first.model.vocab_size, pathlib.Path(tokenizer_dir))
  runs = {}
  for name, c in configs.items():
    layout = train.make_layout(c)
    if not runs:
      shard = sharding.data_shard(layout.batch_sharding, c.data.batch_size)
      data = iter(pipeline.train_dataset(c.data, corpus, c.seed, *shard))
      batches = [sharding.global_batch(next(data), layout.batch_sharding, c.data.batch_size) for _ in range(steps)]
    state = train.init_train_state(layout)
    with sharding.activate(layout.mesh, layout.rules):
      start = time.perf_counter()
      compiled = train.jit_train_step(layout, c.train).lower(state, batches[0]).compile()
      compile_s = time.perf_counter() - start
    for batch in batches[:2]:  # Warm-up.
      state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)
    runs[name] = {'compiled': compiled, 'state': state, 'windows': [], 'compile_s': compile_s}
  for _ in range(repeats):
    for run in runs.values():
      start = time.perf_counter()
      for batch in batches:
        run['state'], step_metrics = run['compiled'](run['state'], batch)
      jax.block_until_ready(step_metrics)
      run['windows'].append((time.perf_counter() - start) / steps)
  return {name: {'compile_s': run['compile_s'], 'step_s': median(run['windows']), 'windows': run['windows']}
          for name, run in runs.items()}


def bench_optimizers(config, names: list[str], tokenizer_dir: str | pathlib.Path, steps: int = 5,
                     repeats: int = 3) -> list[dict]:
  """Train-step time of config under each optimizer in `names`, in interleaved windows, on the same
  batches; ratios are to names[0]."""
  configs = {name: validate(override(config, {'optimizer.name': name})) for name in names}
  timed = _time_variants(configs, tokenizer_dir, steps, repeats)
  tokens_per_step = config.data.batch_size * metrics.tokens_per_example(config.model, config.data)
  return [{'bench': 'optimizers', 'optimizer': name, 'compile_s': t['compile_s'], 'step_s': t['step_s'],
           'step_s_windows': t['windows'], 'train_tokens_per_s': tokens_per_step / t['step_s'],
           'ratio_to_first': timed[names[0]]['step_s'] / t['step_s']} for name, t in timed.items()]


def moe_variants(config, experts: int, top_k: int, grouped_impls: list[str]) -> dict[str, ml_collections.ConfigDict]:
  """A dense model and mixtures of `experts` experts (top_k each) of equal active FLOPs per token: each
  expert 1/top_k of the dense MLP's width. Keys: 'dense', 'capacity', and 'dropless' (or
  'dropless/<impl>' for each of several grouped products)."""
  width = mlp_width(config.model)
  if width % top_k:
    raise ConfigError(f'bench moe: the MLP width {width} must split into top_k={top_k} experts\' widths')
  moe = {'model.moe_experts': experts, 'model.moe_top_k': top_k, 'model.mlp_dim': width // top_k,
         'model.moe_capacity_factor': 1.25}
  variants = {'dense': {'model.mlp_dim': width}, 'capacity': moe | {'model.moe_impl': 'capacity'}}
  for impl in grouped_impls:
    name = 'dropless' if len(grouped_impls) == 1 else f'dropless/{impl}'
    variants[name] = moe | {'model.moe_impl': 'dropless', 'model.moe_grouped_impl': impl}
  return {name: validate(override(config, values)) for name, values in variants.items()}


def bench_moe(config, tokenizer_dir: str | pathlib.Path, experts: int = 64, top_k: int = 8,
              grouped_impls: tuple[str, ...] = ('blocks',), steps: int = 5, repeats: int = 3) -> list[dict]:
  """Tokens per second of each moe_variants model, timed side by side; vs_dense_active: over the dense model's."""
  configs = moe_variants(config, experts, top_k, list(grouped_impls))
  timed = _time_variants(configs, tokenizer_dir, steps, repeats)
  tokens_per_step = config.data.batch_size * metrics.tokens_per_example(config.model, config.data)
  dense_s = timed['dense']['step_s']
  return [{'bench': 'moe', 'impl': name, 'experts': configs[name].model.moe_experts, 'top_k': top_k,
           'flops_per_token': metrics.flops_per_token(configs[name].model, configs[name].data),
           'compile_s': t['compile_s'], 'step_s': t['step_s'], 'tokens_per_second': tokens_per_step / t['step_s'],
           'vs_dense_active': dense_s / t['step_s']} for name, t in timed.items()]


def _abstract_train_step(c):
  """The jitted train step of config c, shape-only arguments for it (no data, no parameters), and its mesh
  and rules: trace it inside sharding.activate(mesh, rules)."""
  layout = train.make_layout(c)
  state = train.abstract_train_state(layout)
  kind = kinds.of(c.model)
  shapes = jax.eval_shape(lambda: kind.example_batch(c.data, c.data.batch_size)
                          | {'loss_mask': jnp.zeros((c.data.batch_size, kind.target_positions(c.data)), bool)})
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout.batch_sharding), shapes)
  return train.jit_train_step(layout, c.train), (state, batch), layout.mesh, layout.rules


def train_step_matmuls(config):
  """lm.bench.matmuls.count of config's train step, traced from shapes alone (global shapes)."""
  jitted, args, mesh, rules = _abstract_train_step(config)
  with sharding.activate(mesh, rules):
    return matmuls.count(jitted.trace(*args).jaxpr)


def bench_compile(config, depths: list[int]) -> list[dict]:
  """Compile time of the train step at each depth (model.num_layers) of config, from shapes alone (no
  data, no parameters), with the size of the program XLA compiles. With model.scan_layers the
  blocks are one scanned body, so neither should grow with depth."""
  records = []
  for depth in depths:
    c = validate(override(config, {'model.num_layers': depth}))
    jitted, args, mesh, rules = _abstract_train_step(c)
    with sharding.activate(mesh, rules):
      start = time.perf_counter()
      lowered = jitted.lower(*args)
      lowered.compile()
      seconds = time.perf_counter() - start
    records.append({'bench': 'compile', 'num_layers': depth, 'scan_layers': c.model.scan_layers,
                    'compile_s': seconds, 'program_chars': len(lowered.as_text()),
                    'compile_ratio': seconds / records[0]['compile_s'] if records else 1.0})
  return records


def compare_torch(config, modes: list[str], steps: int, repeats: int, products, timeout_s: float = 1800) -> dict:
  """lm.bench.torch_side.torch_peer in a child process per mode ('eager', 'compile'), which also times
  `products` (lm's train_step_matmuls); a mode that fails reports its error."""
  family = kinds.hf_family_of(config.model, 'gpt2')
  if config.model.dtype != 'float32':
    raise ValueError(f'--compare=torch trains in float32: set --config.model.dtype=float32 (not {config.model.dtype})')
  spec = {'hf_config': family.hf_config(config.model, None, None), 'optimizer': dict(config.optimizer),
          'batch_size': config.data.batch_size, 'seq_len': config.data.seq_len, 'steps': steps, 'repeats': repeats,
          'matmuls': [[m.lhs_shape, m.rhs_shape, m.einsum(), n] for m, n in products.items()]}
  results = {}
  for mode in modes:
    args = [sys.executable, '-m', 'lm.bench.torch_side', json.dumps(spec | {'compile': mode == 'compile'})]
    try:
      done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                            cwd=pathlib.Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
      results[mode] = {'error': f'timed out after {timeout_s:.0f} s'}
      continue
    lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
    if done.returncode or not lines:
      tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
      results[mode] = {'error': f'exit {done.returncode}: {tail}'}
    else:
      results[mode] = json.loads(lines[-1])
  return results
