"""lm as a model of EleutherAI's lm-evaluation-harness (the `eval` extra): loglikelihoods from one jitted
forward pass over padded batches, generation from lm's KV-cache decoding, tokenization as the harness's
`hf` backend does; the harness's task manager with lm's offline tasks (lm/harness_tasks/), task checks,
and its results as flat metrics. The command is python -m lm.harness; the training loop's harness hook
uses this module on its own parameters."""

from __future__ import annotations

import collections
import difflib
import functools
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import kinds
from lm.config import ConfigError
from lm.data import tokenizers
from lm.inference import decode
from lm.inference.run import SavedRun
from lm.nn.model import apply_model
from lm.parallel import sharding

try:  # Optional: the `eval` extra.
  import lm_eval
  from lm_eval import utils as harness_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
  from lm_eval.tasks import TaskManager
except ImportError:
  lm_eval = None
  TemplateLM = object

# The harness bootstraps perplexities' standard errors in a multiprocessing pool: a fork of this process,
# which JAX's threads make unsafe (JAX warns 'os.fork() was called ... will likely lead to a deadlock').
# Its single-process path draws the same resamples (each chunk of 1000 seeded by its index).
os.environ.setdefault('DISABLE_MULTIPROC', '1')

TASKS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'harness_tasks'
MIN_BUCKET = 16  # Rows are padded to a power of two at least this long: a compile per bucket.
# What differs between two runs of the same command: left out of --output, so the JSON repeats.
_UNREPEATABLE = ('date', 'start_time', 'end_time', 'total_evaluation_time_seconds')


def require_harness() -> None:
  if lm_eval is None:
    raise ConfigError("downstream tasks need lm-evaluation-harness: pip install -e '.[eval]'")


@functools.partial(jax.jit, static_argnames=('model',))
def continuation_scores(params, tokens_BT: jax.Array, scored_BL: jax.Array, *, model) -> tuple[jax.Array, jax.Array]:
  """Per row: the summed log-probability of the tokens at the scored positions (of tokens_BT[:, 1:],
  each predicted from those before it), and whether each of them was the most likely token."""
  logits_BLV = apply_model(model, params, {'tokens': tokens_BT}).astype(jnp.float32)
  targets_BL = tokens_BT[:, 1:]
  logprobs_BL = jnp.take_along_axis(jax.nn.log_softmax(logits_BLV, axis=-1), targets_BL[..., None], axis=-1)[..., 0]
  greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
  return jnp.sum(jnp.where(scored_BL, logprobs_BL, 0.0), axis=1), jnp.all(greedy_BL | ~scored_BL, axis=1)


def length_bucket(length: int, max_len: int) -> int:
  """Positions a batch of rows up to `length` tokens is padded to: the next power of two, at least
  MIN_BUCKET, at most max_len."""
  return min(max_len, max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


class RunModel(TemplateLM):
  """A run in memory (an lm.inference.run.SavedRun) as an lm-evaluation-harness model. Loglikelihoods
  come from one jitted forward pass over batches of batch_size rows padded to a few lengths (powers of
  two: a compile each), generation from lm's KV-cache decoding; tokenization, truncation to the context
  and stop sequences follow the harness's `hf` backend, so the same weights give its numbers. (The
  harness's registered 'lm' model, which reads a workdir, is lm.harness.HarnessModel.)"""

  def __init__(self, run: SavedRun, batch_size: int | str = 8, max_gen_toks: int | str = 256,
               seed: int | str = 0, **unused):
    super().__init__()
    require_harness()
    kinds.require_decoder(run.config.model, repr(str(run.workdir)), 'the harness backend')
    self.run = run
    self.text_tokenizer = run.tokenizer
    self.batch_size = 8 if str(batch_size).startswith('auto') else int(batch_size)
    if self.batch_size < 1:
      raise ConfigError(f'batch_size={batch_size}: must be >= 1')
    self.max_length = run.config.model.max_len
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    self._rules = sharding.logical_axis_rules(run.config.mesh)

  @property
  def eot_token_id(self) -> int:
    return self.text_tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.text_tokenizer.bos_id

  def _special_text(self, token_id: int) -> str | None:
    """A special token as text (a Hugging Face tokenizer's), or None where text never holds it."""
    token = getattr(self.text_tokenizer, 'token', None)
    return token(token_id) if token is not None else None

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **unused) -> list[int]:
    """The text's ids, started as lm.generate starts a prompt (tokenizers.prompt_ids) unless
    add_special_tokens=False or the text already starts with its BOS (as the hf backend checks)."""
    bos_text = self._special_text(self.prefix_token_id)
    add = add_special_tokens is not False and not (add_special_tokens is None and bos_text and
                                                   string.startswith(bos_text))
    tok = self.text_tokenizer
    return (tokenizers.prompt_ids(tok, string) if add else tok.encode(string)).tolist()

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.text_tokenizer.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **unused) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether greedy decoding gives it) of each
    (key, context ids, continuation ids), the sequence cut to the last max_length + 1 tokens."""
    rows = [((context + continuation)[-(self.max_length + 1):], len(continuation))
            for _, context, continuation in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # Similar lengths share a batch.
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    with sharding.activate(self.run.mesh, self._rules):
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        width = length_bucket(max(len(rows[i][0]) for i in batch) - 1, self.max_length)
        tokens_BT = np.full((self.batch_size, width + 1), self.text_tokenizer.pad_id, np.int32)
        scored_BL = np.zeros((self.batch_size, width), bool)
        for row, i in enumerate(batch):
          ids, scored = rows[i]
          tokens_BT[row, :len(ids)] = ids
          scored_BL[row, len(ids) - 1 - scored:len(ids) - 1] = True
        sums_B, greedy_B = sharding.to_host(continuation_scores(
            self.run.params, *sharding.replicated(self.run.mesh, (tokens_BT, scored_BL)), model=self.run.model))
        for row, i in enumerate(batch):
          results[i] = (float(sums_B[row]), bool(greedy_B[row]))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-probability, read in disjoint windows of max_length tokens after the prefix token."""
    windows, counts = [], []
    for (text,) in (r.args for r in requests):
      pairs = [harness_utils.make_disjoint_window(w) for w in harness_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)]
      windows += [(None, context, continuation) for context, continuation in pairs]
      counts.append(len(pairs))
    scores = iter(self._loglikelihood_tokens(windows))
    return [sum(next(scores)[0] for _ in range(count)) for count in counts]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each context's continuation up to its stop sequences (or max_gen_toks tokens, or the end
    token): greedy unless the task asks to sample (then drawn with the model's seed)."""
    groups = collections.defaultdict(list)
    for i, (_, gen_kwargs) in enumerate(r.args for r in requests):
      groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(i)
    results = [''] * len(requests)
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop('until', None), eos=self._special_text(self.eot_token_id))
      max_new = kwargs.pop('max_gen_toks')
      if max_new >= self.max_length:
        raise ConfigError(f'a task asks for {max_new} new tokens: the model\'s whole context is '
                          f'model.max_len={self.max_length} tokens')
      temperature = float(kwargs.get('temperature') or 0.0) if kwargs.get('do_sample') else 0.0
      sampling = decode.Sampling(temperature, int(kwargs.get('top_k') or 0), float(kwargs.get('top_p') or 1.0))
      prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or [self.prefix_token_id]
                 for i in indices}
      order = sorted(indices, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        rows = [np.asarray(prompts[i], np.int32) for i in batch]
        rows += [rows[0]] * (self.batch_size - len(rows))  # Same shapes every batch: no new compiles.
        finished = lambda out: np.array([any(s in self.tok_decode(r) for s in until if s) for r in out])
        with sharding.activate(self.run.mesh, self._rules):
          out = decode.generate_ids(self.run.model, self.run.params, rows, max_new_tokens=max_new, sampling=sampling,
                                    rng=jax.random.PRNGKey(self.seed), end_id=self.eot_token_id, finished=finished,
                                    mesh=self.run.mesh)
        for i, ids in zip(batch, out):
          results[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
    return results


def task_manager(include_path: str | None = None, tasks: Sequence[str] = ()) -> TaskManager:
  """The harness's tasks, lm's offline ones (lm/harness_tasks/) and those under include_path.

  Indexing the harness's own ~15,000 task files takes ~20 s; when every name in `tasks` is one of
  lm's or under include_path, the manager indexes only those folders."""
  require_harness()
  logging.getLogger('lm_eval').setLevel(logging.ERROR)  # Its notes on each task's defaults.
  paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
  for path in paths[1:]:
    if not pathlib.Path(path).is_dir():
      raise ConfigError(f'--include_path: no such folder {path!r}')
  if tasks:
    ours = TaskManager(include_path=paths, include_defaults=False)
    if set(tasks) <= set(ours.all_tasks):
      return ours
  return TaskManager(include_path=paths)


def check_tasks(names: Sequence[str], manager: TaskManager, load: bool = True) -> None:
  """A ConfigError in one line for a name the harness does not know (with the nearest ones), or,
  with load, for a task whose dataset cannot be read (not cached while offline, say)."""
  if not names:
    raise ConfigError('no tasks given: name harness tasks, e.g. --tasks=shakespeare')
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      near = difflib.get_close_matches(name, sorted(known), n=3)
      raise ConfigError(f'unknown harness task {name!r}' + (f' (nearest: {", ".join(near)})' if near else '') +
                        '; python -m lm.harness --list_tasks lists them')
  if load:
    for name in names:
      try:
        manager.load([name])
      except Exception as e:  # The harness raises whatever its dataset loader does.
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise ConfigError(f'harness task {name!r} cannot load its data: {lines[-1].strip()}') from None


def evaluate(model: RunModel, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | None = None, bootstrap_iters: int = 1000, manager: TaskManager | None = None,
             check: bool = True) -> dict[str, Any]:
  """The harness's results of model on tasks (its simple_evaluate, without the timestamps)."""
  manager = manager or task_manager(include_path, tasks)
  if check:
    check_tasks(tasks, manager)
  results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                    task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
  return {k: v for k, v in results.items() if k not in _UNREPEATABLE}


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """{'TASK/METRIC': value} of every numeric metric of a results dict (no stderrs)."""
  flat = {}
  for task, values in results['results'].items():
    for key, value in values.items():
      metric = key.split(',')[0]  # 'acc,none' -> 'acc'; keys without a filter are not metrics.
      if ',' in key and isinstance(value, (int, float)) and not metric.endswith('_stderr'):
        flat[f'{task}/{metric}'] = float(value)
  return flat
