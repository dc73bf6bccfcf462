"""The matrix products a traced step performs, counted from its jaxpr.

`python -m lm.bench` times each alone at its own shapes and sums them: the step's matmul floor, what
the step would take if everything else in it (norms, softmax, activations, the loss, the optimizer,
copies) were free; for lm, and through `einsum` for PyTorch on the same products.
"""

from __future__ import annotations

import collections
import math
import string
from typing import NamedTuple


class Matmul(NamedTuple):
  """One lax.dot_general: operand shapes and dtypes, ((lhs, rhs) contracting, (lhs, rhs) batch) dims."""
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  contracting: tuple[tuple[int, ...], tuple[int, ...]]
  batch: tuple[tuple[int, ...], tuple[int, ...]]
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str

  @property
  def flops(self) -> int:
    """2 x batch x M x N x K: a multiply and an add per term."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = self.contracting, self.batch
    rest = lambda shape, used: math.prod(d for i, d in enumerate(shape) if i not in used)
    return (2 * math.prod(self.lhs_shape[i] for i in lhs_b) * math.prod(self.lhs_shape[i] for i in lhs_c)
            * rest(self.lhs_shape, lhs_c + lhs_b) * rest(self.rhs_shape, rhs_c + rhs_b))

  def einsum(self) -> str:
    """The same product as an einsum spec ('ab,cb->ac'), dot_general's output order: batch, lhs, rhs."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = self.contracting, self.batch
    letters = iter(string.ascii_letters)
    lhs, rhs = [''] * len(self.lhs_shape), [''] * len(self.rhs_shape)
    for i, j in zip(lhs_b + lhs_c, rhs_b + rhs_c):
      lhs[i] = rhs[j] = next(letters)
    lhs = [a or next(letters) for a in lhs]
    rhs = [a or next(letters) for a in rhs]
    out = ([lhs[i] for i in lhs_b] + [a for i, a in enumerate(lhs) if i not in lhs_c + lhs_b]
           + [a for j, a in enumerate(rhs) if j not in rhs_c + rhs_b])
    return f'{"".join(lhs)},{"".join(rhs)}->{"".join(out)}'


def _inner_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(getattr(item, 'jaxpr', None), 'eqns'):  # A ClosedJaxpr.
        yield item.jaxpr


def count(jaxpr) -> collections.Counter:
  """How many times each Matmul runs in a (closed) jaxpr, inner jaxprs included: a scan's body counts
  `length` times; a while loop's body and every branch of a cond count once."""
  counts = collections.Counter()

  def walk(jaxpr, times: int) -> None:
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        lhs, rhs = (v.aval for v in eqn.invars)
        contracting, batch = eqn.params['dimension_numbers']
        counts[Matmul(tuple(lhs.shape), tuple(rhs.shape), tuple(map(tuple, contracting)), tuple(map(tuple, batch)),
                      str(lhs.dtype), str(rhs.dtype), str(eqn.outvars[0].aval.dtype))] += times
      inner = times * eqn.params['length'] if eqn.primitive.name == 'scan' else times
      for sub in _inner_jaxprs(eqn.params):
        walk(sub, inner)

  walk(getattr(jaxpr, 'jaxpr', jaxpr), 1)
  return counts


def flops(counts: collections.Counter) -> int:
  return sum(m.flops * n for m, n in counts.items())
