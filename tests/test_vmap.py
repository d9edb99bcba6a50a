"""Ensembles under jax.vmap with shared counters (issue 9)."""

import chex
from helpers import grad_fn
from helpers import make_problem
from helpers import microbatches
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_accum

K = 4
MEMBERS = 3


def _tx():
  return optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-2))


def _step(tx):
  def step(params, state, x, y):
    grads = grad_fn(params, x, y)
    return optax_accum.apply_gradients(tx, grads, state, params)

  return step


def _ensemble():
  problems = [make_problem(seed=s, steps=2) for s in range(MEMBERS)]
  stack = lambda *xs: jnp.stack(xs)
  params = jax.tree.map(stack, *[p for p, _, _ in problems])
  xs = jnp.stack([x for _, x, _ in problems], 1)  # (steps, members, ...)
  ys = jnp.stack([y for _, _, y in problems], 1)
  return problems, params, xs, ys


def test_shared_counters_train_each_member_as_alone():
  problems, params, xs, ys = _ensemble()
  tx = _tx()
  state, axes = optax_accum.share_counters(jax.vmap(tx.init)(params))
  step = jax.jit(
    jax.vmap(_step(tx), in_axes=(0, axes, 0, 0), out_axes=(0, axes))
  )
  for x, y in zip(xs, ys):
    for m in range(K):
      n = x.shape[1] // K
      params, state = step(
        params, state, x[:, m * n : (m + 1) * n], y[:, m * n : (m + 1) * n]
      )
  assert int(state.gradient_step) == 2
  for i, (p0, x_i, y_i) in enumerate(problems):
    alone_tx = _tx()
    p, s = p0, alone_tx.init(p0)
    for x, y in zip(x_i, y_i):
      for xm, ym in microbatches(x, y, K):
        p, s = _step(alone_tx)(p, s, xm, ym)
    member = jax.tree.map(lambda a, i=i: a[i], params)
    chex.assert_trees_all_close(member, p, rtol=1e-5, atol=1e-6)


def test_shared_counters_keep_the_conditional_under_vmap():
  _, params, xs, ys = _ensemble()
  tx = _tx()
  stacked = jax.vmap(tx.init)(params)
  state, axes = optax_accum.share_counters(stacked)
  x, y = xs[0][:, :10], ys[0][:, :10]
  shared = jax.jit(
    jax.vmap(_step(tx), in_axes=(0, axes, 0, 0), out_axes=(0, axes))
  )
  hlo = shared.lower(params, state, x, y).compile().as_text()
  assert "conditional(" in hlo
  # Without it, the batched predicate turns the conditional into a select.
  batched = jax.jit(jax.vmap(_step(tx)))
  assert "conditional(" not in (
    batched.lower(params, stacked, x, y).compile().as_text()
  )


def test_members_that_disagree_raise_naming_the_counter():
  tx = optax_accum.accumulate(2)
  state = jax.vmap(tx.init)(jnp.zeros((2, 3)))
  state = state._replace(mini_step=jnp.array([0, 1], jnp.int32))
  with pytest.raises(ValueError):
    optax_accum.share_counters(state)


def test_a_state_without_an_accumulator_raises():
  with pytest.raises(ValueError):
    optax_accum.share_counters(optax.adam(1e-3).init(jnp.zeros(2)))


def test_a_skip_function_is_refused_with_the_way_out():
  tx = optax_accum.accumulate(
    2, optax.sgd(0.1), should_skip_update_fn=optax.skip_not_finite
  )
  state = jax.vmap(tx.init)(jnp.zeros((2, 3)))
  with pytest.raises(
    ValueError,
  ):
    optax_accum.share_counters(state)


def test_per_member_value_is_not_shared():
  tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.1))
  members = jnp.zeros((3, 2))
  state, axes = optax_accum.share_counters(jax.vmap(tx.init)(members))
  step = jax.vmap(
    lambda p, s, g, v: optax_accum.apply_gradients(tx, g, s, p, value=v),
    in_axes=(0, axes, 0, 0),
    out_axes=(0, axes),
  )
  values = jnp.array([1.0, 2.0, 3.0])
  _, state = step(members, state, jnp.ones((3, 2)), values)
  chex.assert_trees_all_close(state.acc_value, values)  # each member's sum


def test_chain_without_an_accumulator_refuses_weight_and_flush():
  tx = optax_accum.chain(optax.clip(10.0), optax.sgd(1.0))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError):
    optax_accum.apply_gradients(
      tx, params, state, params, weight=5.0, flush=True
    )
  with pytest.raises(ValueError):
    tx.update(params, state, params, weight=0.0)


def test_a_state_not_stacked_per_member_raises_saying_how():
  state = _tx().init(jnp.zeros(3))
  with pytest.raises(ValueError):
    optax_accum.share_counters(state)
