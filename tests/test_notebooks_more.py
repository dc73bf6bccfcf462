"""The notebooks with the most sweep points, on their smoke setting (see test_notebooks.py)."""

from __future__ import annotations

import pytest

from test_notebooks import ELSEWHERE, run_smoke


@pytest.mark.parametrize('name', ELSEWHERE)
@pytest.mark.slow
def test_notebook_runs_on_its_smoke_setting(name, tfds_dir, compile_cache, tmp_path, monkeypatch):
  run_smoke(name, tfds_dir, compile_cache, tmp_path, monkeypatch)
