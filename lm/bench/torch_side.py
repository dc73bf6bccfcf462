"""The PyTorch side of python -m lm.bench --compare=torch, run by lm.bench.compare_torch as a child
process, one per mode, so that PyTorch and JAX never share a process:

  python -m lm.bench.torch_side SPEC_JSON    # prints one JSON line: torch_peer(SPEC)

Imports no JAX. Needs the `hf` extra.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from lm.bench.timing import best_of, median

try:
  import torch
  import transformers
except ImportError as e:  # lm.bench reports the last line of this child's stderr.
  raise SystemExit(f"error: --compare=torch needs the '{e.name}' package: pip install -e '.[hf]'") from None


def torch_peer(spec: dict) -> dict:
  """Trains transformers' GPT-2 of spec's shape in PyTorch on random tokens: the same batch, AdamW with
  the same settings and gradient clipping, float32; eager, or with spec['compile'] under torch.compile.
  Timed like lm.bench.bench_train (median of windows after warm-up); the first steps' time is the
  compile time."""
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**spec['hf_config'])).train()
  opt = spec['optimizer']
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt['learning_rate'], betas=(opt['b1'], opt['b2']),
                                eps=opt['eps'], weight_decay=opt['weight_decay'])
  vocab, batch, length = spec['hf_config']['vocab_size'], spec['batch_size'], spec['seq_len']
  rng = np.random.default_rng(0)

  def step(forward):
    tokens = torch.from_numpy(rng.integers(0, vocab, (batch, length + 1)))
    logits = forward(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if opt['grad_clip_norm']:
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt['grad_clip_norm'])
    optimizer.step()
    return float(loss)

  forward = lambda x: model(input_ids=x).logits
  if spec['compile']:
    forward = torch.compile(forward)
  start = time.perf_counter()
  for _ in range(2):
    step(forward)
  warmup_s = time.perf_counter() - start
  windows = []
  for _ in range(spec['repeats']):
    start = time.perf_counter()
    for _ in range(spec['steps']):
      loss = step(forward)
    windows.append((time.perf_counter() - start) / spec['steps'])
  step_s = median(windows)
  floor_s = 0.0  # lm's train step's matmuls (lm.bench.matmuls), each timed alone, as bench_train times them for lm.
  with torch.no_grad():
    for lhs_shape, rhs_shape, spec_, times in spec['matmuls']:
      lhs, rhs = torch.randn(lhs_shape), torch.randn(rhs_shape)
      torch.einsum(spec_, lhs, rhs)
      floor_s += times * best_of(5, lambda spec_=spec_, lhs=lhs, rhs=rhs: torch.einsum(spec_, lhs, rhs))[0]
  size = 2048  # PyTorch's own dense matmul rate on this machine, for reference.
  a = torch.randn(size, size)
  best = best_of(3, lambda: a @ a)[0]
  return {'mode': 'compile' if spec['compile'] else 'eager', 'step_s': step_s, 'step_s_windows': windows,
          'tokens_per_s': batch * length / step_s, 'warmup_s': warmup_s, 'threads': torch.get_num_threads(),
          'torch_version': torch.__version__, 'params': sum(p.numel() for p in model.parameters()),
          'matmul_flops': 2 * size**3 / best, 'final_loss': loss, 'matmul_floor_s': floor_s,
          'matmul_floor_share': floor_s / step_s}


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m lm.bench.torch_side SPEC_JSON  (run by python -m lm.bench --compare=torch)')
  print(json.dumps(torch_peer(json.loads(sys.argv[1]))), flush=True)
