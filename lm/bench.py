"""Benchmarks that measure side by side in one run and print ratios.

  python -m lm.bench --config=experiments/bench.py [--config.a.b=v ...] [--compare=torch] [--json]
  python -m lm.bench compile --config=experiments/bench.py --config.model.scan_layers=True [--depths=6,48]
  python -m lm.bench generate [--models=quickstart,gpt2_small] [--batch_sizes=1,8] [--new_tokens=256] [--json]
  python -m lm.bench optimizers --config=experiments/bench.py [--optimizers=adamw,lion,adafactor,muon,sgd]
  python -m lm.bench data --config=experiments/bench.py [--data_batches=50]
  python -m lm.bench harness [--models=llama_tiny] [--tasks=shakespeare] [--limit=N] [--batch_size=8]

Training (the default): for the config's model, batch and mesh, the train step's compile time, its
time per step as the training loop runs it (a fresh batch from the data pipeline each step), tokens
per second, model FLOPs utilisation against (a) the device's peak from lm.metrics.PEAK_FLOPS and (b)
the dense matmul rate measured on this device in the same run, the peak memory, the data
pipeline's own tokens per second, and (on one device) the matmul floor: the step's own matrix
products (lm.matmuls), each timed alone, summed. --compare=torch also trains the same-shaped GPT-2 of
`transformers` in PyTorch, eager and under torch.compile (torch_eager: eager only), in a child
process each (lm.bench_torch), on the same shapes, batch and optimizer, times lm's matmuls there
with torch.einsum, and prints the ratios. Needs the `hf` extra.

compile: the train step's compile time at several depths, and its ratio to the first.

optimizers: the config's train step under each optimizer.name, timed in turns (one window of each,
then the next round, so that drift in the machine's speed falls on all alike) on the same batches;
tokens per second and the ratio to the first optimizer listed.

data: tokens per second that each kind of source (text, JSONL, Parquet, lm.tokenize shards, a
mixture) delivers on one core, against what the config's train step consumes; lm.tokenize's MB/s.

generate: new tokens per second of lm's KV-cache decoding against `transformers`' generate (PyTorch,
KV cache, same CPU) on the same random GPT-2-shaped weights, greedy on both sides, with a check that
both produce the same tokens. Compilation is timed apart (lm compiles once per shape; PyTorch
needs none). Needs the `hf` extra.

harness: lm.harness against lm-evaluation-harness's own `hf` backend (PyTorch) on the same random
model, tasks and CPU, each run twice (lm compiles in its first), with the largest difference between
their metrics. Needs the `eval` and `hf` extras (and accelerate, for the hf backend).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from lm import cli, decode, hf, kinds, matmuls, metrics, sharding, train
from lm.cli import CPU_XLA_FLAGS
from lm.config import ConfigError, load_experiment, override, validate
from lm.data import pipeline, tokenizers
from lm.data.builders import SHAKESPEARE_VALIDATION_PLAYS, normalize_text, shakespeare_plays_dir
from lm.kinds import make_model
from lm.layers import head_width
from lm.model import count_params
from lm.timing import best_of, median
from lm.tokenize import tokenize

CONFIG = cli.config_flag()

FLAGS = flags.FLAGS

PROMPT_LEN = 16
EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'


# The quickstart's sizes in GPT-2's layout (its own RoPE and SwiGLU have no transformers GPT-2 twin), at
# the width of 96 the README's generation figures were measured with (the quickstart is 160 wide now).
_GPT2_LAYOUT = {'model.positions': 'learned', 'model.mlp': 'gelu', 'model.mlp_dim': 0, 'model.d_model': 96}


def _shape(name: str):
  """The experiment config of a benchmark model: the quickstart's size and GPT-2 small in GPT-2's
  layout, Llama's tiny and 125m presets (RoPE, GQA, SwiGLU, untied)."""
  files = {'quickstart': 'quickstart.py', 'gpt2_small': 'gpt2.py', 'llama_tiny': 'llama.py:tiny',
           'llama_125m': 'llama.py:125m'}
  if name not in files:
    raise ConfigError(f'--models: unknown model {name!r}; allowed: {", ".join(files)}')
  config = load_experiment(str(EXPERIMENTS / files[name]))
  return override(config, _GPT2_LAYOUT) if name == 'quickstart' else config


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
  """This machine's memory bandwidth in bytes/s: the best of `repeats` of three ways to stream a
  float32 array of `mib` MiB (far larger than any cache): numpy summing it on every core, XLA summing
  it (a jitted jnp.sum), and numpy copying it (bytes read + written). 'bandwidth' is the fastest."""
  array = np.ones(mib * 2**20 // 4, np.float32)
  parts = np.array_split(array, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:  # numpy's sum releases the GIL.
    numpy_s, _ = best_of(repeats, lambda: list(pool.map(np.sum, parts)))
  on_device = jax.device_put(array)
  total = jax.jit(jnp.sum)
  total(on_device).block_until_ready()
  xla_s, _ = best_of(repeats, lambda: total(on_device).block_until_ready())
  copy = np.empty_like(array)
  copy_s, _ = best_of(repeats, lambda: np.copyto(copy, array))
  rates = {'numpy_sum': array.nbytes / numpy_s, 'xla_sum': array.nbytes / xla_s, 'copy': 2 * array.nbytes / copy_s}
  return rates | {'bandwidth': max(rates.values())}


def decoding_bytes(config, params, batch: int, prompt_len: int, new_tokens: int) -> dict:
  """Bytes one decoding step must read, on average over new_tokens steps after a prompt_len prompt:
  every weight (the embedding tables only in the rows looked up, unless the table is also the output
  layer), in the dtype it is stored in, and the keys and values of the cache slots in use."""
  m = config.model
  weights = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = {getattr(p, 'key', None) for p in path}
    looked_up = 'position_embedding' in names or ('token_embedding' in names and not m.tie_embeddings)
    weights += leaf.dtype.itemsize * (batch * leaf.shape[-1] if looked_up else leaf.size)
  slot = 2 * m.num_layers * (m.num_kv_heads or m.num_heads) * head_width(m) * jnp.dtype(m.dtype).itemsize
  cache = batch * slot * (prompt_len + (new_tokens - 1) / 2)  # Slots in use, on average over the steps.
  return {'weight_bytes': weights, 'cache_bytes': cache, 'bytes_per_step': weights + cache}


def bench_generate(name: str, batch_sizes: list[int], new_tokens: int, with_torch: bool = True,
                   repeats: int = 3, weights_dtypes: tuple[str, ...] = ('float32',),
                   bandwidth: dict | None = None, profile_dir: str | None = None) -> list[dict]:
  """One record per weights dtype and batch size: lm's and (with_torch) transformers' new tokens per
  second, each the best of `repeats` runs after a warm-up, with the bytes each decoding step reads
  (`decoding_bytes`) and the bandwidth that implies, against the machine's (`memory_bandwidth`).
  profile_dir: a jax.profiler trace of one more lm run per record, in a folder per record there."""
  bandwidth = bandwidth or memory_bandwidth()
  config = _shape(name)
  max_len = max(config.model.max_len, PROMPT_LEN + new_tokens)  # Learned positions for every token.
  # Layers unrolled, as lm.saved.load gives them for generation.
  config = validate(override(config, {'model.max_len': max_len, 'model.dtype': 'float32', 'model.scan_layers': False,
                                      'data.seq_len': min(config.data.seq_len, max_len)}))
  family = kinds.hf_family_of(config.model)
  model = make_model(config.model, config.data)
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))['params']))()
  torch_model = None
  if with_torch:
    torch, transformers = hf.require('torch'), hf.require('transformers')
    hf_config = family.hf_config(config.model, None, None)
    hf_config = transformers.AutoConfig.for_model(hf_config.pop('model_type'), **hf_config)
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    state = {k: torch.tensor(v) for k, v in family.params_to_hf(jax.device_get(params), config.model)}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {'lm_head.weight'}:  # A tied lm_head is the embedding.
      raise RuntimeError(f'{family.model_type} weights do not fit: missing {missing}, unexpected {unexpected}')
    torch_model.tie_weights()
  records = []
  greedy = decode.Sampling(temperature=0.0)
  for dtype in weights_dtypes:
    cast = decode.cast_weights(params, dtype)
    torch_dtype = {'float32': 'float32', 'bfloat16': 'bfloat16'}.get(dtype)  # transformers' GPT-2 has no int8.
    if torch_model is not None and torch_dtype:
      torch_model = torch_model.to(getattr(torch, torch_dtype))
    for batch in batch_sizes:
      prompts = np.random.default_rng(batch).integers(0, config.model.vocab_size, (batch, PROMPT_LEN), np.int32)
      run = lambda: decode.generate_ids(model, cast, list(prompts), max_new_tokens=new_tokens, sampling=greedy,
                                        rng=jax.random.PRNGKey(0))
      start = time.perf_counter()
      run()  # Compiles the prefill and the decoding chunk for this batch size.
      compile_s = time.perf_counter() - start
      lm_s, ours = best_of(repeats, lambda: np.stack(run()))
      if profile_dir:
        with jax.profiler.trace(str(pathlib.Path(profile_dir) / f'{name}-{dtype}-batch{batch}')):
          run()
      read = decoding_bytes(config, cast, batch, PROMPT_LEN, new_tokens)
      record = {'bench': 'generate', 'model': name, 'params': count_params(params), 'batch_size': batch,
                'weights_dtype': dtype, 'prompt_tokens': PROMPT_LEN, 'new_tokens': new_tokens,
                'new_tokens_per_s': batch * new_tokens / lm_s, 'lm_seconds': lm_s, 'lm_compile_seconds': compile_s,
                **read, 'machine_bandwidth': bandwidth['bandwidth'],
                'implied_bandwidth': read['bytes_per_step'] * new_tokens / lm_s}
      record['bandwidth_share'] = record['implied_bandwidth'] / bandwidth['bandwidth']
      if torch_model is not None and torch_dtype:
        with torch.no_grad():
          inputs = torch.from_numpy(prompts.astype(np.int64))
          kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                        eos_token_id=None)
          torch_model.generate(inputs, **(kwargs | {'max_new_tokens': 4, 'min_new_tokens': 4}))  # Warm-up.
          torch_s, theirs = best_of(repeats, lambda: torch_model.generate(inputs, **kwargs)[:, PROMPT_LEN:].numpy())
        torch_read = read['bytes_per_step'] if dtype == 'float32' else decoding_bytes(
            config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), batch, PROMPT_LEN, new_tokens)[
            'bytes_per_step']  # transformers in bfloat16 holds every weight in it.
        record |= {'torch_new_tokens_per_s': batch * new_tokens / torch_s, 'torch_seconds': torch_s,
                   'speedup': torch_s / lm_s, 'same_tokens': float(np.mean(theirs == ours)),
                   'torch_bandwidth_share': torch_read * new_tokens / torch_s / bandwidth['bandwidth']}
      records.append(record)
  if torch_model is not None:
    torch_model.to(torch.float32)
  return records


def bench_harness(name: str, tasks: list[str], limit: int | None, batch_size: int) -> dict:
  """lm.harness against lm-evaluation-harness's own hf backend on the same random model (built with
  transformers, imported with lm.hf), tasks and CPU: seconds of each backend's first run (lm compiles
  then; the hf backend's model is loaded before) and second run, and the largest relative difference
  between their metrics."""
  harness = importlib.import_module('lm.harness')  # Only here: it brings in the harness, torch and datasets.
  harness.require_harness()
  transformers = hf.require('transformers')
  huggingface = importlib.import_module('lm_eval.models.huggingface')
  config = validate(override(_shape(name), {'model.dtype': 'float32', 'model.scan_layers': False}))
  folder = pathlib.Path(tempfile.mkdtemp(prefix='lm-bench-harness-'))
  plays = sorted(p for p in shakespeare_plays_dir().glob('*/*.md') if p.stem not in SHAKESPEARE_VALIDATION_PLAYS)
  tokenizer = tokenizers.train_byte_level_bpe([normalize_text(p.read_text(encoding='utf-8')) for p in plays],
                                              config.model.vocab_size)
  end = tokenizer.token_to_id('<|endoftext|>')
  hf_config = kinds.hf_family_of(config.model).hf_config(config.model, end, end)
  hf_config = transformers.AutoConfig.for_model(hf_config.pop('model_type'), **hf_config)
  transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder / 'hf')  # transformers' init.
  tokenizer.save(str(folder / 'hf' / 'tokenizer.json'))
  (folder / 'hf' / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>'}))
  hf.import_hf(folder / 'hf', folder / 'run')
  manager = harness.task_manager()
  harness.check_tasks(tasks, manager)
  backends = {'lm': harness.HarnessModel(str(folder / 'run'), batch_size=batch_size),
              'hf': huggingface.HFLM(pretrained=str(folder / 'hf'), dtype='float32', batch_size=batch_size,
                                     device='cpu')}
  seconds, scores = {}, {}
  for backend, model in backends.items():
    for attempt in ('first', 'second'):
      start = time.perf_counter()
      scores[backend] = harness.flat_metrics(harness.evaluate(model, tasks, limit=limit, manager=manager,
                                                              bootstrap_iters=0, check=False))
      seconds[f'{backend}_{attempt}_s'] = time.perf_counter() - start
  difference = max(abs(scores['lm'][k] - v) / max(abs(v), 1e-12) for k, v in scores['hf'].items())
  return {'bench': 'harness', 'model': name, 'params': count_params(backends['lm'].run.params), 'tasks': tasks,
          'limit': limit, 'batch_size': batch_size, **seconds,
          'speedup': seconds['hf_second_s'] / seconds['lm_second_s'],
          'max_relative_difference': difference, 'metrics': scores['lm']}


def _default_flags_matmul_flops(dtype: str, sizes: tuple[int, ...] | None) -> float:
  """measure_matmul_flops in a child process without lm's CPU XLA flag (see lm.cli.set_default_xla_flags)."""
  env = dict(os.environ, LM_DEFAULT_XLA_FLAGS='0', XLA_FLAGS=os.environ.get('XLA_FLAGS', '').replace(CPU_XLA_FLAGS, ''))
  args = [sys.executable, '-m', 'lm.bench', 'matmul_peak', dtype] + ([','.join(map(str, sizes))] if sizes else [])
  done = subprocess.run(args, capture_output=True, text=True,
                        env=env, check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  return float(done.stdout.strip().splitlines()[-1])


def matmul_floor_s(products, device, repeats: int = 5) -> float:
  """Summed over lm.matmuls products, count x the fastest of `repeats` runs of the product alone on
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


def bench_optimizers(config, names: list[str], tokenizer_dir: str | pathlib.Path, steps: int = 5,
                     repeats: int = 3) -> list[dict]:
  """Train-step time of config under each optimizer in `names`, in interleaved windows (see the module
  docstring), on the same pre-loaded batches; ratios are to names[0]."""
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, pathlib.Path(tokenizer_dir))
  runs = {}
  for name in names:
    c = validate(override(config, {'optimizer.name': name}))
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
  tokens_per_step = config.data.batch_size * metrics.tokens_per_example(config.model, config.data)
  records = []
  for name, run in runs.items():
    step_s = median(run['windows'])
    records.append({'bench': 'optimizers', 'optimizer': name, 'compile_s': run['compile_s'], 'step_s': step_s,
                    'step_s_windows': run['windows'], 'train_tokens_per_s': tokens_per_step / step_s,
                    'ratio_to_first': median(runs[names[0]]['windows']) / step_s})
  return records


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
  """lm.matmuls.count of config's train step, traced from shapes alone (global shapes)."""
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
  """lm.bench_torch.torch_peer in a child process per mode ('eager', 'compile'), which also times
  `products` (lm's train_step_matmuls); a mode that fails reports its error."""
  family = kinds.hf_family_of(config.model, 'gpt2')
  if config.model.dtype != 'float32':
    raise ValueError(f'--compare=torch trains in float32: set --config.model.dtype=float32 (not {config.model.dtype})')
  spec = {'hf_config': family.hf_config(config.model, None, None), 'optimizer': dict(config.optimizer),
          'batch_size': config.data.batch_size, 'seq_len': config.data.seq_len, 'steps': steps, 'repeats': repeats,
          'matmuls': [[m.lhs_shape, m.rhs_shape, m.einsum(), n] for m, n in products.items()]}
  results = {}
  for mode in modes:
    args = [sys.executable, '-m', 'lm.bench_torch', json.dumps(spec | {'compile': mode == 'compile'})]
    try:
      done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
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


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  # generate
  flags.DEFINE_list('models', ['quickstart', 'gpt2_small'],
                    'generate, harness: model shapes: quickstart, gpt2_small, llama_tiny, llama_125m '
                    '(harness default: llama_tiny).')
  flags.DEFINE_list('batch_sizes', ['1', '8'], 'generate: batch sizes to measure.')
  flags.DEFINE_integer('new_tokens', 256, 'generate: new tokens per sequence (after a 16-token prompt).')
  flags.DEFINE_bool('torch', True, 'generate: measure transformers\' generate alongside.')
  flags.DEFINE_list('weights_dtypes', ['float32'], 'generate: weight dtypes to decode with (float32, bfloat16, '
                    'int8: lm.decode.cast_weights); transformers runs float32 and bfloat16.')
  # harness
  flags.DEFINE_list('tasks', ['shakespeare'], 'harness: harness task names.')
  flags.DEFINE_integer('limit', 0, 'harness: documents per task (0: all).')
  flags.DEFINE_integer('batch_size', 8, 'harness: rows per forward pass on both sides.')
  # train
  flags.DEFINE_integer('steps', 5, 'train: steps per timed window.')
  flags.DEFINE_integer('data_batches', 50, 'train: batches the data pipeline is timed on, after those that fill '
                       'its shuffle window.')
  flags.DEFINE_enum('compare', 'none', ['none', 'torch', 'torch_eager'],
                    'train: also train transformers\' GPT-2 in PyTorch (torch: eager and torch.compile).')
  flags.DEFINE_string('workdir', 'runs/bench', 'train: where the tokenizer is kept between runs.')
  flags.DEFINE_string('profile_dir', None, 'train: write a jax.profiler trace of the last timed window here; '
                      'generate: of one more run of each model, dtype and batch size.')
  flags.DEFINE_list('matmul_sizes', [], 'train: square matmul sizes for the measured peak; default 1024,2048,4096 '
                    'on CPU, 8192 on accelerators.')
  flags.DEFINE_list('depths', ['6', '48'], 'compile: model.num_layers values to compile the train step at.')
  flags.DEFINE_list('optimizers', ['adamw', 'lion', 'adafactor', 'muon', 'sgd'],
                    'optimizers: the optimizer.name values to time; ratios are to the first.')
  # both
  flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (generate: the fastest counts; train: the median).')
  flags.DEFINE_bool('json', False, 'Print one JSON line per measurement instead of text.')


DATA_KINDS = ('text', 'jsonl', 'parquet', 'tokenized', 'mixture')


def _write_data_formats(corpus: pipeline.Corpus, text_key: str, folder: pathlib.Path) -> dict[str, str]:
  """The corpus's train and eval documents as .txt, .jsonl.zst and .parquet files (train in 0_*, eval
  in 1_*, so that text_files splits them as they were): {kind: data.paths glob}."""
  for kind in ('text', 'jsonl', 'parquet'):
    (folder / kind).mkdir(parents=True, exist_ok=True)
  for index, source in enumerate((corpus.train_source, corpus.eval_source)):
    texts = [pipeline.example_text(source[i], text_key) for i in range(len(source))]
    (folder / 'text' / f'{index}_docs.txt').write_text('\n\n'.join(texts), encoding='utf-8')
    rows = ''.join(json.dumps({'text': t}) + '\n' for t in texts).encode()
    (folder / 'jsonl' / f'{index}_docs.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(rows))
    pq.write_table(pa.table({'text': texts}), folder / 'parquet' / f'{index}_docs.parquet')
  return {'text': str(folder / 'text' / '*.txt'), 'jsonl': str(folder / 'jsonl' / '*.jsonl.zst'),
          'parquet': str(folder / 'parquet' / '*.parquet')}


def _delivered_tokens_per_s(config, corpus, batches: int) -> float:
  """Tokens per second train_dataset delivers after its first batch (the threads started, the first
  shuffle window read) over `batches` batches, or over four shuffle windows' worth if that is more
  (each window is read whole before it is served)."""
  rows = config.data.batch_size
  batches = max(batches, -(-4 * config.data.shuffle_window // rows))
  data = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  next(data)
  start = time.perf_counter()
  for _ in range(batches):
    next(data)
  return batches * rows * config.data.seq_len / (time.perf_counter() - start)


def bench_data(config, workdir: pathlib.Path, data_batches: int = 50, steps: int = 5, repeats: int = 3) -> dict:
  """Tokens per second each source kind delivers (DATA_KINDS: the config's documents as text, JSONL,
  Parquet, lm.tokenize shards, and a half-and-half mixture of JSONL and shards), each read with this
  process pinned to one core, beside the tokens per second the config's train step consumes on all
  devices; and lm.tokenize's text MB/s on one worker."""
  folder = workdir / 'data'
  base = pipeline.load_corpus(config.data, config.model.vocab_size, folder / 'tokenizer')
  paths = _write_data_formats(base, config.data.text_key, folder)
  shards_dir = tempfile.mkdtemp(dir=folder, prefix='tokenized_')  # Fresh: lm.tokenize measured from scratch.
  shards = tokenize(override(config, {'data.name': 'text_files', 'data.paths': paths['jsonl']}).data,
                    config.model.vocab_size, shards_dir, workers=1, progress=False)
  configs = {kind: override(config, {'data.name': 'text_files', 'data.paths': paths[kind]})
             for kind in ('text', 'jsonl', 'parquet')}
  configs['tokenized'] = override(config, {'data.name': 'tokenized', 'data.paths': shards_dir})
  configs['mixture'] = override(config, {'data.mixture': f'text_files={paths["jsonl"]}:0.5,tokenized={shards_dir}:0.5',
                                         'data.paths': ''})
  corpora = {kind: pipeline.load_corpus(c.data, c.model.vocab_size, folder / f'tokenizer_{kind}')
             for kind, c in configs.items()}

  # What training consumes, on all devices, from batches made beforehand.
  layout = train.make_layout(config)
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, base, config.seed)), 2 + steps))
  state = train.init_train_state(layout)
  place = lambda b: sharding.global_batch(b, layout.batch_sharding, config.data.batch_size)
  with sharding.activate(layout.mesh, layout.rules):
    step = train.jit_train_step(layout, config.train).lower(state, place(batches[0])).compile()
  for batch in batches[:2]:
    state, step_metrics = step(state, place(batch))
  jax.block_until_ready(step_metrics)
  windows = []
  for _ in range(repeats):
    placed = [place(b) for b in batches[2:]]
    start = time.perf_counter()
    for batch in placed:
      state, step_metrics = step(state, batch)
    jax.block_until_ready(step_metrics)
    windows.append((time.perf_counter() - start) / steps)
  consumed = config.data.batch_size * config.data.seq_len / median(windows)

  cores = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(cores)})  # One core reads (Grain's thread and this one).
  try:
    delivered = {kind: _delivered_tokens_per_s(configs[kind], corpora[kind], data_batches) for kind in DATA_KINDS}
  finally:
    os.sched_setaffinity(0, cores)
  text_mb = shards['text_bytes_this_run'] / 1e6
  return {'bench': 'data', 'train_tokens_per_s': consumed, 'train_step_s': median(windows),
          'devices': layout.mesh.size, 'batch_size': config.data.batch_size, 'seq_len': config.data.seq_len,
          **{f'{kind}_tokens_per_s': v for kind, v in delivered.items()},
          **{f'{kind}_to_train_ratio': v / consumed for kind, v in delivered.items()},
          'tokenize_text_mb': text_mb, 'tokenize_worker_s': shards['worker_seconds_this_run'],
          'tokenize_mb_per_s_per_core': text_mb / shards['worker_seconds_this_run'],
          'tokenizer': config.data.tokenizer, 'vocab_size': shards['tokenizer']['vocab_size']}


def _print_data(r: dict) -> None:
  print(f'training consumes {r["train_tokens_per_s"]:,.0f} tokens/s (batch {r["batch_size"]} x {r["seq_len"]}, '
        f'{1e3 * r["train_step_s"]:.0f} ms/step on {r["devices"]} device(s))')
  for kind in DATA_KINDS:
    print(f'  {kind:<10} delivers {r[f"{kind}_tokens_per_s"]:>12,.0f} tokens/s on one core: '
          f'{r[f"{kind}_to_train_ratio"]:,.1f}x what training consumes')
  print(f'lm.tokenize: {r["tokenize_text_mb"]:.1f} MB of text in {r["tokenize_worker_s"]:.2f} s of one worker, '
        f'{r["tokenize_mb_per_s_per_core"]:.2f} MB/s per core ({r["tokenizer"]}, {r["vocab_size"]} ids)')


def _print_train(r: dict) -> None:
  gib = r['peak_memory_bytes'] / 2**30
  hardware = (f'{100 * r["mfu_hardware_peak"]:.1f}% of the {r["hardware_peak_flops"] / 1e12:.0f} TFLOP/s '
              f'{r["device_kind"]} peak' if r['hardware_peak_flops'] else f'no table peak for {r["device_kind"]!r}')
  print(f'model: {r["params"]:,} parameters, batch {r["batch_size"]} x {r["tokens_per_example"]} tokens, '
        f'{r["dtype"]}, {r["devices"]} {r["platform"]} device(s)')
  print(f'compile: {r["compile_s"]:.1f} s')
  print(f'train step: {1e3 * r["step_s"]:.1f} ms ({", ".join(f"{1e3 * w:.1f}" for w in r["step_s_windows"])} ms '
        f'in {len(r["step_s_windows"])} windows), {r["train_tokens_per_s"]:,.0f} tokens/s')
  rates = ', '.join(f'{k} {v / 1e9:,.1f}' for k, v in r['matmul_flops'].items())
  print(f'MFU: {100 * r["mfu_measured_peak"]:.1f}% of the {r["measured_peak_flops"] / 1e9:,.1f} GFLOP/s matmul rate '
        f'measured here ({rates}; {r["achieved_flops_per_device"] / 1e9:,.1f} GFLOP/s of model FLOPs per device); '
        f'{hardware}')
  if r['matmul_floor_s']:
    print(f'matmuls alone: {1e3 * r["matmul_floor_s"]:.1f} ms, {100 * r["matmul_floor_share"]:.0f}% of the step (its '
          f'{r["matmul_count"]} products, {r["matmul_flops_per_step"] / 1e9:,.1f} GFLOP, each timed by itself; the '
          f'rest of the step is everything else)')
  print(f'peak memory: {gib:.2f} GiB ({"device statistics" if r["memory_source"] == "device" else "XLA memory plan"})')
  print(f'data pipeline: {r["data_tokens_per_s"]:,.0f} tokens/s, {r["data_to_train_ratio"]:.0f}x what training '
        'consumes')
  for mode in ('eager', 'compile'):
    if f'torch_{mode}' not in r:
      continue
    t = r[f'torch_{mode}']
    if 'error' in t:
      print(f'transformers GPT-2, PyTorch {mode}: failed ({t["error"]})')
      continue
    print(f'transformers GPT-2, PyTorch {mode}: {t["tokens_per_s"]:,.0f} tokens/s ({1e3 * t["step_s"]:.1f} ms/step, '
          f'first two steps {t["warmup_s"]:.1f} s); lm is {r[f"speedup_vs_torch_{mode}"]:.2f}x; PyTorch runs lm\'s '
          f'matmuls in {1e3 * t["matmul_floor_s"]:.1f} ms, {100 * t["matmul_floor_share"]:.0f}% of its step')


def main_train(config) -> None:
  # PyTorch first, while this process has started nothing (no XLA or data threads) to compete with it.
  modes = {'none': [], 'torch': ['eager', 'compile'], 'torch_eager': ['eager']}[FLAGS.compare]
  products = train_step_matmuls(config)  # Traced from shapes: no XLA computation runs yet.
  peers = compare_torch(config, modes, FLAGS.steps, FLAGS.repeats, products) if modes else {}
  record = bench_train(config, pathlib.Path(FLAGS.workdir) / 'tokenizer', FLAGS.steps, FLAGS.repeats,
                       FLAGS.data_batches, FLAGS.profile_dir, tuple(int(n) for n in FLAGS.matmul_sizes) or None,
                       products)
  for mode, result in peers.items():
    record[f'torch_{mode}'] = result
    if 'tokens_per_s' in result:
      record[f'torch_{mode}_tokens_per_s'] = result['tokens_per_s']
      record[f'speedup_vs_torch_{mode}'] = record['train_tokens_per_s'] / result['tokens_per_s']
  if FLAGS.json:
    print(json.dumps(record), flush=True)
  else:
    _print_train(record)


def main_generate() -> None:
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  bandwidth = memory_bandwidth()
  if not FLAGS.json:
    print(f'memory bandwidth: {bandwidth["bandwidth"] / 1e9:.1f} GB/s, the best of streaming 512 MiB by numpy summing '
          f'on every core {bandwidth["numpy_sum"] / 1e9:.1f}, XLA summing {bandwidth["xla_sum"] / 1e9:.1f}, numpy '
          f'copying (read + write) {bandwidth["copy"] / 1e9:.1f}', flush=True)
  for name in FLAGS.models:
    for r in bench_generate(name, batch_sizes, FLAGS.new_tokens, FLAGS.torch, FLAGS.repeats,
                            tuple(FLAGS.weights_dtypes), bandwidth, FLAGS.profile_dir):
      if FLAGS.json:
        print(json.dumps(r), flush=True)
        continue
      line = (f'{r["model"]} ({r["params"]:,} params, {r["weights_dtype"]}) batch {r["batch_size"]}: '
              f'{r["bytes_per_step"] / 1e6:,.1f} MB per step; lm {r["new_tokens_per_s"]:,.0f} new tokens/s '
              f'({100 * r["bandwidth_share"]:.0f}% of the bandwidth; compile {r["lm_compile_seconds"]:.1f} s)')
      if 'speedup' in r:
        line += (f', transformers {r["torch_new_tokens_per_s"]:,.0f} ({100 * r["torch_bandwidth_share"]:.0f}%): '
                 f'{r["speedup"]:.2f}x; same greedy tokens: {100 * r["same_tokens"]:.0f}%')
      print(line, flush=True)


def main_harness() -> None:
  models = FLAGS.models if FLAGS['models'].present else ['llama_tiny']
  for name in models:
    r = bench_harness(name, FLAGS.tasks, FLAGS.limit or None, FLAGS.batch_size)
    print(json.dumps(r) if FLAGS.json else
          f'{r["model"]} ({r["params"]:,} params), tasks {",".join(r["tasks"])}, limit {r["limit"]}, batch '
          f'{r["batch_size"]}: lm.harness {r["lm_first_s"]:.1f} s (first run, compiling) then '
          f'{r["lm_second_s"]:.1f} s; hf backend {r["hf_first_s"]:.1f} s then {r["hf_second_s"]:.1f} s: '
          f'{r["speedup"]:.1f}x; metrics differ by '
          f'at most {r["max_relative_difference"]:.1e} (relative)', flush=True)


USAGE = ('usage: python -m lm.bench --config=experiments/bench.py [--config.a.b=v ...] [--compare=torch] [--json]\n'
         '       python -m lm.bench compile --config=... [--depths=6,48] [--json]\n'
         '       python -m lm.bench optimizers --config=... [--optimizers=adamw,lion,adafactor,muon,sgd] [--json]\n'
         '       python -m lm.bench data --config=... [--data_batches=50] [--json]\n'
         '       python -m lm.bench generate [--models=...] [--batch_sizes=1,8] [--new_tokens=256] [--json]\n'
         '       python -m lm.bench harness [--models=llama_tiny] [--tasks=shakespeare] [--limit=N] [--json]')


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  try:
    if argv[1:] == ['generate']:
      main_generate()
    elif argv[1:] == ['harness']:
      main_harness()
    elif argv[1:] == ['compile'] and CONFIG.value is not None:
      for r in bench_compile(validate(CONFIG.value), [int(d) for d in FLAGS.depths]):
        print(json.dumps(r) if FLAGS.json else
              f'{r["num_layers"]} layers (scan_layers={r["scan_layers"]}): compiled the train step in '
              f'{r["compile_s"]:.1f} s, {r["compile_ratio"]:.2f}x the first; program {r["program_chars"]:,} chars',
              flush=True)
    elif argv[1:] == ['data'] and CONFIG.value is not None:
      record = bench_data(validate(CONFIG.value), pathlib.Path(FLAGS.workdir), FLAGS.data_batches, FLAGS.steps,
                          FLAGS.repeats)
      print(json.dumps(record), flush=True) if FLAGS.json else _print_data(record)
    elif argv[1:] == ['optimizers'] and CONFIG.value is not None:
      config = validate(CONFIG.value)
      for r in bench_optimizers(config, FLAGS.optimizers, pathlib.Path(FLAGS.workdir) / 'tokenizer', FLAGS.steps,
                                FLAGS.repeats):
        print(json.dumps(r) if FLAGS.json else
              f'{r["optimizer"]}: {1e3 * r["step_s"]:.1f} ms/step, {r["train_tokens_per_s"]:,.0f} tokens/s, '
              f'{r["ratio_to_first"]:.2f}x {FLAGS.optimizers[0]} (compile {r["compile_s"]:.1f} s)', flush=True)
    elif len(argv) in (3, 4) and argv[1] == 'matmul_peak':  # A child of bench_train.
      sizes = tuple(int(n) for n in argv[3].split(',')) if len(argv) == 4 else None
      print(metrics.measure_matmul_flops(jax.devices()[0], argv[2], sizes), flush=True)
    elif len(argv) == 1 and CONFIG.value is not None:
      main_train(validate(CONFIG.value))
    else:
      sys.exit(USAGE)
  except (ConfigError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
