"""Checksums of saved arrays: any one flipped bit changes both sums, and the sums are the same on any
mesh (a checkpoint restored onto other shardings checks against the numbers saved)."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from lm.training import checksums


def _flipped(x: np.ndarray, word: int, bit: int) -> np.ndarray:
  y = x.copy()
  y.view(np.uint8).reshape(-1)[word * x.dtype.itemsize + bit // 8] ^= np.uint8(1 << (bit % 8))
  return y


@pytest.mark.parametrize('dtype', [np.float32, jnp.bfloat16, np.int32, np.uint8, np.int8])
def test_every_flipped_bit_changes_both_sums(dtype):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 5)) * 50).astype(dtype)
  base = checksums.checksums({'x': x})['x']
  bits = np.dtype(dtype).itemsize * 8
  for word in range(x.size):
    for bit in range(bits):
      sums = checksums.checksums({'x': _flipped(x, word, bit)})['x']
      assert sums[0] != base[0] and sums[1] != base[1], (word, bit)


def test_two_elements_swapped_change_the_sums():
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  base = checksums.checksums({'x': x})['x']
  for (a, b) in [((0, 1), (0, 2)), ((0, 1), (3, 1)), ((1, 2), (2, 5))]:  # Same row, same column, neither.
    y = x.copy()
    y[a], y[b] = x[b], x[a]
    assert checksums.checksums({'x': y})['x'] != base, (a, b)


def test_scalars_empty_arrays_and_booleans():
  tree = {'step': np.int32(7), 'empty': np.zeros((0, 3), np.float32), 'mask': np.array([True, False, True])}
  sums = checksums.checksums(tree)
  assert sums['empty'] == [0, 0] and sums['step'] != checksums.checksums({'step': np.int32(6)})['step']
  assert sums['mask'] != checksums.checksums({'mask': np.array([True, True, True])})['mask']
  assert checksums.mismatches(sums, tree) == []
  assert checksums.mismatches(sums, tree | {'step': np.int32(8)}) == ['step']


def test_the_sums_do_not_depend_on_the_sharding():
  rng = np.random.default_rng(1)
  tree = {'params': {'kernel': rng.normal(size=(16, 24)).astype(np.float32),
                     'embed': rng.normal(size=(40, 8)).astype(jnp.bfloat16)}, 'step': np.int32(3)}
  alone = checksums.checksums(tree)
  mesh = jax.make_mesh((2, 4), ('a', 'b'), devices=jax.devices()[:8])
  for spec in (P('a', 'b'), P('b', 'a'), P(None, ('a', 'b')), P(('b', 'a'), None)):
    placed = {'params': {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in tree['params'].items()},
              'step': jax.device_put(tree['step'], NamedSharding(mesh, P()))}
    assert checksums.checksums(placed) == alone, spec
  assert set(alone) == {'params/kernel', 'params/embed', 'step'}
