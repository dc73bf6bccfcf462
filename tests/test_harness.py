"""lm.harness: lm as lm-evaluation-harness's model gives the harness's own `hf` backend's numbers on
the same weights (a tiny random Llama with a Llama-3-style tokenizer that starts texts with BOS), on
lm's four offline tasks: a multiple choice, a loglikelihood, a rolling loglikelihood and a generation
task."""

import json
import pathlib
import subprocess
import sys

import jax
import lm_eval
import pytest
import torch
import transformers

from lm import harness, hf
from lm.config import ConfigError
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.harness_tasks import build
from lm.inference import harness as harness_lib
from lm.training import saved
from test_families import SHAPE, _llama3_style
from test_quiet import alarming_lines

TASKS = ['shakespeare_next_line', 'shakespeare_last_word', 'shakespeare_scenes', 'shakespeare_speaker']
LIMIT = 8


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """(save_pretrained folder, lm workdir imported from it) of a random Llama, weights ~N(0, 0.05)."""
  folder = tmp_path_factory.mktemp('harness') / 'hf'
  play = sorted(shakespeare_plays_dir().glob('*/*.md'))[0]
  tokenizer = _llama3_style([normalize_text(play.read_text(encoding='utf-8'))[:50_000]])
  bos, end = tokenizer.token_to_id('<|begin_of_text|>'), tokenizer.token_to_id('<|endoftext|>')
  config = transformers.LlamaConfig(**(SHAPE | {'max_position_embeddings': 128}), vocab_size=tokenizer.get_vocab_size(),
                                    bos_token_id=bos, eos_token_id=end, pad_token_id=end, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.05 + (1.0 if 'norm' in name else 0.0))
  model.save_pretrained(folder)
  tokenizer.save(str(folder / 'tokenizer.json'))
  (folder / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|begin_of_text|>', 'eos_token': '<|endoftext|>'}))
  hf.import_hf(folder, folder.parent / 'run')
  return folder, folder.parent / 'run'


def _run(model, tasks, manager, **kwargs):
  return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=LIMIT, task_manager=manager, log_samples=True,
                                 bootstrap_iters=0, batch_size=4, **kwargs)


def _responses(results, task):
  return [sample['filtered_resps'] for sample in sorted(results['samples'][task], key=lambda s: s['doc_id'])]


@pytest.mark.slow
def test_lm_gives_the_hf_backends_numbers_on_the_same_weights(llama, tmp_path):
  folder, workdir = llama
  manager = harness.task_manager(tasks=TASKS)
  theirs = _run('hf', TASKS, manager, model_args={'pretrained': str(folder), 'dtype': 'float32'}, device='cpu')
  model = harness.HarnessModel(run=saved.load(workdir, devices=jax.devices()[:1]), batch_size=4)
  ours = _run(model, TASKS, manager)
  compared = 0
  for task in TASKS:
    for key, value in theirs['results'][task].items():
      if isinstance(value, float) and 'stderr' not in key:
        assert ours['results'][task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
        compared += 1
  assert compared == 8  # acc, acc_norm; perplexity, acc; word/byte perplexity, bits per byte; exact match.
  # Each document's loglikelihoods agree too, and the generations are the same text.
  for task in TASKS[:3]:
    for mine, hers in zip(_responses(ours, task), _responses(theirs, task), strict=True):
      flat = lambda r: [x for item in r for x in (item if isinstance(item, (list, tuple)) else [item])]
      assert flat(mine) == pytest.approx(flat(hers), rel=1e-5)
  generations = _responses(theirs, 'shakespeare_speaker')
  assert _responses(ours, 'shakespeare_speaker') == generations
  assert any(g[0].strip() for g in generations)  # Not all empty: the comparison means something.

  # On a mesh of 8 devices (parameters sharded over fsdp and data), the same numbers and generations.
  sharded = harness.HarnessModel(run=saved.load(workdir, mesh_shape=(2, 4, 1)), batch_size=4)
  on_mesh = _run(sharded, TASKS[::3], manager)
  expected = {k: v for k, v in harness.flat_metrics(ours).items() if k.split('/')[0] in TASKS[::3]}
  assert harness.flat_metrics(on_mesh) == pytest.approx(expected, rel=1e-6)
  assert _responses(on_mesh, 'shakespeare_speaker') == generations

  # Exact match on a task whose targets are the hf backend's generations for every other document
  # (a task under include_path): both backends score 0.5.
  docs = [json.loads(line) for line in (harness_lib.TASKS_DIR / 'shakespeare_speaker.jsonl').open()][:LIMIT]
  include = tmp_path / 'tasks'
  include.mkdir()
  rows = [{'context': d['context'], 'target': g[0] if i % 2 == 0 else 'NOBODY'}
          for i, (d, g) in enumerate(zip(docs, generations))]
  (include / 'echo.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (include / 'echo.yaml').write_text((harness_lib.TASKS_DIR / 'shakespeare_speaker.yaml').read_text().replace(
      'task: shakespeare_speaker', 'task: echo_speaker').replace('tag: shakespeare', 'tag: echo').replace(
      'custom_dataset: !function utils.speaker\n', f'dataset_path: json\ndataset_kwargs:\n  data_files:\n'
      f'    test: {include / "echo.jsonl"}\n'))
  scores = harness.evaluate(model, ['echo_speaker'], include_path=str(include), limit=LIMIT, bootstrap_iters=0)
  assert scores['results']['echo_speaker']['exact_match,none'] == 0.5
  assert harness.flat_metrics(scores) == {'echo_speaker/exact_match': 0.5}


@pytest.mark.slow
def test_the_command_prints_a_table_and_writes_the_same_json_twice(llama, tmp_path):
  _, workdir = llama
  outputs = []
  for name in ('a.json', 'b.json'):
    done = subprocess.run([sys.executable, '-m', 'lm.harness', f'--workdir={workdir}', '--tasks=shakespeare',
                           '--limit=2', '--batch_size=2', f'--output={tmp_path / name}'],  # Perplexities bootstrap too.
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '|shakespeare_next_line|' in done.stdout and 'acc_norm' in done.stdout
    bad = alarming_lines(done.stdout, done.stderr)
    assert not bad, '\n'.join(bad)
    outputs.append((tmp_path / name).read_text())
  assert outputs[0] == outputs[1]
  results = json.loads(outputs[0])
  assert set(results['results']) == set(TASKS)
  assert results['n-samples']['shakespeare_next_line']['effective'] == 2


@pytest.mark.slow
def test_unknown_tasks_missing_data_and_missing_folders_are_refused_in_one_line(tmp_path):
  (tmp_path / 'lost.yaml').write_text(f'task: lost\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
                                      f'    test: {tmp_path / "gone.jsonl"}\ntest_split: test\n'
                                      'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n')
  with pytest.raises(ConfigError, match="harness task 'lost' cannot load its data: .*gone.jsonl"):
    harness.check_tasks(['lost'], harness.task_manager(str(tmp_path), ['lost']))
  manager = harness.task_manager()
  nearest = r"unknown harness task 'shakespeare_nextline' \(nearest: shakespeare_next_line"
  with pytest.raises(ConfigError, match=nearest):
    harness.check_tasks(['shakespeare_nextline'], manager, load=False)
  with pytest.raises(ConfigError, match='--include_path: no such folder'):
    harness.task_manager('/nonexistent/tasks')
  done = subprocess.run([sys.executable, '-m', 'lm.harness', '--workdir=/nonexistent', '--tasks=shakespeare'],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and done.stderr.startswith('error:') and len(done.stderr.strip().splitlines()) == 1


def test_the_shipped_task_files_are_what_build_writes(tmp_path):
  for path in build.build(tmp_path):
    shipped = pathlib.Path(harness_lib.TASKS_DIR / path.name)
    assert path.read_bytes() == shipped.read_bytes(), path.name
  next_line = [json.loads(line) for line in (tmp_path / 'shakespeare_next_line.jsonl').open()]
  assert len(next_line) == build.DOCS_PER_TASK and all(len(d['choices']) == 4 for d in next_line)
  assert {d['gold'] for d in next_line} == {0, 1, 2, 3}
