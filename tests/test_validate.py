"""Bad arguments raise naming the argument and the value (issue 8)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum


@pytest.mark.parametrize(
  "inner, match",
  [
    (
      optax.adamw,
      r"`inner` must be.*adamw.*call it, as in "
      r"`inner=adamw\(learning_rate\)`",
    ),
    ("adam", r"`inner` must be.*'adam' of type str"),
    (3, r"`inner` must be.*3 of type int"),
  ],
)
def test_inner_that_is_not_a_transformation_raises_naming_inner(inner, match):
  with pytest.raises(TypeError):
    optax_accum.accumulate(2, inner)


def test_nested_accumulate_raises_at_construction():
  inner = optax_accum.accumulate(3, optax.sgd(0.1))
  with pytest.raises(ValueError):
    optax_accum.accumulate(2, inner)


def test_accumulate_hidden_in_inner_raises_at_init():
  tx = optax_accum.accumulate(
    2, optax.chain(optax_accum.accumulate(3), optax.sgd(0.1))
  )
  with pytest.raises(ValueError):
    tx.init(jnp.zeros(2))


@pytest.mark.parametrize(
  "flush", [1, 0.0, "yes", np.array([True]), jnp.array(1)]
)
def test_flush_that_is_not_a_bool_scalar_raises_naming_flush(flush):
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(TypeError):
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
  with pytest.raises(
    ValueError,
  ):
    tx.update(jnp.ones(2), state, weight=weight)


@pytest.mark.parametrize("weight", [True, 1j, "3"])
def test_bool_complex_or_string_weight_raises(weight):
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(TypeError):
    tx.update(jnp.ones(2), state, weight=weight)


def test_complex_gradient_into_a_real_accumulator_raises():
  tx = optax_accum.accumulate(2)
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(TypeError):
    tx.update({"w": jnp.ones(2, jnp.complex64)}, state)


@pytest.mark.parametrize("k", [2**31, 2**40])
def test_every_k_beyond_int32_raises(k):
  with pytest.raises(ValueError):
    optax_accum.accumulate(k)


@pytest.mark.parametrize("axis_name", [3, ("data", 1), ()])
def test_bad_axis_name_raises(axis_name):
  with pytest.raises(TypeError):
    optax_accum.accumulate(2, axis_name=axis_name)


def test_should_skip_update_fn_that_is_not_callable_raises():
  with pytest.raises(TypeError):
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
    every_k_schedule=2, inner=optax.sgd(1.0)
  )
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
  with pytest.raises(ValueError):
    optax.inject_hyperparams(optax_accum.accumulate)(every_k_schedule=0).init(
      jnp.zeros(2)
    )


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_accumulator_dtype_is_rejected_at_construction(dtype):
  with pytest.raises(
    ValueError,
  ):
    optax_accum.accumulate(2, accumulator_dtype=getattr(jnp, dtype))


@pytest.mark.parametrize(
  "big", [2**31, np.int64(2**40), np.array(2**40), np.array(2**32, np.uint64)]
)
def test_schedule_returning_an_integer_beyond_int32_is_clipped(big):
  tx = optax_accum.accumulate(lambda step: big)
  assert int(tx.init(jnp.zeros(2)).every_k) == 2**31 - 1


def test_partial_of_a_factory_as_inner_says_to_call_it():
  with pytest.raises(TypeError):
    optax_accum.accumulate(2, functools.partial(optax.adamw, 1e-3))


def test_multisteps_object_as_inner_says_gradient_transformation():
  with pytest.raises(TypeError):
    optax_accum.accumulate(2, optax.MultiSteps(optax.sgd(0.1), 2))


def test_skip_function_returning_a_bare_bool_raises_naming_it():
  tx = optax_accum.accumulate(
    2, should_skip_update_fn=lambda u, s, p: jnp.asarray(False)
  )
  with pytest.raises(
    ValueError,
  ):
    tx.init(jnp.zeros(2))


def test_empty_axis_name_raises():
  with pytest.raises(TypeError):
    optax_accum.accumulate(2, axis_name="")


def test_a_single_array_param_is_named_as_the_root():
  with pytest.raises(TypeError):
    optax_accum.accumulate(2).init(jnp.zeros(2, jnp.int32))


def test_state_restored_without_a_target_gets_a_clear_error():
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  as_dict = dict(state._asdict())  # what orbax returns without a target
  with pytest.raises(
    TypeError,
  ):
    tx.update(jnp.ones(2), as_dict)
