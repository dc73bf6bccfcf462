"""Grouped matrix products for dropless experts: rows laid out by group (expert), each group's rows
times its own matrix, no row dropped. The layout is computed once per layer (`group_rows`) and serves
every product of the experts' MLP; an implementation per backend:

- 'ragged_dot': the rows sorted by group, `jax.lax.ragged_dot`, which XLA lowers to a grouped GEMM on
  GPU and TPU; on CPU it becomes a dense product masked per group (E times the FLOPs), so CPU takes
  'blocks'.
- 'blocks': each group's rows padded to whole blocks of rows, then one batched product of the blocks
  with their group's matrix (the work of the rows plus at most one padded block per group; the static
  layout has room for the worst case, N + E x (B - 1) rows). Measured in the train step on 2 cores
  (python -m lm.bench moe), against alternatives: a loop over only the blocks in use, with its gradient
  written out, 0.48x dense against 0.59x; each group's first mean-many rows in a batched product of their
  own plus overflow blocks (the product over a prefix picked by lax.switch), 0.43x against 0.51x, since
  at initialization the worst layer's busiest expert gets 7x the mean (it could win once balanced; not
  measured).

Rows move into and out of the layout by `take_rows`, a gather whose gradient is a gather too: on
XLA:CPU the scatter-add that is a plain gather's gradient cost as much as the experts' products.

Shape suffixes: N items (token-expert pairs), R rows of the layout (N, or N plus padding), D in, F out,
E groups, K blocks, B rows per block, S source rows, J copies of each.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('ragged_dot', 'blocks')
BLOCK_ROWS = 128  # 'blocks': rows per block (train step, 64 experts of 384 x 192, 2 cores: 0.62x dense at 128, 0.57x at
# 256, 0.50x at 64).


def default_implementation(platform: str) -> str:
  """The implementation that is fast on `platform` (measured: python -m lm.bench moe)."""
  return 'blocks' if platform == 'cpu' else 'ragged_dot'


class Grouping(NamedTuple):
  """Where each of N items (each in one of E groups) sits among the R rows of the grouped products."""
  item_R: jax.Array  # int32 [R]: the item each row holds (padding rows: item 0).
  valid_R: jax.Array  # bool [R]: False for padding rows, whose results must be dropped.
  row_N: jax.Array  # int32 [N]: the row holding each item (the inverse of item_R).
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
    row_N = jnp.zeros(items, jnp.int32).at[order_N].set(jnp.arange(items, dtype=jnp.int32))
    return Grouping(order_N, jnp.ones(items, bool), row_N, flat_N[order_N], sizes_E, None)
  padded_E = (sizes_E + block_rows - 1) // block_rows * block_rows
  starts_E, padded_starts_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
  sorted_group_N = flat_N[order_N]
  # Where each sorted item goes: its group's first padded row plus its rank within the group.
  position_N = (padded_starts_E[sorted_group_N] + jnp.arange(items) - starts_E[sorted_group_N]).astype(jnp.int32)
  num_blocks = -(-(items + num_groups * (block_rows - 1)) // block_rows)  # Enough for any sizes.
  rows = num_blocks * block_rows
  item_R = jnp.zeros(rows, jnp.int32).at[position_N].set(order_N)
  valid_R = jnp.zeros(rows, bool).at[position_N].set(True)
  row_N = jnp.zeros(items, jnp.int32).at[order_N].set(position_N)
  # Each block's group: the last group starting at or before it (empty groups take no block).
  block_start_K = jnp.arange(num_blocks) * block_rows
  group_K = jnp.clip(jnp.searchsorted(padded_starts_E + padded_E, block_start_K, side='right'), 0,
                     num_groups - 1).astype(jnp.int32)
  return Grouping(item_R, valid_R, row_N, jnp.repeat(group_K, block_rows), sizes_E, group_K)


def grouped_matmul(x_RD: jax.Array, w_EDF: jax.Array, grouping: Grouping) -> jax.Array:
  """y_RF: each row of x (laid out by `grouping`) times its group's matrix (padding rows: anything)."""
  if grouping.group_K is None:
    return jax.lax.ragged_dot(x_RD, w_EDF, grouping.sizes_E)
  num_blocks = grouping.group_K.shape[0]
  x_KBD = x_RD.reshape(num_blocks, -1, x_RD.shape[-1])
  return jnp.einsum('KBD,KDF->KBF', x_KBD, w_EDF[grouping.group_K]).reshape(x_RD.shape[0], -1)


@jax.custom_vjp
def take_rows(x_SD: jax.Array, source_R: jax.Array, valid_R: jax.Array, copies_SJ: jax.Array,
              copy_valid_SJ: jax.Array) -> jax.Array:
  """y_RD: row source_R of x, zero where not valid_R. copies_SJ must list, for each source row s, the
  valid rows r taking it (source_R[r] == s; copy_valid_SJ False for unused slots): the gradient gathers
  over them, so every valid row must be listed exactly once."""
  return jnp.where(valid_R[:, None], x_SD[source_R], 0).astype(x_SD.dtype)


def _take_rows_fwd(x_SD, source_R, valid_R, copies_SJ, copy_valid_SJ):
  return take_rows(x_SD, source_R, valid_R, copies_SJ, copy_valid_SJ), (copies_SJ, copy_valid_SJ)


def _take_rows_bwd(residuals, dy_RD):
  copies_SJ, copy_valid_SJ = residuals
  dx_SD = jnp.sum(jnp.where(copy_valid_SJ[..., None], dy_RD[copies_SJ], 0), axis=1).astype(dy_RD.dtype)
  return dx_SD, None, None, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def rows_of_tokens(x_TD: jax.Array, grouping: Grouping) -> jax.Array:
  """x_RD: the layout's rows from tokens whose pairs (item n = token * top_k + choice) it holds; padding
  rows zero."""
  tokens = x_TD.shape[0]
  row_TJ = grouping.row_N.reshape(tokens, -1)
  return take_rows(x_TD, grouping.item_R // row_TJ.shape[1], grouping.valid_R, row_TJ, jnp.ones(row_TJ.shape, bool))


def items_of_rows(y_RD: jax.Array, grouping: Grouping) -> jax.Array:
  """y_ND: each item's row of the layout, back in item order."""
  return take_rows(y_RD, grouping.row_N, jnp.ones(grouping.row_N.shape, bool), grouping.item_R[:, None],
                   grouping.valid_R[:, None])
