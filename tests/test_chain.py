"""Tests for optax_accum.chain."""

import chex
import jax.numpy as jnp
import optax
import pytest

import optax_accum
from conftest import train_accumulated
from conftest import train_large_batch

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
