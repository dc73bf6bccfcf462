"""python -m lm.bench: see lm.bench.benchmarks."""

from lm import cli
from lm.bench import benchmarks

benchmarks.define_flags()
cli.run(benchmarks.main)
