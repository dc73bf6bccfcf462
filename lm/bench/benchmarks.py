"""Benchmarks that measure side by side in one run and print ratios.

  python -m lm.bench --config=experiments/bench.py [--config.a.b=v ...] [--compare=torch] [--json]
  python -m lm.bench compile --config=experiments/bench.py --config.model.scan_layers=True [--depths=6,48]
  python -m lm.bench generate [--models=quickstart,gpt2_small] [--batch_sizes=1,8] [--new_tokens=256] [--json]
  python -m lm.bench optimizers --config=experiments/bench.py [--optimizers=adamw,lion,adafactor,muon,sgd]
  python -m lm.bench data --config=experiments/bench.py [--data_batches=50]
  python -m lm.bench moe --config=experiments/bench.py [--experts=64] [--top_k=8] [--grouped_impls=blocks] [--json]
  python -m lm.bench harness [--models=llama_tiny] [--tasks=shakespeare] [--limit=N] [--batch_size=8]

Training (the default): for the config's model, batch and mesh, the train step's compile time, its
time per step as the training loop runs it (a fresh batch from the data pipeline each step), tokens
per second, model FLOPs utilisation against (a) the device's peak from lm.training.metrics.PEAK_FLOPS and (b)
the dense matmul rate measured on this device in the same run, the peak memory, the data
pipeline's own tokens per second, and (on one device) the matmul floor: the step's own matrix
products (lm.bench.matmuls), each timed alone, summed. --compare=torch also trains the same-shaped GPT-2 of
`transformers` in PyTorch, eager and under torch.compile (torch_eager: eager only), in a child
process each (lm.bench.torch_side), on the same shapes, batch and optimizer, times lm's matmuls there
with torch.einsum, and prints the ratios. Needs the `hf` extra.

compile: the train step's compile time at several depths, and its ratio to the first.

optimizers: the config's train step under each optimizer.name, timed in turns (one window of each,
then the next round, so that drift in the machine's speed falls on all alike) on the same batches;
tokens per second and the ratio to the first optimizer listed.

moe: a dense model and mixtures of experts of the same active FLOPs per token (each of --experts
experts 1/--top_k of the dense MLP's width; top_k of them per token), under each model.moe_impl
(capacity; dropless with each of --grouped_impls), timed in turns on the same batches: tokens per
second and vs_dense_active, the ratio to the dense model's.

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

import json
import pathlib
import sys

from absl import flags, logging
import jax

from lm import cli
from lm.bench.data import DATA_KINDS, bench_data
from lm.bench.generate import bench_generate, memory_bandwidth
from lm.bench.harness import bench_harness
from lm.bench.train import (
  bench_compile,
  bench_moe,
  bench_optimizers,
  bench_train,
  compare_torch,
  train_step_matmuls,
)
from lm.config import ConfigError, validate
from lm.training import metrics

FLAGS = flags.FLAGS




def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.config_flag()
  # generate
  flags.DEFINE_list('models', ['quickstart', 'gpt2_small'],
                    'generate, harness: model shapes: quickstart, gpt2_small, llama_tiny, llama_125m '
                    '(harness default: llama_tiny).')
  flags.DEFINE_list('batch_sizes', ['1', '8'], 'generate: batch sizes to measure.')
  flags.DEFINE_integer('new_tokens', 256, 'generate: new tokens per sequence (after a 16-token prompt).')
  flags.DEFINE_bool('torch', True, 'generate: measure transformers\' generate alongside.')
  flags.DEFINE_list('weights_dtypes', ['float32'], 'generate: weight dtypes to decode with (float32, bfloat16, '
                    'int8: lm.inference.decode.cast_weights); transformers runs float32 and bfloat16.')
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
  # moe
  flags.DEFINE_integer('experts', 64, 'moe: experts per MoE layer.')
  flags.DEFINE_integer('top_k', 8, 'moe: experts per token (each 1/top_k of the dense MLP wide).')
  flags.DEFINE_list('grouped_impls', ['blocks'], "moe: model.moe_grouped_impl values for 'dropless' "
                    '(blocks, ragged_dot).')
  # both
  flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (generate: the fastest counts; train: the median).')
  flags.DEFINE_bool('json', False, 'Print one JSON line per measurement instead of text.')


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
         '       python -m lm.bench moe --config=experiments/bench.py [--experts=64] [--top_k=8] [--json]\n'
         '       python -m lm.bench harness [--models=llama_tiny] [--tasks=shakespeare] [--limit=N] [--json]')


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  try:
    if argv[1:] == ['generate']:
      main_generate()
    elif argv[1:] == ['harness']:
      main_harness()
    elif argv[1:] == ['compile'] and FLAGS.config is not None:
      for r in bench_compile(validate(FLAGS.config), [int(d) for d in FLAGS.depths]):
        print(json.dumps(r) if FLAGS.json else
              f'{r["num_layers"]} layers (scan_layers={r["scan_layers"]}): compiled the train step in '
              f'{r["compile_s"]:.1f} s, {r["compile_ratio"]:.2f}x the first; program {r["program_chars"]:,} chars',
              flush=True)
    elif argv[1:] == ['data'] and FLAGS.config is not None:
      record = bench_data(validate(FLAGS.config), pathlib.Path(FLAGS.workdir), FLAGS.data_batches, FLAGS.steps,
                          FLAGS.repeats)
      print(json.dumps(record), flush=True) if FLAGS.json else _print_data(record)
    elif argv[1:] == ['optimizers'] and FLAGS.config is not None:
      config = validate(FLAGS.config)
      for r in bench_optimizers(config, FLAGS.optimizers, pathlib.Path(FLAGS.workdir) / 'tokenizer', FLAGS.steps,
                                FLAGS.repeats):
        print(json.dumps(r) if FLAGS.json else
              f'{r["optimizer"]}: {1e3 * r["step_s"]:.1f} ms/step, {r["train_tokens_per_s"]:,.0f} tokens/s, '
              f'{r["ratio_to_first"]:.2f}x {FLAGS.optimizers[0]} (compile {r["compile_s"]:.1f} s)', flush=True)
    elif argv[1:] == ['moe'] and FLAGS.config is not None:
      for r in bench_moe(validate(FLAGS.config), pathlib.Path(FLAGS.workdir) / 'tokenizer', FLAGS.experts,
                         FLAGS.top_k, tuple(FLAGS.grouped_impls), FLAGS.steps, FLAGS.repeats):
        print(json.dumps(r) if FLAGS.json else
              f'{r["impl"]}: {1e3 * r["step_s"]:.1f} ms/step, {r["tokens_per_second"]:,.0f} tokens/s, '
              f'{r["vs_dense_active"]:.2f}x dense of the same active FLOPs (compile {r["compile_s"]:.1f} s)',
              flush=True)
    elif len(argv) in (3, 4) and argv[1] == 'matmul_peak':  # A child of bench_train.
      sizes = tuple(int(n) for n in argv[3].split(',')) if len(argv) == 4 else None
      print(metrics.measure_matmul_flops(jax.devices()[0], argv[2], sizes), flush=True)
    elif len(argv) == 1 and FLAGS.config is not None:
      main_train(validate(FLAGS.config))
    else:
      sys.exit(USAGE)
  except (ConfigError, ValueError) as e:
    sys.exit(f'error: {e}')
