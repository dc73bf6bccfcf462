"""Every notebook runs top to bottom on its smoke setting (each sweep point trains 4 steps), and its
committed .ipynb and plain-text .py (jupytext) hold the same cells. The notebooks with the most
points run in test_notebooks_more.py, so that the two test workers share the load."""

from __future__ import annotations

import json
import pathlib

import jupytext
import nbclient
import nbformat
import pytest

from conftest import ROOT
from lm.analysis import results
from lm.sweeps import runs as sweep_runs

NOTEBOOKS = ROOT / 'notebooks'
NAMES = sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb'))
ELSEWHERE = ('learning_rate', 'optimizers', 'scaling')  # Run by test_notebooks_more.py.


def test_every_ablation_has_a_notebook_and_every_notebook_its_pair():
  ablations = sorted(p.stem for p in (ROOT / 'experiments' / 'ablations').glob('*.py') if p.stem != 'base')
  assert NAMES == ablations
  for name in NAMES:
    committed = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
    text = jupytext.read(NOTEBOOKS / f'{name}.py')
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in text.cells], \
        f'notebooks/{name}.ipynb and .py differ: run jupytext --sync notebooks/{name}.ipynb'
    assert committed.metadata['jupytext']['formats'] == 'ipynb,py:percent'
    code = [c for c in committed.cells if c.cell_type == 'code']
    assert all(c.get('outputs') is not None and c.execution_count for c in code), \
        f'{name}.ipynb is committed unexecuted'
    errors = [o for c in code for o in c.outputs if o.output_type == 'error']
    assert not errors, f'{name}.ipynb is committed with an error output'


@pytest.mark.parametrize('name', [n for n in NAMES if n not in ELSEWHERE])
@pytest.mark.slow
def test_notebook_runs_on_its_smoke_setting(name, tfds_dir, compile_cache, tmp_path, monkeypatch):
  run_smoke(name, tfds_dir, compile_cache, tmp_path, monkeypatch)


def run_smoke(name: str, tfds_dir: str, compile_cache: str, tmp_path: pathlib.Path, monkeypatch) -> None:
  """Executes notebooks/name.ipynb with SMOKE = True into tmp_path, and checks what it left there."""
  notebook = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  for cell in notebook.cells:
    cell.outputs = [] if cell.cell_type == 'code' else cell.get('outputs')
  at = next(i for i, c in enumerate(notebook.cells) if 'parameters' in c.metadata.get('tags', []))
  workdir = tmp_path / name
  overrides = {'data.tfds_data_dir': tfds_dir}
  notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
      f'SMOKE = True\nWORKDIR = {str(workdir)!r}\nOVERRIDES = {overrides!r}'))
  monkeypatch.setenv('PYTHONPATH', str(ROOT))
  # Smoke runs are mostly compiling: the kernel inherits conftest's XLA_FLAGS, and reuses what other
  # notebooks compiled (the baseline recurs; learning rates share init and eval).
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', compile_cache)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.

  experiment = str(ROOT / 'experiments' / 'ablations' / f'{name}.py')
  points = sweep_runs.expand(f'{experiment}:smoke', workdir, overrides)
  runs = results.load_runs(workdir)
  assert list(runs['run']) == [p.name for p in points] and set(runs['status']) == {'done'}
  assert (runs['step'] == runs['train.steps']).all() and runs['train.steps'].max() == 4
  assert runs['eval/bits_per_byte'].notna().all()
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  assert any('image/png' in o.get('data', {}) for o in outputs), 'no figure drawn'
  manifest = json.loads((workdir / sweep_runs.MANIFEST).read_text())
  assert manifest['arg'] == 'smoke' and manifest['overrides'] == overrides
