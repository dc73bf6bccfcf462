"""Benchmarks that measure side by side in one run and print ratios.

  python -m lm.bench generate [--models=quickstart,gpt2_small] [--batch_sizes=1,8] [--new_tokens=256] [--json]

generate: new tokens per second of lm's KV-cache decoding against `transformers`' generate (PyTorch,
KV cache, same CPU) on the same random GPT-2-shaped weights, greedy on both sides, with a check that
both produce the same tokens. Compilation is timed apart (lm compiles once per shape; PyTorch
needs none). Needs the `hf` extra.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS

PROMPT_LEN = 16
EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'


def _shape(name: str):
  """The experiment config of a benchmark model (GPT-2 shaped)."""
  from lm.config import ConfigError, load_experiment  # pylint: disable=import-outside-toplevel
  files = {'quickstart': 'quickstart.py', 'gpt2_small': 'gpt2.py'}
  if name not in files:
    raise ConfigError(f'--models: unknown model {name!r}; allowed: {", ".join(files)}')
  return load_experiment(EXPERIMENTS / files[name])


def _best_of(repeats: int, run):
  """(the fastest of `repeats` timed calls of run, its result): this machine's timings are noisy."""
  best = None
  for _ in range(repeats):
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    best = (seconds, result) if best is None or seconds < best[0] else best
  return best


def bench_generate(name: str, batch_sizes: list[int], new_tokens: int, with_torch: bool = True,
                   repeats: int = 3) -> list[dict]:
  """One record per batch size: lm's and (with_torch) transformers' new tokens per second, each the
  best of `repeats` runs after a warm-up."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lm import decode, hf  # pylint: disable=import-outside-toplevel
  from lm.config import override, validate  # pylint: disable=import-outside-toplevel
  from lm.model import count_params, make_model  # pylint: disable=import-outside-toplevel

  config = _shape(name)
  max_len = max(config.model.max_len, PROMPT_LEN + new_tokens)  # Learned positions for every token.
  # Layers unrolled, as lm.saved.load gives them for generation.
  config = validate(override(config, {'model.max_len': max_len, 'model.dtype': 'float32', 'model.scan_layers': False,
                                      'data.seq_len': min(config.data.seq_len, max_len)}))
  hf.check_gpt2_shaped(config)
  model = make_model(config)
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))['params']))()
  torch_model = None
  if with_torch:
    torch, transformers = hf.require('torch'), hf.require('transformers')
    torch_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf.hf_config(config, None))).eval()
    state = {k: torch.tensor(v) for k, v in hf.params_to_hf(jax.device_get(params), config).items()}
    torch_model.load_state_dict(state, strict=False)  # lm_head is tied to wte.
    torch_model.tie_weights()
  records = []
  greedy = decode.Sampling(temperature=0.0)
  for batch in batch_sizes:
    prompts = np.random.default_rng(batch).integers(0, config.model.vocab_size, (batch, PROMPT_LEN), np.int32)
    run = lambda: decode.generate_ids(model, params, list(prompts), max_new_tokens=new_tokens, sampling=greedy,
                                      rng=jax.random.PRNGKey(0))
    start = time.perf_counter()
    run()  # Compiles the prefill and the decoding chunk for this batch size.
    compile_s = time.perf_counter() - start
    lm_s, ours = _best_of(repeats, lambda: np.stack(run()))
    record = {'bench': 'generate', 'model': name, 'params': count_params(params), 'batch_size': batch,
              'prompt_tokens': PROMPT_LEN, 'new_tokens': new_tokens, 'new_tokens_per_s': batch * new_tokens / lm_s,
              'lm_seconds': lm_s, 'lm_compile_seconds': compile_s}
    if torch_model is not None:
      with torch.no_grad():
        inputs = torch.from_numpy(prompts.astype(np.int64))
        kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                      eos_token_id=None)
        torch_model.generate(inputs, **(kwargs | {'max_new_tokens': 4, 'min_new_tokens': 4}))  # Warm-up.
        torch_s, theirs = _best_of(repeats, lambda: torch_model.generate(inputs, **kwargs)[:, PROMPT_LEN:].numpy())
      record |= {'torch_new_tokens_per_s': batch * new_tokens / torch_s, 'torch_seconds': torch_s,
                 'speedup': torch_s / lm_s, 'same_tokens': float(np.mean(theirs == ours))}
    records.append(record)
  return records


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_list('models', ['quickstart', 'gpt2_small'], 'Model shapes: quickstart, gpt2_small.')
  flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes to measure.')
  flags.DEFINE_integer('new_tokens', 256, 'New tokens per sequence (after a 16-token prompt).')
  flags.DEFINE_bool('torch', True, 'Measure transformers\' generate alongside.')
  flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (the fastest counts).')
  flags.DEFINE_bool('json', False, 'Print one JSON line per measurement instead of a table.')


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] != 'generate':
    sys.exit('usage: python -m lm.bench generate [--models=...] [--batch_sizes=1,8] [--new_tokens=256] [--json]')
  logging.set_verbosity(logging.WARNING)
  from lm.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    for name in FLAGS.models:
      for r in bench_generate(name, batch_sizes, FLAGS.new_tokens, FLAGS.torch, FLAGS.repeats):
        if FLAGS.json:
          print(json.dumps(r), flush=True)
          continue
        line = (f'{r["model"]} ({r["params"]:,} params) batch {r["batch_size"]}: lm {r["new_tokens_per_s"]:,.0f} '
                f'new tokens/s (compile {r["lm_compile_seconds"]:.1f} s)')
        if 'speedup' in r:
          line += (f', transformers {r["torch_new_tokens_per_s"]:,.0f} new tokens/s: {r["speedup"]:.1f}x; '
                   f'same greedy tokens: {100 * r["same_tokens"]:.0f}%')
        print(line, flush=True)
  except (ConfigError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
