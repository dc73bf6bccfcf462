"""Sweeps declared beside experiments (python -m lm.sweep): points, runs, launching."""
