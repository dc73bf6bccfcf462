"""Mixture of experts: routing, capacity, dropless grouped products, the balance loss, and the per-layer interval."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import config as config_lib
from lm.kinds import make_model
from lm.nn import grouped
from lm.nn.model import count_active_params, count_params, stack_layers
from lm.nn.moe import MoeMlp, balance_loss, route, top_k_gates
from lm.parallel import sharding
from lm.training import experts, train
from lm.training.metrics import flops_per_token
from lm.training.optim import weight_decay_mask


def _moe_config(**knobs):
  config = config_lib.base_config()
  config.model.update(vocab_size=97, max_len=16, num_layers=2, num_heads=2, d_model=16, mlp_dim=32,
                      moe_experts=4, moe_top_k=2, moe_capacity_factor=0.0)
  config.model.update(**knobs)
  return config


def test_every_token_goes_to_its_top_k_experts_with_gates_summing_to_one():
  probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (3, 10, 5)))
  dispatch, combine = route(probs, top_k=2, capacity=10)
  np.testing.assert_array_equal(dispatch.sum(axis=(2, 3)), 2)  # Two experts, one slot each.
  experts = np.asarray(dispatch.any(-1))
  top2 = np.argsort(-np.asarray(probs), axis=-1)[..., :2]
  for b in range(3):
    for l in range(10):
      assert set(np.flatnonzero(experts[b, l])) == set(top2[b, l])
  np.testing.assert_allclose(combine.sum(axis=(2, 3)), 1.0, rtol=1e-6)
  # No two tokens share a slot.
  assert dispatch.sum(axis=1).max() == 1


def test_capacity_keeps_the_earliest_tokens():
  probs = jnp.tile(jnp.array([0.7, 0.2, 0.1]), (1, 6, 1))  # Every token prefers expert 0, then 1.
  dispatch, combine = route(probs, top_k=1, capacity=2)
  np.testing.assert_array_equal(dispatch[0, :, 0].sum(-1), [1, 1, 0, 0, 0, 0])
  assert not dispatch[0, :, 1:].any()  # A dropped choice goes nowhere else.
  np.testing.assert_allclose(combine[0, :2, 0].sum(-1), 0.7, rtol=1e-6)  # Top-1: the raw probability.


@pytest.mark.parametrize('impl', ['capacity', 'dropless'])
def test_moe_layer_is_the_gate_weighted_sum_of_its_top_k_experts(impl):
  config = _moe_config(moe_impl=impl)
  layer = MoeMlp(ml_collections.FrozenConfigDict(config.model))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
  out = np.asarray(layer.apply({'params': params}, x))
  p = jax.tree.map(np.asarray, params)
  xs = np.asarray(x, np.float64)
  logits = xs @ p['router_kernel']
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for b in range(2):
    for l in range(6):
      top = np.argsort(-probs[b, l])[:2]
      gates = probs[b, l, top] / probs[b, l, top].sum()
      expected = sum(g * (np.asarray(nn.gelu(xs[b, l] @ p['up_kernel'][e] + p['up_bias'][e])) @ p['down_kernel'][e]
                           + p['down_bias'][e])
                     for g, e in zip(gates, top))
      np.testing.assert_allclose(out[b, l], expected, rtol=2e-4, atol=2e-5)


def test_balance_loss_is_one_for_a_uniform_router_and_more_otherwise():
  uniform = jnp.full((4, 8, 6), 1 / 6)
  assert float(balance_loss(uniform, top_k=2)) == pytest.approx(1.0, abs=1e-6)
  for seed in range(5):
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.PRNGKey(seed), (4, 8, 6)))
    assert float(balance_loss(probs, top_k=2)) > 1.0
  collapsed = jax.nn.softmax(jnp.tile(jnp.array([9.0, 0, 0, 0, 0, 0]), (4, 8, 1)))
  assert float(balance_loss(collapsed, top_k=1)) > 5.9  # Nearly E: all tokens on one expert.
  # Each sequence on its own expert: the batch is balanced, every sequence collapsed (DeepSeek-V3's
  # sequence-wise loss sees it; the batch's does not).
  split = jax.nn.softmax(jnp.stack([jnp.tile(jnp.array([9.0, 0]), (8, 1)), jnp.tile(jnp.array([0, 9.0]), (8, 1))]))
  assert float(balance_loss(split, top_k=1)) == pytest.approx(1.0, abs=1e-3)
  assert float(balance_loss(split, top_k=1, per_sequence=True)) == pytest.approx(2.0, abs=1e-3)
  assert float(balance_loss(uniform, top_k=2, per_sequence=True)) == pytest.approx(1.0, abs=1e-6)


def test_the_layer_sows_the_sequence_wise_loss_when_asked():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 16))
  losses = {}
  for per_sequence in (False, True):
    layer = MoeMlp(ml_collections.FrozenConfigDict(_moe_config(moe_balance_per_sequence=per_sequence).model))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
    _, aux = layer.apply({'params': params}, x, mutable=['aux_loss'])
    probs = jax.nn.softmax(jnp.einsum('BLD,DE->BLE', x, params['router_kernel']))
    [losses[per_sequence]] = jax.tree.leaves(aux['aux_loss'])
    np.testing.assert_allclose(losses[per_sequence], balance_loss(probs, 2, per_sequence), rtol=1e-6)
  assert float(losses[True]) > float(losses[False])  # Sequences lean more than the batch does.


def test_moe_every_places_experts_on_every_nth_block_with_their_own_logical_axis():
  config = _moe_config(num_layers=4, moe_every=2)
  # Names, shapes and logical axes are all this test reads: no parameter need be computed.
  model = make_model(config.model, config.data)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  assert [('moe' in boxed[f'block_{i}'], 'mlp' in boxed[f'block_{i}']) for i in range(4)] == \
      [(False, True), (True, False), (False, True), (True, False)]
  specs = nn.get_partition_spec(boxed)['block_1']['moe']
  assert specs['up_kernel'] == jax.sharding.PartitionSpec('expert', 'embed', 'mlp')
  assert specs['down_kernel'] == jax.sharding.PartitionSpec('expert', 'mlp', 'embed')
  assert nn.meta.unbox(boxed)['block_1']['moe']['up_kernel'].shape == (4, 16, 32)
  decayed = weight_decay_mask(nn.meta.unbox(boxed))['block_1']['moe']
  assert decayed == {'router_kernel': True, 'up_kernel': True, 'up_bias': False, 'down_kernel': True,
                     'down_bias': False}
  # DeepSeek-V3's layout: dense first blocks, then experts (moe_first_dense; FLOPs count each kind).
  first_dense = _moe_config(num_layers=4, moe_first_dense=2)
  boxed = jax.eval_shape(make_model(first_dense.model, first_dense.data).init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 8), jnp.int32))['params']
  assert ['moe' in boxed[f'block_{i}'] for i in range(4)] == [False, False, True, True]
  dense, moe = _moe_config(num_layers=4, moe_experts=0), _moe_config(num_layers=4)
  per_layer = lambda c: flops_per_token(c.model, c.data) / 4
  assert flops_per_token(first_dense.model, first_dense.data) == 2 * per_layer(dense) + 2 * per_layer(moe)


@pytest.mark.slow
def test_moe_balance_loss_reaches_the_training_loss():
  config = _moe_config(moe_capacity_factor=1.0)
  model = make_model(config.model, config.data)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params'])
  batch = {'tokens': jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 97), 'loss_mask': jnp.ones((2, 8), bool)}
  plain, count, balance = train.loss_sums(params, batch, model)
  weighted, _, _ = train.loss_sums(params, batch, model, moe_balance_loss=0.5)
  assert float(balance) >= 1.0
  np.testing.assert_allclose(float(weighted - plain), 0.5 * float(balance) * float(count), rtol=1e-5)


@pytest.mark.parametrize('top_k', [1, 2])
def test_the_task_loss_trains_the_router(top_k):
  """Top-1 gates are the raw router probability (Switch): renormalised they would be 1 and the
  router would learn from the balance loss alone."""
  layer = MoeMlp(ml_collections.FrozenConfigDict(_moe_config(moe_top_k=top_k).model))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2))(params)
  ratio = np.abs(grads['router_kernel']).max() / np.abs(grads['up_kernel']).max()
  assert ratio > 1e-2, ratio  # Renormalised top-1 gates would leave it ~1e-6 (rounding).


@pytest.mark.parametrize('implementation', grouped.IMPLEMENTATIONS)
@pytest.mark.parametrize('counts', [[5, 9, 1, 17], [0, 0, 0, 32]])
def test_grouped_products_equal_each_items_own_product_forward_and_backward(implementation, counts):
  # 32 items (16 tokens, 2 choices each) in groups 0, 2, 3, 5 (1 and 4 empty), over and under a block of
  # 4 rows, or all in one group; items in shuffled order. Rows go in by rows_of_tokens and out by
  # items_of_rows, whose gradients are gathers of their own.
  groups = jnp.asarray(np.random.RandomState(0).permutation(np.repeat([0, 2, 3, 5], counts)))
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 3))

  def reference(x, w):
    return jnp.einsum('ND,NDF->NF', jnp.repeat(x, 2, axis=0), w[groups])

  def grouped_product(x, w):
    grouping = grouped.group_rows(groups, 6, implementation, block_rows=4)
    return grouped.items_of_rows(grouped.grouped_matmul(grouped.rows_of_tokens(x, grouping), w, grouping), grouping)

  grouping = grouped.group_rows(groups, 6, implementation, block_rows=4)
  # 'blocks': room for any sizes, 32 rows plus 3 of padding per group, in blocks of 4.
  assert int(grouping.valid_R.sum()) == 32 and len(grouping.item_R) == (52 if implementation == 'blocks' else 32)
  np.testing.assert_array_equal(grouping.group_R[grouping.row_N], groups)
  np.testing.assert_array_equal(grouping.item_R[grouping.row_N], np.arange(32))
  x_RD = grouped.rows_of_tokens(x, grouping)
  assert not np.any(x_RD[~grouping.valid_R])  # Padding rows hold zeros.
  np.testing.assert_allclose(grouped_product(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for got, want in zip(jax.grad(loss(grouped_product), (0, 1))(x, w), jax.grad(loss(reference), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('implementation, knobs', [pytest.param('blocks', {}, marks=pytest.mark.slow),
                                                     ('ragged_dot', {'mlp': 'swiglu', 'use_bias': False,
                                                                     'moe_top_k': 1})])
def test_dropless_equals_capacity_where_nothing_is_dropped_forward_and_gradients(implementation, knobs):
  """moe_capacity_factor=0 gives every expert room for every token: the two dispatches compute the same."""
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16))
  capacity = MoeMlp(ml_collections.FrozenConfigDict(_moe_config(**knobs).model))
  dropless = MoeMlp(ml_collections.FrozenConfigDict(_moe_config(
      moe_impl='dropless', moe_grouped_impl=implementation, **knobs).model))
  params = nn.meta.unbox(capacity.init(jax.random.PRNGKey(2), x)['params'])
  same = nn.meta.unbox(dropless.init(jax.random.PRNGKey(2), x)['params'])
  assert jax.tree.structure(params) == jax.tree.structure(same)  # The same parameters: checkpoints carry over.

  def loss(layer):
    return lambda params, x: jnp.sum(jnp.tanh(layer.apply({'params': params}, x)) * jnp.arange(16.0))

  np.testing.assert_allclose(dropless.apply({'params': params}, x), capacity.apply({'params': params}, x),
                             rtol=1e-5, atol=1e-5)
  got, want = jax.grad(loss(dropless), (0, 1))(params, x), jax.grad(loss(capacity), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 6 s on 2 cores: three layers compiled.
def test_dropless_keeps_the_tokens_capacity_drops():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16))
  tight = _moe_config(moe_capacity_factor=0.25)  # One slot per expert and sequence: most choices dropped.
  capacity = MoeMlp(ml_collections.FrozenConfigDict(tight.model))
  dropless = MoeMlp(ml_collections.FrozenConfigDict(_moe_config(moe_impl='dropless').model))
  unbounded = MoeMlp(ml_collections.FrozenConfigDict(_moe_config().model))
  params = nn.meta.unbox(capacity.init(jax.random.PRNGKey(2), x)['params'])
  kept = unbounded.apply({'params': params}, x)
  np.testing.assert_allclose(dropless.apply({'params': params}, x), kept, rtol=1e-5, atol=1e-5)
  changed = np.abs(np.asarray(capacity.apply({'params': params}, x) - kept)).max(-1) > 1e-6
  assert changed.mean() > 0.5  # Capacity changed most tokens' outputs: it dropped one of their experts.


@pytest.mark.slow
def test_a_scanned_dropless_model_trains_like_the_capacity_one():
  """The whole model, its layers scanned: dropless and (unbounded) capacity give the same loss and gradients."""
  batch = {'tokens': jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 97), 'loss_mask': jnp.ones((2, 8), bool)}
  results = []
  for impl in ('capacity', 'dropless'):
    config = _moe_config(moe_impl=impl, scan_layers=True, mlp='swiglu')
    model = make_model(config.model, config.data)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params'])
    loss = lambda p: train.loss_sums(p, batch, model, moe_balance_loss=0.01)[0]  # noqa: B023 (used at once)
    results.append(jax.value_and_grad(loss)(params))
  (loss_a, grads_a), (loss_b, grads_b) = results
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_group_limited_routing_chooses_within_the_best_groups_by_their_two_best_scores():
  # Four groups of two experts: group 1 has the single best expert, but group 0's two scores sum higher.
  scores = jnp.array([[[0.8, 0.7, 0.95, 0.1, 0.5, 0.5, 0.2, 0.2]]])
  gates, experts = top_k_gates(scores, top_k=2, normalize=False, groups=4, top_groups=1)
  assert sorted(np.asarray(experts)[0, 0].tolist()) == [0, 1]
  np.testing.assert_allclose(np.sort(np.asarray(gates)[0, 0]), [0.7, 0.8], rtol=1e-6)
  gates, experts = top_k_gates(scores, top_k=3, normalize=True, scale=2.5, groups=4, top_groups=2)
  assert sorted(np.asarray(experts)[0, 0].tolist()) == [0, 1, 2]  # Groups 0 (1.5) and 1 (1.05).
  np.testing.assert_allclose(np.asarray(gates).sum(), 2.5, rtol=1e-6)
  gates, experts = top_k_gates(scores, top_k=1)  # No groups: the best expert, its raw score.
  assert int(experts[0, 0, 0]) == 2 and float(gates[0, 0, 0]) == pytest.approx(0.95)


@pytest.mark.parametrize('impl', ['capacity', 'dropless'])
def test_sigmoid_grouped_routing_with_a_shared_expert_equals_a_per_token_reference(impl):
  """DeepSeek-V3's recipe: sigmoid scores, group-limited choice, renormalised and scaled gates,
  fine-grained experts (moe_mlp_dim) and a shared expert, computed token by token by hand."""
  config = _moe_config(moe_impl=impl, mlp='swiglu', use_bias=False, moe_experts=8, moe_top_k=3, moe_mlp_dim=8,
                       moe_router_score='sigmoid', moe_groups=4, moe_top_groups=2, moe_routed_scale=2.5,
                       moe_shared_experts=1)
  layer = MoeMlp(ml_collections.FrozenConfigDict(config.model))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
  assert params['up_kernel'].shape == (8, 16, 8) and params['shared']['up']['kernel'].shape == (16, 8)
  out = np.asarray(layer.apply({'params': params}, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda h: h / (1 + np.exp(-h))
  expert = lambda v, e: (silu(v @ p['gate_kernel'][e]) * (v @ p['up_kernel'][e])) @ p['down_kernel'][e]
  s = p['shared']
  for b in range(2):
    for l in range(5):
      v = np.asarray(x[b, l], np.float64)
      scores = 1 / (1 + np.exp(-(v @ p['router_kernel'])))
      group_scores = [np.sort(scores[2 * g:2 * g + 2]).sum() for g in range(4)]
      allowed = [e for e in range(8) if e // 2 in np.argsort(group_scores)[-2:]]
      top = sorted(allowed, key=lambda e: -scores[e])[:3]
      gates = 2.5 * scores[top] / scores[top].sum()
      shared = (silu(v @ s['gate']['kernel']) * (v @ s['up']['kernel'])) @ s['down']['kernel']
      expected = sum(g * expert(v, e) for g, e in zip(gates, top)) + shared
      np.testing.assert_allclose(out[b, l], expected, rtol=2e-4, atol=2e-5)


def test_active_parameters_count_top_k_of_each_layers_experts():
  config = _moe_config()  # Per MoE layer: 4 experts of up [16, 32] + bias 32, down [32, 16] + bias 16.
  boxed = jax.eval_shape(make_model(config.model, config.data).init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 8), jnp.int32))['params']
  params = nn.meta.unbox(boxed)
  per_expert = 16 * 32 + 32 + 32 * 16 + 16
  assert count_params(params) - count_active_params(params, config.model) == 2 * (4 - 2) * per_expert


def test_flops_count_the_active_experts_shared_ones_and_the_router():
  config = _moe_config(mlp='swiglu', moe_experts=8, moe_top_k=3, moe_mlp_dim=8, moe_shared_experts=2)
  dense = _moe_config(mlp='swiglu', moe_experts=0)
  # Per MoE layer and token: 3 routed and 2 shared experts of 3 matrices 16 x 8, and the 16 x 8 router,
  # where the dense model has one MLP of 3 matrices 16 x 32: 6 FLOPs per weight, two layers.
  moe_weights, dense_weights = (3 + 2) * 3 * 16 * 8 + 16 * 8, 3 * 16 * 32
  assert flops_per_token(config.model, config.data) - flops_per_token(dense.model, dense.data) == (
      6 * 2 * (moe_weights - dense_weights))


@pytest.mark.slow  # 8 s on 2 cores.
@pytest.mark.parametrize('microbatches', [1, 2])
def test_the_train_step_reports_the_experts_load_imbalance_and_drops(microbatches):
  config = _moe_config(moe_capacity_factor=0.5, num_layers=2)  # 0.5 x 2 x 16 / 4 = 4 slots per expert and sequence.
  config.data.update(seq_len=16, batch_size=4, tokenizer='byte')
  config.model.vocab_size = 260
  config.train.microbatches = microbatches
  layout = train.make_layout(config_lib.validate(config), jax.devices()[:1])
  state = train.init_train_state(layout)
  batch = {'tokens': jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 97), 'loss_mask': jnp.ones((4, 16), bool)}
  model = layout.model
  _, aux = jax.jit(lambda p: model.apply({'params': p}, batch['tokens'][:, :-1], mutable=['moe_stats']))(
      state.params)
  sums = experts.moe_sums(aux['moe_stats'])
  load = np.asarray(sums['load'])
  assert load.shape == (2, 4) and (load.sum(-1) == 4 * 16 * 2).all()  # Every token's two choices, per layer.
  with sharding.activate(layout.mesh, layout.rules):
    _, metrics = jax.jit(functools.partial(train.train_step, model=model, optimizer=layout.optimizer,
                                           schedule=layout.schedule, microbatches=microbatches))(state, batch)
  np.testing.assert_allclose(metrics['moe/imbalance'], (load.max(-1) / load.mean(-1)).max(), rtol=1e-6)
  # Each sequence keeps at most 4 slots x 4 experts of its 16 x 2 choices per layer.
  assert 0.5 <= float(metrics['moe/dropped']) < 1


@pytest.mark.slow  # 22 s on 2 cores.
def test_dense_first_blocks_scan_as_their_own_stack_equal_to_the_unscanned_model():
  batch = {'tokens': jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 97), 'loss_mask': jnp.ones((2, 8), bool)}
  results = []
  for scan in (False, True):
    config = _moe_config(num_layers=3, moe_first_dense=1, moe_impl='dropless', scan_layers=scan)
    model = make_model(config.model, config.data)
    if not scan:
      params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params'])
    else:
      params = stack_layers(params, config.model)  # noqa: F821 (the unscanned params of the first pass)
      assert params['dense_blocks']['mlp']['up']['kernel'].shape == (1, 16, 32)
      assert params['blocks']['moe']['up_kernel'].shape == (2, 4, 16, 32)
    loss = lambda p: train.loss_sums(p, batch, model, moe_balance_loss=0.01)[0]  # noqa: B023 (used at once)
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss_a, grads_a), (loss_b, grads_b) = results
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  grads_a = stack_layers(grads_a, _moe_config(num_layers=3, moe_first_dense=1).model)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_router_bias_steers_the_choice_but_not_the_gates_and_gets_no_gradient():
  scores = jnp.array([[[0.9, 0.6, 0.5, 0.1]]])
  bias = jnp.array([0.0, 0.0, 0.2, 0.0])  # Lifts expert 2 (0.7) above expert 1 (0.6) for the choice.
  gates, chosen = top_k_gates(scores, top_k=2, normalize=False, bias_E=bias)
  assert np.asarray(chosen)[0, 0].tolist() == [0, 2]
  np.testing.assert_allclose(np.asarray(gates)[0, 0], [0.9, 0.5], rtol=1e-6)  # Unbiased scores.
  grad = jax.grad(lambda b: jnp.sum(top_k_gates(scores, 2, bias_E=b)[0] ** 2))(bias)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.slow  # 8 s on 2 cores.
def test_bias_balancing_evens_out_a_skewed_router():
  """DeepSeek-V3's rule repeated on fixed inputs: the overloaded experts' bias falls, the others' rises,
  until the load is nearly even (a wrong sign would make it worse)."""
  config = _moe_config(moe_experts=8, moe_top_k=2, moe_router_score='sigmoid', moe_router_bias=True,
                       moe_bias_rate=0.005, moe_impl='dropless')
  layer = MoeMlp(ml_collections.FrozenConfigDict(config.model))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 64, 16)).at[..., 0].set(1.0)
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
  params['router_kernel'] = params['router_kernel'].at[0, :2].add(1.0)  # Experts 0 and 1 favoured by every token.
  load_of = jax.jit(lambda p: sum(layer.apply({'params': p}, x, mutable=['moe_stats'])[1]['moe_stats']['load']))
  balance = jax.jit(lambda p, load: experts.balance_router_bias({'moe': p}, {'moe': load}, 0.005)['moe'])
  imbalances = []
  for _ in range(60):
    load = load_of(params)
    imbalances.append(float(np.max(load) / np.mean(load)))
    params = balance(params, load)
  assert imbalances[0] == 4.0 and max(imbalances[-10:]) < 1.5, imbalances  # Then it oscillates by about the rate.
  assert params['router_bias'][0] < 0 and params['router_bias'][1] < 0


@pytest.mark.slow  # 9 s on 2 cores.
def test_the_train_step_moves_the_bias_by_the_batch_load_and_the_optimizer_never_does():
  config = _moe_config(moe_router_score='sigmoid', moe_router_bias=True, moe_bias_rate=0.01, moe_impl='dropless',
                       scan_layers=True)
  config.data.update(seq_len=16, batch_size=4, tokenizer='byte')
  config.model.vocab_size = 260
  config.train.microbatches = 2
  config.optimizer.weight_decay = 0.1
  layout = train.make_layout(config_lib.validate(config), jax.devices()[:1])
  state = train.init_train_state(layout)
  batch = {'tokens': jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 97), 'loss_mask': jnp.ones((4, 16), bool)}
  _, aux = jax.jit(lambda p: layout.model.apply({'params': p}, batch['tokens'][:, :-1], mutable=['moe_stats']))(
      state.params)
  load = np.asarray(aux['moe_stats']['blocks']['moe']['load'][0])  # [layers, experts] over the whole batch.
  with sharding.activate(layout.mesh, layout.rules):
    step = jax.jit(functools.partial(train.train_step, model=layout.model, optimizer=layout.optimizer,
                                     schedule=layout.schedule, microbatches=2))
    new, _ = step(state, batch)
  expected = 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(new.params['blocks']['moe']['router_bias'], expected, rtol=1e-6)
  assert np.abs(expected).sum() > 0
