"""The device mesh, and shardings of parameters, optimizer state and batches from logical axis rules.

The model names the logical axes of every parameter and activation; `mesh.logical_axis_rules`
in the config maps them onto the mesh axes (lm.config.MESH_AXES). Everything here is computed from
shapes (jax.eval_shape), so nothing is materialised on one device first.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from lm.config import MESH_AXES, ConfigError, resolve_mesh_shape

# Config keys whose values size each logical axis: named in divisibility errors.
_AXIS_SIZE_KEYS = {'vocab': 'model.vocab_size', 'embed': 'model.d_model', 'heads': 'model.num_heads',
                   'kv_heads': 'model.num_kv_heads', 'expert': 'model.moe_experts',
                   'mlp': 'model.mlp_dim', 'kv': 'the head dim (model.head_dim, or model.d_model / model.num_heads)',
                   'layers': 'model.num_layers', 'length': 'model.max_len'}


def make_mesh(mesh: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of mesh.shape (axes lm.config.MESH_AXES) (the mesh section) over `devices` (default: every
  device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh.shape, len(devices))
  grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)  # Topology-aware on TPU.
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_axis_rules(mesh: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The mesh section's logical axis rules, as flax takes them (tuples, whatever JSON made of them)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh.logical_axis_rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> Iterator[None]:
  """Mesh and rules in context, so the model's activation constraints apply when steps are traced."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def shardings_of(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned values (plain leaves: replicated)."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def mesh_axes_of(logical: str | None, rules) -> tuple[str, ...]:
  """The mesh axes a logical axis is split over by itself (no other axis of the array competing)."""
  axes = nn.logical_to_mesh_axes((logical,), rules)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def check_divisible(abstract_boxed: Any, mesh: Mesh, rules, model_config=None) -> None:
  """A ConfigError naming the config key when a sharded dimension does not split evenly."""
  size_keys = dict(_AXIS_SIZE_KEYS)
  if model_config is not None and not model_config.num_kv_heads:  # kv heads default to num_heads.
    size_keys['kv_heads'] = 'model.num_heads'

  flat = jax.tree_util.tree_leaves_with_path(
      abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in flat:
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
    for size, logical, axes in zip(leaf.value.shape, leaf.names, mesh_axes):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)  # As the array has them.
      shards = math.prod(mesh.shape[a] for a in axes)
      if size % shards:
        over = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
        raise ConfigError(
            f'{size_keys.get(logical, logical)}={size} does not split over mesh {over} '
            f'(mesh.logical_axis_rules shard {logical!r} there; parameter {jax.tree_util.keystr(path)}); '
            f'change mesh.shape or the size')


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, ...] inputs: rows split as the 'batch' rule says, the rest whole."""
  return NamedSharding(mesh, PartitionSpec(nn.logical_to_mesh_axes(('batch',), rules)[0]))


def batch_shards(mesh: Mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in mesh_axes_of('batch', rules))


def check_batch(key: str, batch_size: int, mesh: Mesh, rules, microbatches: int = 1) -> None:
  shards = batch_shards(mesh, rules) * microbatches
  if batch_size % shards:
    micro = f' x train.microbatches={microbatches}' if microbatches > 1 else ''
    axes = ' x '.join(mesh_axes_of('batch', rules))
    raise ConfigError(f'{key}={batch_size} must be divisible by the {batch_shards(mesh, rules)} batch '
                      f'shards of the mesh ({axes}){micro}')


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """The [start, stop) rows of a global batch that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  start, stop = min(starts), max(stops)
  if sum(b - a for a, b in set(zip(starts, stops))) != stop - start:
    raise ConfigError('this process\'s devices hold non-contiguous rows of the batch; '
                      'order mesh.shape so that each process owns a block of the data axes')
  return start, stop


def data_shard(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(index, count) of the data stream this process reads: processes holding the same rows
  read the same stream."""
  start, stop = process_rows(sharding, batch_size)
  return start // (stop - start), batch_size // (stop - start)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
  """One global array per key from this process's rows of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
          for k, v in local.items()}


def replicated(mesh: Mesh | None, tree: Any) -> Any:
  """Inputs the same on every process, placed whole on every device of the mesh (None: as they are)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def to_host(tree: Any) -> Any:
  """numpy copies of (possibly multi-process) arrays, whole on every process."""
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(fetch, tree)
