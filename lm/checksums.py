"""Checksums of a train state's arrays, stored with each checkpoint and checked on restore, so a
flipped bit in a saved array is caught (orbax checksums only zarr3's shard index, not array data).

Each array's checksum is two weighted sums of its bits, modulo 2**32, computed on the devices where
the array lives: the sums are exact integer arithmetic, so they do not depend on the mesh, the
sharding or the order XLA adds in, and a state restored onto another mesh checks against the same
numbers. Every weight is odd, so any single flipped bit (and any change confined to one element)
changes both sums.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (one per element, two per 8-byte element)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32).reshape(-1)


def _array_checksum(x: jax.Array) -> jax.Array:
  words = _bits(x)
  i = jnp.arange(words.size, dtype=jnp.uint32)
  first = words * (i * jnp.uint32(0x9E3779B1) | jnp.uint32(1))
  second = words * ((i ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x27D4EB2F) | jnp.uint32(1))
  return jnp.stack([jnp.sum(first, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda leaves: [_array_checksum(x) for x in leaves])


def _named_leaves(state: Any) -> dict[str, Any]:
  """{'params/block_0/...': array}: keyed by the state's field (a dataclass) or entry (a dict) and the
  path below it, so a checkpoint's parameters check alone (restore_params) as well as in the state."""
  if dataclasses.is_dataclass(state):
    top = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  else:
    top = dict(state)
  named = {}
  for name, tree in top.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      named[f'{name}/{jax.tree_util.keystr(path, simple=True, separator="/")}' if path else name] = leaf
  return named


def checksums(state: Any) -> dict[str, list[int]]:
  """{name: [sum, sum]} of every array in `state` (a dataclass or dict of arrays)."""
  named = _named_leaves(state)
  sums = sharding.to_host(_checksums_jit([jnp.asarray(x) for x in named.values()]))
  return {name: [int(v) for v in np.asarray(s)] for name, s in zip(named, sums)}


def mismatches(saved: dict[str, list[int]], state: Any) -> list[str]:
  """The names of the arrays of `state` whose checksums differ from `saved` (those saved has)."""
  now = checksums({k: v for k, v in _named_leaves(state).items() if k in saved})
  return [name for name, sums in now.items() if sums != saved[name]]
