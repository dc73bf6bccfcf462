"""Checksums of a train state's arrays, stored with each checkpoint and checked on restore, so a
flipped bit in a saved array is caught (orbax checksums only zarr3's shard index, not array data).

Each array's checksum is two sums of its bits as uint32 words laid out as a matrix (the array's last
axis as columns): the sum of its row sums weighted by odd numbers, and the same of its column sums.
Plain sums are what XLA's CPU backend vectorizes (about 7x faster than weighting every word), and the
arithmetic is exact modulo 2**32, so the sums do not depend on the mesh, the sharding or the order XLA
adds in: a state restored onto another mesh checks against the same numbers. A change to any one word
changes a row sum by a non-zero amount, which an odd weight keeps non-zero: any single flipped bit,
and any change confined to one element, changes both sums.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as a matrix of uint32 words: one per element (two per 8-byte element), its last
  axis the columns."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  words = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
  return words.reshape(-1, words.shape[-1]) if words.ndim else words.reshape(1, 1)


def _odd(n: int, multiplier: int) -> jax.Array:
  return jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(multiplier) | jnp.uint32(1)


def _array_checksum(x: jax.Array) -> jax.Array:
  if not x.size:
    return jnp.zeros(2, jnp.uint32)
  words = _words(x)
  rows, columns = jnp.sum(words, axis=1, dtype=jnp.uint32), jnp.sum(words, axis=0, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(rows * _odd(rows.size, 0x9E3779B1), dtype=jnp.uint32),
                    jnp.sum(columns * _odd(columns.size, 0x27D4EB2F), dtype=jnp.uint32)])


_checksum_jit = jax.jit(_array_checksum)  # Per array: one small compile per shape, shared by the layers.


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
  sums = sharding.to_host([_checksum_jit(jnp.asarray(x)) for x in named.values()])
  return {name: [int(v) for v in np.asarray(s)] for name, s in zip(named, sums)}


def mismatches(saved: dict[str, list[int]], state: Any) -> list[str]:
  """The names of the arrays of `state` whose checksums differ from `saved` (those saved has)."""
  now = checksums({k: v for k, v in _named_leaves(state).items() if k in saved})
  return [name for name, sums in now.items() if sums != saved[name]]
