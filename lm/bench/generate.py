"""python -m lm.bench generate: new tokens per second of lm's KV-cache decoding against transformers'
generate on the same random weights, with the bytes each decoding step reads against the measured bandwidth.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import hf, kinds
from lm.bench.timing import best_of
from lm.config import ConfigError, load_experiment, override, validate
from lm.inference import decode
from lm.kinds import make_model
from lm.nn.layers import head_width
from lm.nn.model import count_params

PROMPT_LEN = 16
EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / 'experiments'


# The quickstart's sizes in GPT-2's layout (its own RoPE and SwiGLU have no transformers GPT-2 twin), at
# the width of 96 the generation figures in docs/speed.md were measured with (the quickstart is 160 wide now).
_GPT2_LAYOUT = {'model.positions': 'learned', 'model.mlp': 'gelu', 'model.mlp_dim': 0, 'model.d_model': 96}


def bench_model_config(name: str):
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
  config = bench_model_config(name)
  max_len = max(config.model.max_len, PROMPT_LEN + new_tokens)  # Learned positions for every token.
  # Layers unrolled, as lm.training.saved.load gives them for generation.
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
