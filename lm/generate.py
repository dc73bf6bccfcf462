"""Text from a trained (or imported) model:

  python -m lm.generate --workdir=runs/qs --prompt='**HAMLET**' --num_return_sequences=3 --top_p=0.9
  python -m lm.generate --workdir=runs/qs --prompts_file=prompts.txt --greedy --max_new_tokens=64

Or from Python: `from lm.generate import generate; generate('runs/qs', ['**HAMLET**'], top_k=40)`.
Each prompt starts as the run's tokenizer starts a text (lm.data.tokenizers.prompt_ids): lm's own
tokenizers and Llama's put the document-start token first, GPT-2's and Qwen's add none (as
transformers' tokenizer(text) does). Prompts of different lengths are left-padded into one batch.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

from absl import flags
import jax
import numpy as np

from lm import cli, kinds
from lm.config import ConfigError
from lm.data import tokenizers
from lm.inference import decode
from lm.inference.run import SavedRun
from lm.parallel import sharding
from lm.training import saved

FLAGS = flags.FLAGS


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """text up to (not including) the first of the stop strings in it, and whether one was."""
  cuts = [text.index(s) for s in stop if s in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def check_request(max_new_tokens: int | None, num_return_sequences: int, greedy: bool, temperature: float,
                  flag: str = '') -> None:
  """A ConfigError in one line for a request no model can answer; flag='--' names the command's flags."""
  if max_new_tokens is not None and max_new_tokens < 1:
    raise ConfigError(f'{flag}max_new_tokens={max_new_tokens}: must be >= 1 (default 128; or give {flag}max_length, '
                      'prompt plus new tokens)')
  if num_return_sequences < 1:
    raise ConfigError(f'{flag}num_return_sequences={num_return_sequences}: must be >= 1')
  if num_return_sequences > 1 and (greedy or temperature == 0):
    name, fix = (('--num_return_sequences', 'leave out --greedy and give a --temperature above 0') if flag else
                 ('`num_return_sequences`', 'pass greedy=False and a temperature above 0'))
    raise ConfigError(f'Greedy methods without beam search do not support {name} different than 1 '
                      f'(got {num_return_sequences}): {fix}')


def generate(run, prompts: str | Sequence[str], *, max_new_tokens: int | None = None, max_length: int | None = None,
             num_return_sequences: int = 1, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             stop_at_end: bool = True, seed: int = 0, weights_dtype: str = 'float32') -> list[list[str]]:
  """num_return_sequences continuations (text after the prompt) of each prompt.

  run: a workdir (str or path) or an lm.training.SavedRun (load once, generate many times).
  max_new_tokens: tokens to add (default 128); or max_length: prompt tokens plus new tokens, as
  in `transformers` (max_new_tokens wins when both are given). Either way at most what fits in
  model.max_len after the longest prompt.
  greedy (or temperature 0): the most likely token each step (then num_return_sequences must be 1);
  otherwise a draw at `temperature` from the top_k most likely tokens (0: all) and the top_p nucleus,
  after a repetition penalty.
  stop: strings that end a continuation (cut before them); stop_at_end: so does the end-of-text
  (document-start) token. seed: the same seed, prompts and settings give the same text.
  weights_dtype: 'float32' (as stored), or the projections' weights in 'bfloat16' or 'int8'
  (lm.inference.decode.cast_weights).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts:
    raise ConfigError('no prompts given')
  check_request(max_new_tokens, num_return_sequences, greedy, temperature)
  run = run if isinstance(run, SavedRun) else saved.load(run)
  kinds.require_decoder(run.config.model, repr(str(run.workdir)), 'lm.generate')
  params = decode.cast_weights(run.params, weights_dtype)
  tokenizer = run.tokenizer
  sampling = decode.Sampling(0.0 if greedy else temperature, top_k, top_p, repetition_penalty)
  decode.check_sampling(sampling)
  ids = [tokenizers.prompt_ids(tokenizer, p) for p in prompts]
  if min(len(i) for i in ids) == 0:
    end = f' (its end-of-text token {tokenizer.token(tokenizer.eos_id)!r} starts from nothing)' \
        if hasattr(tokenizer, 'token') else ''
    raise ConfigError(f'an empty prompt: this tokenizer starts no text with a token of its own; give text{end}')
  longest = max(len(i) for i in ids)
  if max_new_tokens is None:
    max_new_tokens = 128 if max_length is None else max_length - longest
  if max_new_tokens < 1:
    raise ConfigError(f'max_length={max_length} leaves no new tokens after a prompt of {longest} tokens')
  rows = [i for i in ids for _ in range(num_return_sequences)]
  finished = None
  if stop:
    finished = lambda out: np.array([_cut_at_stop(tokenizer.decode(r), stop)[1] for r in out])
  with sharding.activate(run.mesh, sharding.logical_axis_rules(run.config.mesh)):
    out = decode.generate_ids(run.model, params, rows, max_new_tokens=max_new_tokens, sampling=sampling,
                              rng=jax.random.PRNGKey(seed), end_id=tokenizer.eos_id if stop_at_end else -1,
                              finished=finished, mesh=run.mesh)
  texts = [_cut_at_stop(tokenizer.decode(r), stop)[0] for r in out]
  return [texts[i:i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]


def _unescape(text: str) -> str:
  return text.replace('\\n', '\n').replace('\\t', '\t')


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('workdir', None, 'A run\'s workdir (python -m lm.main, or python -m lm.hf import).')
  flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat the flag for several); \\n means a newline.')
  flags.DEFINE_string('prompts_file', None, 'A file of prompts, one per line (\\n means a newline).')
  flags.DEFINE_integer('step', None, 'The checkpoint to use (default: the latest).')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate per sequence (default 128).')
  flags.DEFINE_integer('max_length', None, 'Or: prompt plus new tokens, in tokens.')
  flags.DEFINE_integer('num_return_sequences', 1, 'Continuations per prompt.')
  flags.DEFINE_bool('greedy', False, 'Take the most likely token each step.')
  flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (0: greedy).')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of tokens with this much probability.')
  flags.DEFINE_float('repetition_penalty', 1.0, 'Above 1, tokens already seen become less likely.')
  flags.DEFINE_multi_string('stop', [], 'A string that ends a continuation (repeatable; \\n means a newline).')
  flags.DEFINE_integer('seed', 0, 'Random seed of the sampling.')
  flags.DEFINE_enum('weights_dtype', 'float32', ['float32', 'bfloat16', 'int8'],
                    'The projections\' weights as stored, in bfloat16, or in int8 with per-column scales.')
  flags.DEFINE_bool('json', False, 'Print one JSON line per prompt: {"prompt": ..., "continuations": [...]}.')


def main(argv: list[str]) -> None:
  cli.start(argv, ('workdir',), 'python -m lm.generate --workdir=runs/qs --prompt="**HAMLET**"')
  prompts = [_unescape(p) for p in FLAGS.prompt]
  if FLAGS.prompts_file:
    path = pathlib.Path(FLAGS.prompts_file)
    if not path.is_file():
      sys.exit(f'error: --prompts_file: no such file {str(path)!r}')
    prompts += [_unescape(line) for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
  if not prompts:
    sys.exit('error: give --prompt or --prompts_file')
  try:
    check_request(FLAGS.max_new_tokens, FLAGS.num_return_sequences, FLAGS.greedy, FLAGS.temperature, flag='--')
    run = saved.load(FLAGS.workdir, FLAGS.step)
    outputs = generate(run, prompts, max_new_tokens=FLAGS.max_new_tokens, max_length=FLAGS.max_length,
                       num_return_sequences=FLAGS.num_return_sequences, greedy=FLAGS.greedy,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       repetition_penalty=FLAGS.repetition_penalty,
                       stop=[_unescape(s) for s in FLAGS.stop], seed=FLAGS.seed, weights_dtype=FLAGS.weights_dtype)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  for prompt, continuations in zip(prompts, outputs):
    if FLAGS.json:
      print(json.dumps({'prompt': prompt, 'continuations': continuations}))
      continue
    for i, text in enumerate(continuations):
      print(f'=== {i + 1}/{len(continuations)} ===\n{prompt}{text}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
