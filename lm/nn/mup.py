"""muP, model.parametrization='mup': Tensor Programs V's recipe for Adam-type optimizers (Yang et al.
2022, table 3 in its multiplier form, as their `mup` package runs it), relative to the base width
model.mup_base_width at which it equals SP.

With width multiplier m = d_model / mup_base_width:
- hidden matrices (attention and MLP kernels, experts' kernels; `optim.hidden_matrix_mask`): init
  variance / m and learning rate / m;
- readouts (the output logits, tied or not, and the MoE router's logits): multiplied by 1 / m, their
  weights keeping SP's init and learning rate;
- attention scores: q.k / (sqrt(head_dim) * sqrt(m)), which is q.k / head_dim up to a constant when a
  sweep widens head_dim at fixed num_heads (muP's convention, assumed here);
- embeddings, the position table, norms and biases: as in SP.
"""

from __future__ import annotations

import math


def width_multiplier(m) -> float:
  """d_model / mup_base_width under muP; 1 under SP."""
  return m.d_model / m.mup_base_width if m.parametrization == 'mup' else 1.0


def hidden_init_std(m, std: float) -> float:
  """A hidden matrix's init std: SP's `std` over sqrt(m), so its variance falls as 1 / m."""
  return std / math.sqrt(width_multiplier(m))


def readout_multiplier(m) -> float:
  """What logits (vocabulary and router) are multiplied by: 1 / m."""
  return 1.0 / width_multiplier(m)


def attention_divisor(m, head_dim: int) -> float:
  """What attention scores q.k are divided by: sqrt(head_dim) under SP, times sqrt(m) under muP."""
  return math.sqrt(head_dim) * math.sqrt(width_multiplier(m))
