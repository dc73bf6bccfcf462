"""Grouped matrix products for dropless experts: rows laid out by group (expert), each group's rows
times its own matrix, no row dropped. The layout is computed once per layer (`group_rows`) and serves
every product of the experts' MLP; an implementation per backend:

- 'ragged_dot': the rows sorted by group, `jax.lax.ragged_dot`, which XLA lowers to a grouped GEMM on
  GPU and TPU; on CPU it becomes a dense product masked per group (E times the FLOPs), so CPU takes
  'blocks'.
- 'blocks': each group's rows padded to whole blocks of rows, then one batched product of the blocks
  with their group's matrix (the work of the rows plus at most one padded block per group; the static
  layout has room for the worst case, N + E x (B - 1) rows). The rows are gathered straight into that
  layout, so the padding costs no copy of its own. (A loop over only the blocks in use, with its
  gradient written out, measured slower in the train step on 2 cores: 0.48x dense against 0.59x.)

Shape suffixes: N items (token-expert pairs), R rows of the layout (N, or N plus padding), D in, F out,
E groups, K blocks, B rows per block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('ragged_dot', 'blocks')
BLOCK_ROWS = 256  # 'blocks': rows per block (64 experts of 384 x 192, fwd+bwd on 2 cores: 256 beat 64, 128, 512).


def default_implementation(platform: str) -> str:
  """The implementation that is fast on `platform` (measured: python -m lm.bench moe)."""
  return 'blocks' if platform == 'cpu' else 'ragged_dot'


class Grouping(NamedTuple):
  """Where each of N items (each in one of E groups) sits among the R rows of the grouped products."""
  item_R: jax.Array  # int32 [R]: the item each row holds (padding rows: item 0).
  valid_R: jax.Array  # bool [R]: False for padding rows, whose results must be dropped.
  group_R: jax.Array  # int32 [R]: each row's group (for per-group biases).
  sizes_E: jax.Array  # int32 [E]: rows per group ('ragged_dot'), in order.
  group_K: jax.Array | None  # int32 [K]: each block's group ('blocks'), else None.


def group_rows(group_N: jax.Array, num_groups: int, implementation: str, block_rows: int = BLOCK_ROWS) -> Grouping:
  """The layout of items whose groups are group_N (any shape, flattened) for `implementation`: sorted by
  group, stably (each group's items keep their order), and for 'blocks' padded to whole blocks."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'grouped products: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}')
  flat_N = group_N.reshape(-1).astype(jnp.int32)
  items = flat_N.shape[0]
  order_N = jnp.argsort(flat_N, stable=True).astype(jnp.int32)
  sizes_E = jnp.bincount(flat_N, length=num_groups).astype(jnp.int32)
  if implementation == 'ragged_dot':
    return Grouping(order_N, jnp.ones(items, bool), flat_N[order_N], sizes_E, None)
  padded_E = (sizes_E + block_rows - 1) // block_rows * block_rows
  starts_E, padded_starts_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
  sorted_group_N = flat_N[order_N]
  # Where each sorted item goes: its group's first padded row plus its rank within the group.
  position_N = padded_starts_E[sorted_group_N] + jnp.arange(items) - starts_E[sorted_group_N]
  num_blocks = -(-(items + num_groups * (block_rows - 1)) // block_rows)  # Enough for any sizes.
  rows = num_blocks * block_rows
  item_R = jnp.zeros(rows, jnp.int32).at[position_N].set(order_N)
  valid_R = jnp.zeros(rows, bool).at[position_N].set(True)
  # Each block's group: the last group starting at or before it (empty groups take no block).
  block_start_K = jnp.arange(num_blocks) * block_rows
  group_K = jnp.clip(jnp.searchsorted(padded_starts_E + padded_E, block_start_K, side='right'), 0,
                     num_groups - 1).astype(jnp.int32)
  return Grouping(item_R, valid_R, jnp.repeat(group_K, block_rows), sizes_E, group_K)


def grouped_matmul(x_RD: jax.Array, w_EDF: jax.Array, grouping: Grouping) -> jax.Array:
  """y_RF: each row of x (laid out by `grouping`) times its group's matrix (padding rows: anything)."""
  if grouping.group_K is None:
    return jax.lax.ragged_dot(x_RD, w_EDF, grouping.sizes_E)
  num_blocks = grouping.group_K.shape[0]
  x_KBD = x_RD.reshape(num_blocks, -1, x_RD.shape[-1])
  return jnp.einsum('KBD,KDF->KBF', x_KBD, w_EDF[grouping.group_K]).reshape(x_RD.shape[0], -1)
