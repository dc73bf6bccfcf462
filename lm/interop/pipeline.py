"""`lm.pipeline('text-generation', model=M)`: transformers' text-generation pipeline on lm's decoding.

  from lm import pipeline, set_seed        # was: from transformers import pipeline, set_seed
  generator = pipeline('text-generation', model='gpt2')
  set_seed(42)
  generator("Hello, I'm a language model,", max_length=50, num_return_sequences=3)

M is an lm workdir, a Hugging Face save_pretrained folder of a family lm.kinds converts (imported in
memory), or a Hub name already in the local Hugging Face cache: nothing is downloaded. Calls take
transformers' arguments and give its answers: a string gives [{'generated_text': ...}, ...] (one per
return sequence), a list of strings a list of those. Defaults are transformers' (5.x): the folder's
generation_config.json, then the pipeline's own (sample at temperature 0.7, 256 new tokens), then
generate's (top_k 50, max_length 20). Prompts start as the tokenizer starts a text
(lm.data.tokenizers.prompt_ids, as lm.generate does): as transformers' tokenizer(text) for a Hugging
Face tokenizer; for a run trained here with a document-start token.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from lm import hf, kinds
from lm.config import ConfigError
from lm.data import tokenizers
from lm.inference import decode
from lm.inference.run import SavedRun, unrolled
from lm.parallel import sharding
from lm.training import saved, workdirs

TASKS = ('text-generation',)
# GenerationConfig's global defaults, under the text-generation pipeline's own (transformers 5).
GENERATE_DEFAULTS = {'max_length': 20, 'max_new_tokens': None, 'do_sample': False, 'temperature': 1.0, 'top_k': 50,
                     'top_p': 1.0, 'repetition_penalty': 1.0}
PIPELINE_DEFAULTS = {'max_new_tokens': 256, 'do_sample': True, 'temperature': 0.7}
SAMPLING_KEYS = ('temperature', 'top_k', 'top_p')
_draws = {'seed': 0, 'calls': 0}  # One stream of draws for all pipelines, as PyTorch's global generator.


def set_seed(seed: int) -> None:
  """Restarts the pipelines' draws from `seed` (as transformers.set_seed does PyTorch's)."""
  _draws.update(seed=int(seed), calls=0)


def _next_rng() -> jax.Array:
  _draws['calls'] += 1
  return jax.random.fold_in(jax.random.PRNGKey(_draws['seed']), _draws['calls'])


def _resolve(model: str | os.PathLike) -> tuple[str, pathlib.Path]:
  """('workdir' or 'hf', path) for a workdir, a save_pretrained folder, or a Hub name in the local cache."""
  path = pathlib.Path(model)
  if workdirs.has_checkpoints(path / 'checkpoints') and (path / 'config.json').is_file():
    return 'workdir', path
  if (path / 'config.json').is_file():
    return 'hf', path
  if not path.exists() and str(model).count('/') <= 1:
    hub = hf.require('huggingface_hub')
    try:
      return 'hf', pathlib.Path(hub.snapshot_download(str(model), local_files_only=True))
    except Exception:  # Not in the cache (huggingface_hub's errors differ between versions).
      raise ConfigError(f"model {str(model)!r}: not an lm workdir or a folder, and not in the local Hugging Face "
                        'cache (nothing is downloaded here; fetch it first, e.g. hf download '
                        f'{model})') from None
  raise ConfigError(f'model {str(model)!r}: expected an lm workdir (python -m lm.main) or a save_pretrained folder '
                    '(config.json, model.safetensors, tokenizer.json)')


def _generation_config(kind: str, path: pathlib.Path) -> dict[str, Any]:
  """The generation settings a folder sets apart from generate's defaults (its generation_config.json)."""
  file = path / 'generation_config.json'
  if kind != 'hf' or not file.is_file():
    return {}
  values = json.loads(file.read_text())
  return {k: values[k] for k in GENERATE_DEFAULTS if k in values and values[k] != GENERATE_DEFAULTS[k]}


class TextGenerationPipeline:
  """Continues prompts like transformers' TextGenerationPipeline (see the module doc)."""

  def __init__(self, run: SavedRun, folder_settings: dict[str, Any], clean_up_spaces: bool,
               weights_dtype: str):
    self.run, self.folder_settings, self.clean_up_spaces = run, folder_settings, clean_up_spaces
    self.params = decode.cast_weights(run.params, weights_dtype)

  def settings(self, given: dict[str, Any]) -> dict[str, Any]:
    """The generation settings of a call: given > the folder's > the pipeline's > generate's defaults."""
    chosen = {**self.folder_settings, **{k: v for k, v in given.items() if v is not None}}
    added = {k: v for k, v in PIPELINE_DEFAULTS.items()
             if k not in chosen and not (k == 'max_new_tokens' and 'max_length' in chosen)}
    if not {**chosen, **added}.get('do_sample'):
      added = {k: v for k, v in added.items() if k not in SAMPLING_KEYS}
    return {**GENERATE_DEFAULTS, **added, **chosen}

  def _decode(self, ids: np.ndarray) -> str:
    text = self.run.tokenizer.decode(ids)
    if self.clean_up_spaces:  # transformers' clean_up_tokenization, for tokenizers that ask for it.
      for before, after in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"),
                            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text

  def __call__(self, text_inputs: str | Sequence[str], *, max_length: int | None = None,
               max_new_tokens: int | None = None, num_return_sequences: int = 1, do_sample: bool | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, return_full_text: bool = True, **unsupported):
    if unsupported:
      raise ConfigError(f'text-generation: unsupported argument {sorted(unsupported)[0]!r}; lm takes max_length, '
                        'max_new_tokens, num_return_sequences, do_sample, temperature, top_k, top_p, '
                        'repetition_penalty, return_full_text')
    single = isinstance(text_inputs, str)
    prompts = [text_inputs] if single else list(text_inputs)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ConfigError('text-generation: give a string or a list of strings')
    s = self.settings(dict(max_length=max_length, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty))
    if num_return_sequences > 1 and not s['do_sample']:
      raise ConfigError('Greedy methods without beam search do not support `num_return_sequences` different than 1 '
                        f'(got {num_return_sequences}): pass do_sample=True')
    ids = [tokenizers.prompt_ids(self.run.tokenizer, p) for p in prompts]
    if min(len(i) for i in ids) == 0:
      raise ConfigError('text-generation: an empty prompt (this tokenizer starts no text with a token of its own)')
    if s['max_new_tokens'] is not None:
      budgets = [s['max_new_tokens']] * len(ids)
    else:
      budgets = [s['max_length'] - len(i) for i in ids]
      if min(budgets) < 1:
        raise ConfigError(f'Input length of input_ids is {max(len(i) for i in ids)}, but `max_length` is set to '
                          f"{s['max_length']}: increase `max_length` or, better yet, set `max_new_tokens`")
    sampling = decode.Sampling(s['temperature'] if s['do_sample'] else 0.0, s['top_k'] or 0, s['top_p'],
                               s['repetition_penalty'])
    rows = [i for i in ids for _ in range(num_return_sequences)]
    run = self.run
    with sharding.activate(run.mesh, sharding.logical_axis_rules(run.config.mesh)):
      out = decode.generate_ids(run.model, self.params, rows, max_new_tokens=max(budgets), sampling=sampling,
                                rng=_next_rng(), end_id=run.tokenizer.eos_id,
                                mesh=run.mesh)
    answers = []
    for p, (prompt, budget) in enumerate(zip(prompts, budgets)):
      texts = [self._decode(out[p * num_return_sequences + r][:budget]) for r in range(num_return_sequences)]
      answers.append([{'generated_text': prompt + t if return_full_text else t} for t in texts])
    return answers[0] if single else answers


def pipeline(task: str, model: str | os.PathLike, *, weights_dtype: str = 'float32') -> TextGenerationPipeline:
  """A text-generation pipeline over an lm workdir, a save_pretrained folder, or a cached Hub name
  (see the module doc); weights_dtype 'float32' (as stored), 'bfloat16' or 'int8' (lm.inference.decode.cast_weights)."""
  if task not in TASKS:
    raise ConfigError(f'Unknown task {task!r}, available tasks are {list(TASKS)}')
  decode.cast_weights({}, weights_dtype)  # Refuses an unknown dtype before anything loads.
  kind, path = _resolve(model)
  if kind == 'workdir':
    run = saved.load(path)
  else:
    run = unrolled(hf.read_hf(path))
  config_file = path / 'tokenizer_config.json'
  clean_up = kind == 'hf' and config_file.is_file() and bool(
      json.loads(config_file.read_text()).get('clean_up_tokenization_spaces', False))
  kinds.require_decoder(run.config.model, f'model {str(model)!r}', "the 'text-generation' pipeline")
  return TextGenerationPipeline(run, _generation_config(kind, path), clean_up, weights_dtype)
