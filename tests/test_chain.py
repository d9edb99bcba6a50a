"""Tests for optax_accum.chain."""

import chex
from helpers import count_compiles
from helpers import train_accumulated
from helpers import train_large_batch
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_accum

K = 5


def test_accumulate_with_inner_keeps_its_inner_first(problem):
  params, xs, ys = problem
  # chain(accumulate(k, b), c) is accumulate(k, chain(b, c)).
  tx = optax_accum.chain(
    optax_accum.accumulate(K, optax.clip_by_global_norm(0.5)),
    optax.adam(1e-2),
  )
  got, state = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, want_state = train_large_batch(
    optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
    params,
    xs,
    ys,
  )
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    state.inner_opt_state, want_state, rtol=1e-5, atol=1e-6
  )


def test_accumulator_alone_is_returned_as_is():
  acc = optax_accum.accumulate(K)
  assert optax_accum.chain(acc) is acc


def test_without_an_accumulator_it_is_optax_chain(problem):
  params, xs, ys = problem
  ours = optax_accum.chain(optax.scale(0.5), optax.sgd(0.1))
  got, _ = train_large_batch(ours, params, xs, ys)
  want, _ = train_large_batch(
    optax.chain(optax.scale(0.5), optax.sgd(0.1)), params, xs, ys
  )
  chex.assert_trees_all_equal(got, want)


def test_two_accumulators_raise_with_their_positions():
  with pytest.raises(
    ValueError,
  ):
    optax_accum.chain(
      optax_accum.accumulate(2), optax.sgd(0.1), optax_accum.accumulate(3)
    )


def test_an_element_that_is_not_a_transformation_raises():
  with pytest.raises(
    TypeError,
  ):
    optax_accum.chain(optax_accum.accumulate(2), optax.adam)


def test_chain_state_holds_the_gated_elements_inside_the_accumulator():
  tx = optax_accum.chain(
    optax.scale(1.0),
    optax_accum.accumulate(2),
    optax.scale(2.0),
    optax.adam(1e-3),
  )
  state = tx.init(jnp.zeros(3))
  assert isinstance(state[1], optax_accum.AccumulateState)
  assert len(state[1].inner_opt_state) == 2


# Accumulators inside other transformations: only the exact form passes.


@pytest.mark.parametrize(
  "hide",
  [
    lambda acc: optax.chain(optax.clip_by_global_norm(1.0), acc),
    lambda acc: optax.named_chain(("acc", acc)),
    lambda acc: optax.masked(acc, {"w": True, "b": False}),
    lambda acc: optax.partition(
      {"a": acc, "z": optax.identity()}, {"w": "a", "b": "z"}
    ),
    lambda acc: optax.MultiSteps(acc, 2).gradient_transformation(),
    lambda acc: optax_accum.chain(optax.scale(1.0), acc),
  ],
)
def test_an_element_hiding_the_chainable_form_is_refused_at_init(hide):
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  tx = optax_accum.chain(hide(optax_accum.accumulate(3)), optax.adam(1e-2))
  with pytest.raises(ValueError) as e:
    tx.init(params)
  assert e.value.argument == "transforms[0]"


def test_inject_hyperparams_of_the_exact_form_is_the_large_batch(problem):
  params, xs, ys = problem
  tx = optax_accum.chain(
    optax.inject_hyperparams(optax_accum.accumulate)(
      every_k_schedule=K, inner=optax.adam(1e-2)
    )
  )
  got, state = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert int(_adam(state).count) == len(xs)


def test_partition_of_exact_forms_as_the_last_element_is_allowed(problem):
  params, xs, ys = problem
  labels = {"w": "w", "b": "b"}
  tx = optax_accum.chain(
    optax.partition(
      {
        "w": optax_accum.accumulate(K, optax.adam(1e-2)),
        "b": optax_accum.accumulate(K, optax.adam(1e-2)),
      },
      labels,
    )
  )
  got, _ = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def _adam(state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))


def test_eager_chain_compiles_nothing_after_its_first_window():
  tx = optax_accum.chain(
    optax.clip_by_global_norm(1.0), optax_accum.accumulate(3), optax.adam(0.1)
  )
  params = {"w": jnp.ones((5, 4))}
  grads = {"w": jnp.ones((5, 4))}
  state = tx.init(params)
  for _ in range(3):  # one window: both branches run once
    _, state = tx.update(grads, state, params)
  with count_compiles() as compiles:
    for _ in range(6):
      _, state = tx.update(grads, state, params)
  assert not compiles
  assert int(state[1].gradient_step) == 3


def test_eager_chain_still_checks_a_concrete_weight():
  tx = optax_accum.chain(
    optax.scale(1.0), optax_accum.accumulate(2), optax.sgd(0.1)
  )
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError):
    tx.update(jnp.ones(2), state, weight=-1.0)


def test_schedule_injected_after_the_accumulator_counts_gradient_steps(
  problem,
):
  params, xs, ys = problem
  schedule = optax.linear_schedule(1e-2, 1e-3, len(xs))
  opt = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
  tx = optax_accum.chain(optax_accum.accumulate(K), opt())
  got, state = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, want_state = train_large_batch(opt(), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    state.inner_opt_state.hyperparams, want_state.hyperparams
  )
