"""The house rules of lm/: commands at the top, everything else in packages by job that import each
other without a cycle, small modules, imports tools can see, and no flag defined by an import."""

import ast
import collections
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT

LM = ROOT / 'lm'
COMMANDS = {'main', 'generate', 'evaluate', 'tokenize', 'hf', 'harness', 'plan', 'sweep'}  # python -m lm.X
MAX_LINES = 400


def _module(path: pathlib.Path) -> str:
  return '.'.join(path.relative_to(ROOT).with_suffix('').parts).removesuffix('.__init__')


def _imports(path: pathlib.Path) -> set[str]:
  """The lm modules a file imports, at its top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'lm':
      found |= {f'{node.module}.{a.name}' for a in node.names} if node.module == 'lm' else {node.module}
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split('.')[0] == 'lm'}
  return found


def _node(module: str) -> str | None:
  """A module's place in the package graph: lm's subpackage, or the top-level module itself."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else None


def package_graph() -> dict[str, set[str]]:
  graph = collections.defaultdict(set)
  for path in LM.rglob('*.py'):
    source = _node(_module(path))
    for target in map(_node, _imports(path)):
      if source and target and target != source:
        graph[source].add(target)
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle of the graph (a list of nodes, the first repeated at the end), or []."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = 'done'
    stack.pop()
    return []

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return []


def test_the_cycle_finder_finds_cycles():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b', 'c'}, 'b': {'c'}}) == []


def test_the_packages_import_each_other_without_a_cycle():
  graph = package_graph()
  assert {'nn', 'training', 'inference', 'parallel'} <= set(graph)
  assert _cycle(graph) == []
  assert not graph['nn'] - {'config'} and not graph['parallel'] - {'config'}  # The bottom of the house.
  assert 'training' not in graph['inference']  # Generation runs without the training code.


def test_the_top_level_holds_only_commands():
  top = {p.stem for p in LM.glob('*.py')} - {'__init__', 'cli'}
  packages = {p.name for p in LM.iterdir() if (p / '__init__.py').exists()}
  assert top == COMMANDS, top ^ COMMANDS
  assert {'bench', 'config'} <= packages and (LM / 'bench' / '__main__.py').exists()  # python -m lm.bench, lm.config


def test_modules_are_small():
  sizes = {_module(p): len(p.read_text(encoding='utf-8').splitlines()) for p in LM.rglob('*.py')}
  assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_lm_imports_its_own_modules_where_tools_see_them():
  for path in LM.rglob('*.py'):
    text = path.read_text(encoding='utf-8')
    assert not re.search(r"(import_module|__import__)\('lm[.']", text), path


@pytest.mark.slow
def test_importing_a_command_defines_no_flag_and_the_results_module_none_either():
  modules = [f'lm.{c}' for c in sorted(COMMANDS)] + ['lm.bench.benchmarks', 'lm.analysis.results']
  script = ('from absl import flags\n'
            f'import {", ".join(modules)}\n'
            "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.split('.')[0] in ('lm', '__main__')))\n")
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == '[]'


def test_the_results_module_imports_without_jax_or_the_model():
  script = ('import sys\nimport lm.analysis.results\n'
            "print(sorted(m for m in ('jax', 'flax', 'lm.nn', 'lm.kinds', 'lm.training.metrics') if m in sys.modules))")
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert (done.returncode, done.stdout.strip()) == (0, '[]'), done.stderr[-3000:]
