"""lm.pipeline('text-generation'): the same answers as transformers' pipeline on a random GPT-2 folder
(greedy texts equal exactly), its defaults taken from the folder, the seed's snippet from a Hub cache,
and the one-line refusals."""

import json
import shutil

import huggingface_hub
import pytest
import transformers

import lm
from lm import hf, pipeline, set_seed
from lm.config import ConfigError
from test_hf import hf_gpt2  # noqa: F401 (the fixture)

PROMPTS = ['To be, or not to be', 'Now is the winter', 'O']


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_greedy_answers_equal_transformers_pipeline(hf_gpt2, tmp_path):  # noqa: F811
  folder = hf_gpt2[0]
  theirs, ours = transformers.pipeline('text-generation', model=str(folder)), lm.pipeline('text-generation',
                                                                                          model=folder)
  calls = [(PROMPTS[0], dict(max_length=30)),
           (PROMPTS, dict(max_length=24)),  # Each prompt gets max_length - its own length.
           (PROMPTS, dict(max_new_tokens=12, return_full_text=False)),
           (PROMPTS[1], dict(max_new_tokens=9, repetition_penalty=1.3))]
  for prompts, kwargs in calls:
    expected = theirs(prompts, do_sample=False, **kwargs)
    assert ours(prompts, do_sample=False, **kwargs) == expected, kwargs
  assert isinstance(expected, list) and set(expected[0]) == {'generated_text'}
  # An lm workdir of the same model answers the same.
  hf.import_hf(folder, tmp_path / 'imported')
  assert lm.pipeline('text-generation', model=tmp_path / 'imported')(PROMPTS, do_sample=False, max_length=24) == \
      theirs(PROMPTS, do_sample=False, max_length=24)


def test_defaults_come_from_the_folder(hf_gpt2, tmp_path):  # noqa: F811
  folder = tmp_path / 'greedy_gpt2'
  shutil.copytree(hf_gpt2[0], folder)
  settings = json.loads((folder / 'generation_config.json').read_text())
  # The pipeline samples (its default), here from the single most likely token: deterministic.
  (folder / 'generation_config.json').write_text(json.dumps(settings | {'top_k': 1, 'max_new_tokens': 7}))
  expected = transformers.pipeline('text-generation', model=str(folder))(PROMPTS)
  assert lm.pipeline('text-generation', model=folder)(PROMPTS) == expected
  # Without such settings the pipeline samples (temperature 0.7, top_k 50) 256 new tokens at most.
  pipe = lm.pipeline('text-generation', model=hf_gpt2[0])
  assert pipe.settings({}) | {} == {'max_length': 20, 'max_new_tokens': 256, 'do_sample': True, 'temperature': 0.7,
                                    'top_k': 50, 'top_p': 1.0, 'repetition_penalty': 1.0}
  assert pipe.settings({'do_sample': False, 'max_length': 30})['max_new_tokens'] is None


def test_the_seed_snippet_runs_from_the_hub_cache(hf_gpt2, tmp_path, monkeypatch):  # noqa: F811
  snapshot = tmp_path / 'hub' / 'models--gpt2' / 'snapshots' / ('0' * 40)
  shutil.copytree(hf_gpt2[0], snapshot)
  (tmp_path / 'hub' / 'models--gpt2' / 'refs').mkdir()
  (tmp_path / 'hub' / 'models--gpt2' / 'refs' / 'main').write_text('0' * 40)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
  monkeypatch.chdir(tmp_path)

  generator = pipeline('text-generation', model='gpt2')
  set_seed(42)
  answers = generator("Hello, I'm a language model,", max_length=50, num_return_sequences=3)
  assert len(answers) == 3 and all(a['generated_text'].startswith("Hello, I'm a language model,") for a in answers)
  assert len({a['generated_text'] for a in answers}) == 3  # Sampled: three different continuations.
  set_seed(42)
  assert generator("Hello, I'm a language model,", max_length=50, num_return_sequences=3) == answers  # Seeded.
  set_seed(43)
  assert generator("Hello, I'm a language model,", max_length=50, num_return_sequences=3) != answers
  with pytest.raises(ConfigError, match="model 'gpt3': not an lm workdir or a folder, and not in the local Hugging "
                                        'Face cache'):
    pipeline('text-generation', model='gpt3')


def test_bad_arguments_get_one_line(hf_gpt2):  # noqa: F811
  pipe = lm.pipeline('text-generation', model=hf_gpt2[0])
  cases = [(lambda: lm.pipeline('summarization', model=hf_gpt2[0]),
            "Unknown task 'summarization', available tasks are ['text-generation']"),
           (lambda: pipe('To be', num_return_sequences=3, do_sample=False),
            'Greedy methods without beam search do not support `num_return_sequences` different than 1 (got 3)'),
           (lambda: pipe('To be ' * 40, max_new_tokens=4), 'a prompt of 200 tokens leaves no room in the context of '
                                                           'model.max_len=64 tokens'),
           (lambda: pipe('To be, or not to be', max_length=3), 'Input length of input_ids is 12, but `max_length` '
                                                               'is set to 3'),
           (lambda: pipe('To be', num_beams=4), "unsupported argument 'num_beams'"),
           (lambda: lm.pipeline('text-generation', model=hf_gpt2[0], weights_dtype='int4'),
            "weights_dtype='int4': must be one of")]
  for call, message in cases:
    with pytest.raises(ConfigError) as e:
      call()
    assert message in str(e.value) and '\n' not in str(e.value)
