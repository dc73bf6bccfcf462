"""The mesh axes, declared once in device order with the logical axes each shards by default, and the
forms of mesh.shape: sizes in that order, or names (`'fsdp=-1,tensor=4'`)."""

from __future__ import annotations

import dataclasses
import math
import re

from lm.config.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class MeshAxis:
  name: str
  logical: tuple[str, ...]  # The logical axes this mesh axis shards under the default rules.
  doc: str


# Device order: neighbouring devices share the last axes, so put the most communicating axis last.
AXES = (
  MeshAxis('data', ('batch',), 'data parallelism: each group of devices reads other examples'),
  MeshAxis('fsdp', ('batch', 'embed'), 'fully sharded data parallelism: also splits parameters and optimizer '
           'state along embed'),
  MeshAxis('context', ('length',), 'context parallelism: activations split along the sequence'),
  MeshAxis('expert', ('batch', 'expert'), "expert parallelism: splits the experts, each device's tokens sent "
           'all-to-all to the devices holding their experts; a batch axis for everything else'),
  MeshAxis('tensor', ('vocab', 'heads', 'kv_heads', 'mlp'), 'tensor parallelism: splits heads, MLP and vocab'),
)
MESH_AXES = tuple(a.name for a in AXES)
LOGICAL_AXES = ('batch', 'length', 'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp', 'expert', 'layers')

# The order flax tries the rules in: a mesh axis is used once per array, so activations [batch,
# length, embed] give fsdp to the batch and keep their embed dimension whole.
_RULE_PRIORITY = ('batch', 'vocab', 'heads', 'kv_heads', 'mlp', 'expert', 'embed', 'kv', 'length', 'layers')


def _default_rule(logical: str):
  axes = tuple(a.name for a in AXES if logical in a.logical)
  return axes if len(axes) > 1 else (axes[0] if axes else None)


# Logical axis -> mesh axes. With the default mesh (data=-1) it is pure data parallelism; the expert axis
# splits the experts' weights and, like data and fsdp, the batch of everything else.
DEFAULT_LOGICAL_AXIS_RULES = tuple((name, _default_rule(name)) for name in _RULE_PRIORITY)

_NAMED = re.compile(r'\s*([a-z_]+)\s*=\s*(-?\d+)\s*')


def _parse(shape) -> tuple[int, ...]:
  """mesh.shape as one size per MESH_AXES (-1 kept), or a ValueError saying what is wrong."""
  if isinstance(shape, str):
    parts = [p for p in shape.split(',') if p.strip()]
    if parts and all('=' in p for p in parts):
      sizes = dict.fromkeys(MESH_AXES, 1)
      for part in parts:
        match = _NAMED.fullmatch(part)
        if not match:
          raise ValueError(f'{part.strip()!r} is not NAME=SIZE')
        name, size = match.group(1), int(match.group(2))
        if name not in sizes:
          raise ValueError(f'unknown mesh axis {name!r}; mesh axes: {", ".join(MESH_AXES)}')
        if sum(p.split('=')[0].strip() == name for p in parts) > 1:
          raise ValueError(f'mesh axis {name!r} is named twice')
        sizes[name] = size
      shape = tuple(sizes.values())
    else:
      try:
        shape = tuple(int(p) for p in parts)
      except ValueError:
        raise ValueError('must name its axes (NAME=SIZE) or give sizes as integers') from None
  if not isinstance(shape, (tuple, list)) or len(shape) not in (3, 4, 5) or not all(
      isinstance(n, int) and not isinstance(n, bool) for n in shape):
    raise ValueError(f'must be 5 integers, devices along ({", ".join(MESH_AXES)}), 4 along (data, fsdp, context, '
                     "tensor) or 3 along (data, fsdp, tensor) (the others 1), e.g. (-1, 1, 1), or names, e.g. "
                     "'fsdp=-1,tensor=4'")
  shape = tuple(shape)
  if any(n == 0 or n < -1 for n in shape) or shape.count(-1) > 1:
    raise ValueError('entries must be >= 1, with at most one -1 (all remaining devices)')
  if len(shape) == 3:  # (data, fsdp, tensor): the forms before the context and expert axes.
    return shape[:2] + (1, 1) + shape[2:]
  return shape[:3] + (1,) + shape[3:] if len(shape) == 4 else shape


def shape_problem(shape) -> str | None:
  """Why mesh.shape is malformed, or None."""
  try:
    _parse(shape)
  except ValueError as e:
    return str(e)
  return None


def mesh_sizes(shape) -> tuple[int, ...]:
  """A valid mesh.shape in any form as one size per MESH_AXES (-1 kept)."""
  return _parse(shape)


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
  """mesh.shape with -1 filled in, one size per MESH_AXES; a ConfigError unless it uses exactly num_devices."""
  sizes = mesh_sizes(shape)
  known = math.prod(n for n in sizes if n != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh.shape={shape!r}: {num_devices} devices do not split into {known} x (the -1 entry)')
    sizes = tuple(num_devices // known if n == -1 else n for n in sizes)
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh.shape={shape!r} uses {math.prod(sizes)} devices but there are {num_devices}; make the '
                      f'product {num_devices} or put -1 on one axis')
  return sizes


def named_mesh(sizes) -> str:
  """'fsdp=4,tensor=2': the axes larger than 1 ('data=1' on one device)."""
  return ','.join(f'{a}={n}' for a, n in zip(MESH_AXES, sizes) if n != 1) or f'{MESH_AXES[0]}=1'


def same_mesh(a, b) -> bool:
  """Whether two mesh.shape values mean the same sizes per axis on the devices the resolved one of them
  (no -1) counts; malformed values are the same only when equal."""
  try:
    sizes_a, sizes_b = mesh_sizes(a), mesh_sizes(b)
  except ValueError:
    return a == b
  for x, y in ((sizes_a, sizes_b), (sizes_b, sizes_a)):
    if -1 not in y:
      try:
        return resolve_mesh_shape(x, math.prod(y)) == y
      except ConfigError:
        return False
  return sizes_a == sizes_b
