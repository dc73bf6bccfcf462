"""How a config key is declared: its default, check, doc and resume rule, in one place.

A section is a frozen dataclass whose fields are `key(...)`s; `lm.config` gathers the sections into
the schema from which defaults, validation, the resume rule and the key reference are derived.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


class ConfigError(ValueError):
  """A bad config or bad input, explained in one line for the user."""


@dataclasses.dataclass(frozen=True)
class Check:
  """A test of one value: `problem(v)` is None when v is fine, else a phrase saying what is allowed."""
  problem: Callable[[Any], 'str | None']
  allowed: str  # The allowed values, for the key reference.


def integer(lo: int | None = None, hi: int | None = None) -> Check:
  def problem(v):
    if isinstance(v, bool) or not isinstance(v, int):
      return 'must be an integer'
    if lo is not None and v < lo:
      return f'must be >= {lo}'
    if hi is not None and v > hi:
      return f'must be <= {hi}'
    return None
  bounds = [f'>= {lo}'] * (lo is not None) + [f'<= {hi}'] * (hi is not None)
  return Check(problem, ' '.join(['integer'] + [', '.join(bounds)] * bool(bounds)))


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Check:
  def problem(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return 'must be a finite number'
    if lo is not None and (v <= lo if lo_open else v < lo):
      return f'must be {">" if lo_open else ">="} {lo}'
    if hi is not None and (v >= hi if hi_open else v > hi):
      return f'must be {"<" if hi_open else "<="} {hi}'
    return None
  bounds = ([f'{">" if lo_open else ">="} {lo}'] * (lo is not None)
            + [f'{"<" if hi_open else "<="} {hi}'] * (hi is not None))
  return Check(problem, ' '.join(['number'] + [', '.join(bounds)] * bool(bounds)))


def choice(*allowed: str) -> Check:
  listed = ', '.join(repr(a) for a in allowed)
  return Check(lambda v: None if v in allowed else f'must be one of {listed}', listed)


def string(nonempty: bool = False) -> Check:
  def problem(v):
    if not isinstance(v, str):
      return 'must be a string'
    if nonempty and not v:
      return 'must not be empty'
    return None
  return Check(problem, 'non-empty string' if nonempty else 'string')


BOOLEAN = Check(lambda v: None if isinstance(v, bool) else 'must be True or False', 'True, False')

# Whether a key may change when a workdir resumes (lm.training.checkpoint reads these).
FREE = 'free'  # May change on resume and between a run and its checkpoint.init_from source.
MATCH = 'match'  # Must equal the checkpoint's on resume: it shapes the data stream or what the steps compute.
SHAPE = 'shape'  # Shapes the parameters (or the tokens they index): must match on resume and for init_from.
RESUME_RULES = {FREE: 'may change', MATCH: 'must match', SHAPE: 'must match, also for init_from'}


def key(default: Any, check: Check, resume: str, doc: str) -> Any:
  """One config key: a dataclass field carrying its check, resume rule and one-line doc."""
  if resume not in RESUME_RULES:
    raise ValueError(f'resume rule {resume!r}: expected one of {", ".join(RESUME_RULES)}')
  return dataclasses.field(default=default, metadata={'check': check, 'resume': resume, 'doc': doc})


@dataclasses.dataclass(frozen=True)
class Key:
  """A declared key, as the schema lists it: 'section.name' with what its field carries."""
  name: str
  default: Any
  check: Check
  resume: str
  doc: str
  mixed: bool = False  # Annotated with a union (e.g. `tuple | str`): the ConfigDict takes any of its types.


def keys_of(section: type, prefix: str) -> dict[str, Key]:
  """{'prefix.name': Key} for every field of a section dataclass ('' prefix: top-level keys)."""
  found = {}
  for f in dataclasses.fields(section):
    if set(f.metadata) != {'check', 'resume', 'doc'} or f.default is dataclasses.MISSING or not f.metadata['doc']:
      raise TypeError(f'{section.__name__}.{f.name} must be declared with lm.config.schema.key(...)')
    name = f'{prefix}.{f.name}' if prefix else f.name
    found[name] = Key(name, f.default, f.metadata['check'], f.metadata['resume'], f.metadata['doc'],
                      mixed='|' in str(f.type))
  return found
