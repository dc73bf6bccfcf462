"""python -m lm.bench harness: lm.harness against lm-evaluation-harness's own hf backend on the same
random model, tasks and CPU.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import tempfile
import time

from lm import hf, kinds
from lm.bench.generate import bench_model_config
from lm.config import override, validate
from lm.data import tokenizers
from lm.data.builders import SHAKESPEARE_VALIDATION_PLAYS, normalize_text, shakespeare_plays_dir
from lm.nn.model import count_params


def bench_harness(name: str, tasks: list[str], limit: int | None, batch_size: int) -> dict:
  """lm.harness against lm-evaluation-harness's own hf backend on the same random model (built with
  transformers, imported with lm.hf), tasks and CPU: seconds of each backend's first run (lm compiles
  then; the hf backend's model is loaded before) and second run, and the largest relative difference
  between their metrics."""
  from lm import harness  # noqa: PLC0415 (only here: it brings in lm-eval, torch and datasets)
  harness.require_harness()
  transformers = hf.require('transformers')
  huggingface = importlib.import_module('lm_eval.models.huggingface')
  config = validate(override(bench_model_config(name), {'model.dtype': 'float32', 'model.scan_layers': False}))
  folder = pathlib.Path(tempfile.mkdtemp(prefix='lm-bench-harness-'))
  plays = sorted(p for p in shakespeare_plays_dir().glob('*/*.md') if p.stem not in SHAKESPEARE_VALIDATION_PLAYS)
  tokenizer = tokenizers.train_byte_level_bpe([normalize_text(p.read_text(encoding='utf-8')) for p in plays],
                                              config.model.vocab_size)
  end = tokenizer.token_to_id('<|endoftext|>')
  hf_config = kinds.hf_family_of(config.model).hf_config(config.model, end, end)
  hf_config = transformers.AutoConfig.for_model(hf_config.pop('model_type'), **hf_config)
  transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder / 'hf')  # transformers' init.
  tokenizer.save(str(folder / 'hf' / 'tokenizer.json'))
  (folder / 'hf' / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>'}))
  hf.import_hf(folder / 'hf', folder / 'run')
  manager = harness.task_manager(tasks=tasks)
  harness.check_tasks(tasks, manager)
  backends = {'lm': harness.HarnessModel(str(folder / 'run'), batch_size=batch_size),
              'hf': huggingface.HFLM(pretrained=str(folder / 'hf'), dtype='float32', batch_size=batch_size,
                                     device='cpu')}
  seconds, scores = {}, {}
  for backend, model in backends.items():
    for attempt in ('first', 'second'):
      start = time.perf_counter()
      scores[backend] = harness.flat_metrics(harness.evaluate(model, tasks, limit=limit, manager=manager,
                                                              bootstrap_iters=0, check=False))
      seconds[f'{backend}_{attempt}_s'] = time.perf_counter() - start
  difference = max(abs(scores['lm'][k] - v) / max(abs(v), 1e-12) for k, v in scores['hf'].items())
  return {'bench': 'harness', 'model': name, 'params': count_params(backends['lm'].run.params), 'tasks': tasks,
          'limit': limit, 'batch_size': batch_size, **seconds,
          'speedup': seconds['hf_second_s'] / seconds['lm_second_s'],
          'max_relative_difference': difference, 'metrics': scores['lm']}
