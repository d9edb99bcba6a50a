"""Bad arguments raise naming the argument and the value (issue 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum


@pytest.mark.parametrize("inner, match", [
    (optax.adamw, r"`inner` must be.*adamw.*call it, as in "
     r"`inner=adamw\(learning_rate\)`"),
    ("adam", r"`inner` must be.*'adam' of type str"),
    (3, r"`inner` must be.*3 of type int"),
])
def test_inner_that_is_not_a_transformation_raises_naming_inner(inner, match):
  with pytest.raises(TypeError, match=match):
    optax_accum.accumulate(2, inner)


def test_nested_accumulate_raises_at_construction():
  inner = optax_accum.accumulate(3, optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"accumulate\(k1 \* k2, opt\)"):
    optax_accum.accumulate(2, inner)


def test_accumulate_hidden_in_inner_raises_at_init():
  tx = optax_accum.accumulate(
      2, optax.chain(optax_accum.accumulate(3), optax.sgd(0.1)))
  with pytest.raises(ValueError, match=r"`inner` holds another accumulate"):
    tx.init(jnp.zeros(2))


@pytest.mark.parametrize("flush", [1, 0.0, "yes", np.array([True]),
                                   jnp.array(1)])
def test_flush_that_is_not_a_bool_scalar_raises_naming_flush(flush):
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(TypeError, match=r"`flush` must be a bool scalar"):
    tx.update(jnp.ones(2), state, flush=flush)


@pytest.mark.parametrize("flush", [True, np.bool_(True), jnp.array(True)])
def test_bool_flushes_are_accepted(flush):
  tx = optax_accum.accumulate(3)
  state = tx.init(jnp.zeros(2))
  u, state = tx.update(jnp.full(2, 4.0), state, flush=flush)
  np.testing.assert_array_equal(u, np.full(2, 4.0))
  assert int(state.gradient_step) == 1


@pytest.mark.parametrize("weight", [1e39, -1e39, 3.5e38 * 2])
def test_weight_beyond_float32_raises(weight):
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match=r"`weight` must be a finite number "
                     r">= 0 in float32"):
    tx.update(jnp.ones(2), state, weight=weight)


@pytest.mark.parametrize("weight", [True, 1j])
def test_bool_or_complex_weight_raises(weight):
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(TypeError, match=r"`weight` must be a real number"):
    tx.update(jnp.ones(2), state, weight=weight)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_or_boolean_gradients_raise_naming_the_leaf(dtype):
  tx = optax_accum.accumulate(2)
  state = tx.init({"w": jnp.zeros(2), "n": jnp.zeros(3)})
  grads = {"w": jnp.ones(2), "n": jnp.ones(3, dtype)}
  with pytest.raises(TypeError, match=r"\['n'\] has dtype .*floating-point "
                     r"gradients only"):
    tx.update(grads, state)


def test_complex_gradient_into_a_real_accumulator_raises():
  tx = optax_accum.accumulate(2)
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(TypeError, match=r"\['w'\] is complex.*imaginary part"):
    tx.update({"w": jnp.ones(2, jnp.complex64)}, state)


@pytest.mark.parametrize("k", [2**31, 2**40])
def test_every_k_beyond_int32_raises(k):
  with pytest.raises(ValueError, match=r"every_k_schedule.*<= 2\*\*31 - 1"):
    optax_accum.accumulate(k)


@pytest.mark.parametrize("axis_name", [3, ("data", 1), ()])
def test_bad_axis_name_raises(axis_name):
  with pytest.raises(TypeError, match=r"`axis_name` must be"):
    optax_accum.accumulate(2, axis_name=axis_name)


def test_should_skip_update_fn_that_is_not_callable_raises():
  with pytest.raises(TypeError, match=r"`should_skip_update_fn` must be"):
    optax_accum.accumulate(2, should_skip_update_fn=True)


def test_python_float_params_work():
  params = {"w": 1.0, "b": 2.0}
  tx = optax_accum.accumulate(2, optax.sgd(1.0))
  state = tx.init(params)
  for g in (0.5, 1.5):
    updates, state = tx.update({"w": g, "b": -g}, state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], 0.0)
  np.testing.assert_allclose(params["b"], 3.0)


def test_inject_hyperparams_makes_k_a_traced_hyperparameter():
  tx = optax.inject_hyperparams(optax_accum.accumulate)(
      every_k_schedule=2, inner=optax.sgd(1.0))
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  flags = []
  for i in range(7):
    if i == 3:  # mid-window: the new k applies from the next window
      state.hyperparams["every_k_schedule"] = jnp.asarray(3)
    _, state = step(jnp.ones(2), state, params)
    flags.append(bool(optax_accum.has_updated(state)))
  assert flags == [False, True, False, True, False, False, True]


def test_inject_hyperparams_with_a_bad_k_raises_naming_it():
  with pytest.raises(ValueError, match=r"every_k_schedule.*got 0"):
    optax.inject_hyperparams(optax_accum.accumulate)(
        every_k_schedule=0).init(jnp.zeros(2))
