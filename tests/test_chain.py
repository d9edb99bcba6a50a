"""Tests for optax_accum.chain."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_accum
from helpers import train_accumulated
from helpers import train_large_batch

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
      params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.inner_opt_state, want_state, rtol=1e-5,
                              atol=1e-6)


def test_accumulator_alone_is_returned_as_is():
  acc = optax_accum.accumulate(K)
  assert optax_accum.chain(acc) is acc


def test_without_an_accumulator_it_is_optax_chain(problem):
  params, xs, ys = problem
  ours = optax_accum.chain(optax.scale(0.5), optax.sgd(0.1))
  got, _ = train_large_batch(ours, params, xs, ys)
  want, _ = train_large_batch(optax.chain(optax.scale(0.5), optax.sgd(0.1)),
                              params, xs, ys)
  chex.assert_trees_all_equal(got, want)


def test_two_accumulators_raise_with_their_positions():
  with pytest.raises(ValueError, match=r"at most one.*got 2 at positions "
                     r"\[0, 2\]"):
    optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.1),
                      optax_accum.accumulate(3))


def test_an_element_that_is_not_a_transformation_raises():
  with pytest.raises(TypeError, match=r"chain element 1 must be an "
                     r"optax.GradientTransformation.*function"):
    optax_accum.chain(optax_accum.accumulate(2), optax.adam)


def test_chain_state_holds_the_gated_elements_inside_the_accumulator():
  tx = optax_accum.chain(optax.scale(1.0), optax_accum.accumulate(2),
                         optax.scale(2.0), optax.adam(1e-3))
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
      params, xs, ys)
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
      optax.clip_by_global_norm(0.5), optax_accum.accumulate(K),
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
          {"a": acc, "z": optax.identity()}, {"w": "a", "b": "z"}),
      "masked": lambda: optax.masked(acc, {"w": True, "b": False}),
      "multisteps": lambda: optax.MultiSteps(acc, 2).gradient_transformation(),
  }[wrapper]()
  tx = optax_accum.chain(optax.scale(1.0), element, optax.adam(1e-2))
  with pytest.raises(ValueError, match=r"chain element 1 holds an "
                     r"accumulate\(\.\.\.\) inside a \w+State.*Put the "
                     r"accumulator at the top level"):
    tx.init(params)


def test_partition_of_exact_forms_as_the_last_element_is_allowed(problem):
  params, xs, ys = problem
  labels = {"w": "w", "b": "b"}
  tx = optax_accum.chain(optax.partition({
      "w": optax_accum.accumulate(K, optax.adam(1e-2)),
      "b": optax_accum.accumulate(K, optax.adam(1e-2)),
  }, labels))
  got, _ = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_two_accumulators_one_of_them_wrapped_raise_at_init():
  tx = optax_accum.chain(
      optax.chain(optax_accum.accumulate(2)), optax_accum.accumulate(3),
      optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"at most one accumulate.*positions \[0, 1\]"):
    tx.init(jnp.zeros(2))


def _adam(state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(
      s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))
