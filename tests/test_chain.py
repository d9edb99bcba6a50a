"""Tests for optax_accum.chain."""

import chex
from helpers import count_compiles
from helpers import train_accumulated
from helpers import train_large_batch
import jax
import jax.numpy as jnp
import numpy as np
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
    match=r"at most one.*got 2 at positions "
    r"\[0, 2\]",
  ):
    optax_accum.chain(
      optax_accum.accumulate(2), optax.sgd(0.1), optax_accum.accumulate(3)
    )


def test_an_element_that_is_not_a_transformation_raises():
  with pytest.raises(
    TypeError,
    match=r"chain element 1 must be an "
    r"optax.GradientTransformation.*function",
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


# Accumulators wrapped in other transformations (issue 8).


def test_accumulator_in_a_nested_optax_chain_matches_large_batch(problem):
  params, xs, ys = problem
  # The clip never binds here, so clipping micro-batches or the large batch
  # is the same.
  tx = optax_accum.chain(
    optax.chain(optax.clip_by_global_norm(1e3), optax_accum.accumulate(K)),
    optax.adam(1e-2),
  )
  got, state = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(
    optax.chain(optax.clip_by_global_norm(1e3), optax.adam(1e-2)),
    params,
    xs,
    ys,
  )
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert int(_adam(state).count) == len(xs)


def test_nested_optax_chain_equals_the_flat_chain(problem):
  params, xs, ys = problem
  # A binding clip runs per micro-batch in both: the same optimizer.
  nested = optax_accum.chain(
    optax.chain(optax.clip_by_global_norm(0.5), optax_accum.accumulate(K)),
    optax.adam(1e-2),
  )
  flat = optax_accum.chain(
    optax.clip_by_global_norm(0.5),
    optax_accum.accumulate(K),
    optax.adam(1e-2),
  )
  got, _ = train_accumulated(nested, params, xs, ys, lambda i: K)
  want, _ = train_accumulated(flat, params, xs, ys, lambda i: K)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_accumulator_in_a_chain_is_gated(problem):
  params, xs, ys = problem
  tx = optax_accum.chain(
    optax.inject_hyperparams(optax_accum.accumulate)(every_k_schedule=K),
    optax.adam(1e-2),
  )
  got, state = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert int(_adam(state).count) == len(xs)


@pytest.mark.parametrize("wrapper", ["partition", "masked", "multisteps"])
def test_accumulator_that_cannot_gate_raises_saying_what_to_write(wrapper):
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  acc = optax_accum.accumulate(3)
  element = {
    "partition": lambda: optax.partition(
      {"a": acc, "z": optax.identity()}, {"w": "a", "b": "z"}
    ),
    "masked": lambda: optax.masked(acc, {"w": True, "b": False}),
    "multisteps": lambda: optax.MultiSteps(acc, 2).gradient_transformation(),
  }[wrapper]()
  tx = optax_accum.chain(optax.scale(1.0), element, optax.adam(1e-2))
  with pytest.raises(
    ValueError,
    match=r"chain element 1 holds an "
    r"accumulate\(\.\.\.\) inside a \w+State.*Put the "
    r"accumulator at the top level",
  ):
    tx.init(params)


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


def test_two_accumulators_one_of_them_wrapped_raise_at_init():
  tx = optax_accum.chain(
    optax.chain(optax_accum.accumulate(2)),
    optax_accum.accumulate(3),
    optax.sgd(0.1),
  )
  with pytest.raises(
    ValueError, match=r"at most one accumulate.*positions \[0, 1\]"
  ):
    tx.init(jnp.zeros(2))


def _adam(state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))


def test_named_chain_around_the_accumulator_is_gated(problem):
  params, xs, ys = problem
  tx = optax_accum.chain(
    optax.named_chain(("accumulate", optax_accum.accumulate(K))),
    optax.adam(1e-2),
  )
  got, _ = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("last", [True, False])
def test_elements_after_the_accumulator_in_a_nested_chain_raise(last):
  inner = optax.chain(optax_accum.accumulate(3), optax.adam(0.1))
  tx = (
    optax_accum.chain(inner)
    if last
    else optax_accum.chain(inner, optax.scale(1.0))
  )
  with pytest.raises(
    ValueError,
    match=r"element 0 is an optax.chain .*"
    r"elements after its accumulate.*Flatten it",
  ):
    tx.init(jnp.zeros(2))


@pytest.mark.parametrize("wrap", ["nested", "inject"])
def test_value_after_a_wrapped_accumulator_is_the_window_mean(wrap):
  acc = {
    "nested": lambda: optax.chain(optax.identity(), optax_accum.accumulate(2)),
    "inject": lambda: optax.inject_hyperparams(optax_accum.accumulate)(
      every_k_schedule=2
    ),
  }[wrap]()
  plateau = optax.contrib.reduce_on_plateau(
    patience=0, factor=0.5, cooldown=0, accumulation_size=1
  )
  tx = optax_accum.chain(acc, optax.sgd(1.0), plateau)
  params = jnp.zeros(1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  # Window means 1.0 and 0.1; the weight-0 value 100 must not count.
  for value, weight in [(1.0, 1.0), (1.0, 1.0), (0.1, 1.0), (100.0, 0.0)]:
    _, state = step(
      jnp.ones(1), state, params, value=jnp.float32(value), weight=weight
    )
  # The large-batch reference: the plateau fed the window means.
  ref = optax.chain(optax.sgd(1.0), plateau)
  ref_state = ref.init(params)
  for value in (1.0, 0.1):
    _, ref_state = ref.update(
      jnp.ones(1), ref_state, params, value=jnp.float32(value)
    )
  np.testing.assert_allclose(state[2].best_value, 0.1, rtol=1e-6)
  chex.assert_trees_all_close(state[2], ref_state[1])


@pytest.mark.parametrize("wrap", ["nested", "inject"])
def test_eager_wrapped_chain_compiles_once(wrap):
  acc = {
    "nested": lambda: optax.chain(
      optax.clip_by_global_norm(1.0), optax_accum.accumulate(3)
    ),
    "inject": lambda: optax.inject_hyperparams(optax_accum.accumulate)(
      every_k_schedule=3
    ),
  }[wrap]()
  tx = optax_accum.chain(acc, optax.adam(0.1))
  params = {"w": jnp.ones((5, 4))}
  grads = {"w": jnp.ones((5, 4))}
  state = tx.init(params)
  _, state = tx.update(grads, state, params)  # compiles
  with count_compiles() as compiles:
    for _ in range(6):
      _, state = tx.update(grads, state, params)
  assert not compiles
  is_acc = lambda x: isinstance(x, optax_accum.AccumulateState)
  (acc_state,) = [
    s for s in jax.tree.leaves(state, is_leaf=is_acc) if is_acc(s)
  ]
  assert int(acc_state.gradient_step) == 2  # 7 micro-batches, k=3


def test_eager_chain_still_checks_a_concrete_weight():
  tx = optax_accum.chain(
    optax.scale(1.0), optax_accum.accumulate(2), optax.sgd(0.1)
  )
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match=r"`weight` must be a finite number"):
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
