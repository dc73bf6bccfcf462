"""Grouped matrix products for dropless experts: rows sorted by group (expert), each group's rows
times its own matrix, no row dropped. One function, an implementation per backend:

- 'ragged_dot': `jax.lax.ragged_dot`, which XLA lowers to a grouped GEMM on GPU and TPU; on CPU it
  becomes a dense product masked per group (E times the FLOPs), so CPU takes 'blocks'.
- 'blocks': each group padded to whole blocks of rows, then one batched product of the blocks with
  their group's matrix (the work of the rows plus at most one padded block per group).

Shape suffixes: N rows, D in, F out, E groups, P padded rows, K blocks, B rows per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('ragged_dot', 'blocks')
BLOCK_ROWS = 64  # 'blocks': rows per block (what a CPU matmul takes in one go without much padding).


def default_implementation(platform: str) -> str:
  """The implementation that is fast on `platform` (measured: python -m lm.bench moe)."""
  return 'blocks' if platform == 'cpu' else 'ragged_dot'


def sort_by_expert(experts_Tk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(order_N, expert_N, sizes_E) of the N = T * k token-expert pairs: the pairs (flat indices into
  experts_Tk) sorted by expert, stably, so each expert's tokens keep their order; each pair's expert
  in that order; and how many pairs each expert has."""
  flat_N = experts_Tk.reshape(-1)
  order_N = jnp.argsort(flat_N, stable=True)
  return order_N, flat_N[order_N], jnp.bincount(flat_N, length=num_experts)


def grouped_matmul(x_ND: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, implementation: str,
                   block_rows: int = BLOCK_ROWS) -> jax.Array:
  """y_NF: x's rows (sorted by group, group_sizes_E of each, summing to N) times their group's matrix."""
  if implementation == 'ragged_dot':
    return jax.lax.ragged_dot(x_ND, w_EDF, group_sizes_E.astype(jnp.int32))
  if implementation != 'blocks':
    raise ValueError(f'grouped_matmul: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}')
  rows, groups = x_ND.shape[0], w_EDF.shape[0]
  sizes_E = group_sizes_E.astype(jnp.int32)
  padded_E = (sizes_E + block_rows - 1) // block_rows * block_rows
  starts_E, padded_starts_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
  group_N = jnp.repeat(jnp.arange(groups), sizes_E, total_repeat_length=rows)
  # Where each row goes: its group's first padded row plus its rank within the group.
  position_N = padded_starts_E[group_N] + jnp.arange(rows) - starts_E[group_N]
  num_blocks = -(-(rows + groups * (block_rows - 1)) // block_rows)  # Enough for any sizes.
  x_PD = jnp.zeros((num_blocks * block_rows, x_ND.shape[1]), x_ND.dtype).at[position_N].set(x_ND)
  # Each block's group: the last group starting at or before it (empty groups take no block).
  block_start_K = jnp.arange(num_blocks) * block_rows
  group_K = jnp.clip(jnp.searchsorted(padded_starts_E + padded_E, block_start_K, side='right'), 0, groups - 1)
  x_KBD = x_PD.reshape(num_blocks, block_rows, -1)
  y_KBF = jnp.einsum('KBD,KDF->KBF', x_KBD, w_EDF[group_K])
  return y_KBF.reshape(num_blocks * block_rows, -1)[position_N]
