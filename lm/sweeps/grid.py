"""A sweep's points: {'group.key': value} dicts of overrides built with axis, product, zip and chain,
each named from its overrides (point_name); a preset's scales as points.
"""

from __future__ import annotations

import builtins
import itertools
import re
from typing import Any, Sequence

from lm.config import ConfigError

SWEEP_DIR = '{sweep}'  # In a point's value: the sweep's workdir.
Point = dict[str, Any]


def axis(key: str, values: Sequence[Any]) -> list[Point]:
  """One key taking each of values: [{key: v} for v in values]."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ConfigError(f'sweep axis {key!r}: values must be a non-empty list, not {values!r}')
  return [{key: v} for v in values]


def _merge(points: Sequence[Point], how: str) -> Point:
  merged: Point = {}
  for point in points:
    for key, value in point.items():
      if key in merged:
        raise ConfigError(f'sweep: key {key!r} is swept twice (by two axes of one {how})')
      merged[key] = value
  return merged


def product(*sweeps: list[Point]) -> list[Point]:
  """Every combination: product(axis('a', [1, 2]), axis('b', [3, 4])) has 4 points."""
  return [_merge(combo, 'product') for combo in itertools.product(*sweeps)]


# sweep.zip on purpose (the name experiments call it by): this module calls the builtin as builtins.zip.
def zip(*sweeps: list[Point]) -> list[Point]:
  """Points taken side by side: zip(axis('a', [1, 2]), axis('b', [3, 4])) is {a:1, b:3}, {a:2, b:4}."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ConfigError(f'sweep: zip of sweeps of different lengths {sorted(len(s) for s in sweeps)}')
  return [_merge(points, 'zip') for points in builtins.zip(*sweeps)]


def chain(*sweeps: list[Point]) -> list[Point]:
  """The points of each sweep in turn (one knob at a time: chain(axis(a, ...), axis(b, ...)))."""
  return [point for sweep in sweeps for point in sweep]


def flag_value(value: Any) -> str:
  """value as --config.key=VALUE spells it so that the flag parses back to value."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value) if isinstance(value, (str, bool)) else repr(value)


def _name_value(value: Any) -> str:
  text = f'{value:g}' if isinstance(value, float) else flag_value(value)
  return re.sub(r'[^A-Za-z0-9._+-]+', '-', text).strip('-') or 'empty'


def point_name(point: Point, swept_keys: Sequence[str]) -> str:
  """'positions=rope,learning_rate=0.003': each key's last part (the whole key where two swept keys
  share a last part) = its value; 'base' for a point that overrides nothing."""
  leaves = [k.split('.')[-1] for k in swept_keys]
  parts = []
  for key, value in point.items():
    if isinstance(value, str) and SWEEP_DIR in value:
      continue
    label = key.split('.')[-1] if leaves.count(key.split('.')[-1]) == 1 else key
    parts.append(f'{label}={_name_value(value)}')
  return ','.join(parts) or 'base'


def preset(arg: str, points: list[Point], scales: Sequence[str]) -> tuple[str, Point]:
  """(scale, point) named by a preset argument 'TOKEN[,TOKEN...]': a scale from `scales` (default the
  first), and the values (or key=value parts of the name) of at most one point of the sweep.
  'rope' -> (scales[0], {'model.positions': 'rope'}); 'rmsnorm,post,gpu' -> ('gpu', that point)."""
  tokens = [t for t in (arg or '').split(',') if t]
  scale = [t for t in tokens if t in scales]
  wanted = sorted(t for t in tokens if t not in scales)
  if len(scale) > 1:
    raise ConfigError(f'preset {arg!r} names two scales: {", ".join(scale)}')
  swept = list(dict.fromkeys(k for p in points for k in p))
  matches = []
  for point in points:
    parts = point_name(point, swept).split(',')
    values = [part.split('=', 1)[1] for part in parts]
    if wanted and len(wanted) == len(parts) and all(
        any(t in (part, value) for part, value in builtins.zip(parts, values)) for t in wanted):
      matches.append(point)
  if wanted and len(matches) != 1:
    names = ' | '.join(','.join(part.split('=', 1)[1] for part in point_name(p, swept).split(',')) for p in points)
    raise ConfigError(f'preset {arg!r}: expected [POINT,][SCALE] with SCALE one of {", ".join(scales)} and POINT '
                      f'one of {names}' + (' (ambiguous: name it key=value)' if matches else ''))
  return (scale[0] if scale else scales[0]), (dict(matches[0]) if wanted else {})
