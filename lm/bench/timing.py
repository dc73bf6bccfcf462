"""Timers shared by python -m lm.bench and its PyTorch child, lm.bench.torch_side (which imports no JAX)."""

from __future__ import annotations

import time


def best_of(repeats: int, run):
  """(the fastest of `repeats` timed calls of run, its result): this machine's timings are noisy."""
  best = None
  for _ in range(repeats):
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    best = (seconds, result) if best is None or seconds < best[0] else best
  return best


def median(values: list[float]) -> float:
  return sorted(values)[len(values) // 2]
