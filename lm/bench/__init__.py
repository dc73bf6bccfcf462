"""python -m lm.bench: benchmarks measured side by side in one run (see lm.bench.benchmarks), their
PyTorch side (lm.bench.torch_side, which imports no JAX) and shared timers."""
