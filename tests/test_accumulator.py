"""The accumulator: dtypes, precision, dtypes of emitted updates."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

FLOATS = [jnp.float32, jnp.float16, jnp.bfloat16]


def _grads(k, shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape) + 1.0, dtype) for _ in range(k)]


def _run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(u)
  return outs, state


def test_bf16_grads_accumulate_in_float32():
  k = 64
  params = jnp.zeros(256, jnp.bfloat16)
  grads = _grads(k, params.shape, jnp.bfloat16)
  outs, state = _run(optax_accum.accumulate(k), params, grads)
  assert state.acc_grads.dtype == jnp.float32
  want = jnp.mean(jnp.stack(grads).astype(jnp.float32), 0).astype(jnp.bfloat16)
  assert outs[-1].dtype == jnp.bfloat16
  np.testing.assert_array_equal(outs[-1], want)
  # A bf16 accumulator loses that exactness on the same data.
  bf16_outs, _ = _run(
    optax_accum.accumulate(k, accumulator_dtype=jnp.bfloat16), params, grads
  )
  assert not np.array_equal(bf16_outs[-1], want)


def test_float64_params_accumulate_in_float64_under_x64():
  with jax.enable_x64(True):
    params = jnp.zeros(8, jnp.float64)
    grads = [g + 1e-12 for g in _grads(4, (8,), jnp.float64)]
    outs, state = _run(optax_accum.accumulate(4), params, grads)
    assert state.acc_grads.dtype == jnp.float64
    assert outs[-1].dtype == jnp.float64
    np.testing.assert_allclose(
      outs[-1], np.mean(np.stack(grads), 0), rtol=1e-14
    )


def test_explicit_float64_is_float32_without_x64():
  state = optax_accum.accumulate(2, accumulator_dtype=jnp.float64).init(
    jnp.zeros(2)
  )
  assert state.acc_grads.dtype == jnp.float32


@pytest.mark.parametrize("bad", [jnp.int32, "not-a-dtype", bool])
def test_non_float_accumulator_dtype_raises(bad):
  with pytest.raises(TypeError):
    optax_accum.accumulate(2, accumulator_dtype=bad)


@pytest.mark.parametrize(
  "param_dtype, grad_dtype", list(itertools.product(FLOATS, FLOATS))
)
def test_updates_have_the_bare_optimizers_dtype(param_dtype, grad_dtype):
  k = 3
  params = {"w": jnp.ones((4, 2), param_dtype), "b": jnp.ones(2, param_dtype)}
  grads = [
    {"w": jnp.full((4, 2), 0.5, grad_dtype), "b": jnp.full(2, 0.5, grad_dtype)}
    for _ in range(k)
  ]
  bare = optax.adamw(1e-3)
  want, _ = bare.update(grads[0], bare.init(params), params)
  outs, state = _run(
    optax_accum.accumulate(k, optax.adamw(1e-3)), params, grads
  )
  for u in outs:  # mid-step zeros and the emitted update alike
    chex.assert_trees_all_equal_dtypes(u, want)
  # Every state leaf keeps its dtype across steps.
  chex.assert_trees_all_equal_dtypes(
    state, optax_accum.accumulate(k, optax.adamw(1e-3)).init(params)
  )


@pytest.mark.parametrize(
  "param_dtype, grad_dtype", list(itertools.product(FLOATS, FLOATS))
)
def test_chainable_form_promotes_nothing_under_strict_promotion(
  param_dtype, grad_dtype
):
  params = jnp.ones(3, param_dtype)
  grads = [jnp.full(3, 0.25, grad_dtype) for _ in range(2)]
  with jax.numpy_dtype_promotion("strict"):
    outs, state = _run(optax_accum.accumulate(2), params, grads)
    # weights and flush too
    tx = optax_accum.accumulate(2)
    s = tx.init(params)
    u, s = tx.update(grads[0], s, params, weight=3.0, flush=True)
  assert all(u.dtype == grad_dtype for u in outs)
  assert state.acc_grads.dtype == jnp.float32
  assert u.dtype == grad_dtype


# The compensated bfloat16 mode.


def _window_errors(accumulator_dtype, k, seed=0, n=4096):
  """Per-element abs error of the emitted mean against a float64 mean.

  Also returns sum_i |g_i| per element, the scale of Kahan's error bound.
  """
  rng = np.random.default_rng(seed)
  grads = [jnp.asarray(rng.normal(size=n), jnp.bfloat16) for _ in range(k)]
  outs, state = _run(
    optax_accum.accumulate(k, accumulator_dtype=accumulator_dtype),
    jnp.zeros(n, jnp.float32),
    [g.astype(jnp.float32) for g in grads],
  )
  g64 = np.stack([np.asarray(g, np.float64) for g in grads])
  err = np.abs(np.asarray(outs[-1], np.float64) - g64.mean(0))
  return err, np.abs(g64).sum(0), state


@pytest.mark.parametrize("k", [64, 256])
def test_a_float32_accumulator_beats_bfloat16_on_a_long_window(k):
  plain, abs_sum, state = _window_errors(jnp.bfloat16, k)
  f32, _, _ = _window_errors(jnp.float32, k)
  assert state.acc_grads.dtype == jnp.bfloat16
  assert f32.max() < plain.max() / 100
  assert np.all(f32 <= abs_sum * 2.0**-20)


def test_kahan_bfloat16_is_gone_float32_costs_the_same_bytes():
  with pytest.raises(TypeError) as e:
    optax_accum.accumulate(2, accumulator_dtype="kahan_bfloat16")
  assert e.value.argument == "accumulator_dtype"


# Numerics of unusual dtypes and values (issue 8).


def test_complex_params_with_a_real_accumulator_dtype_raise():
  tx = optax_accum.accumulate(2, accumulator_dtype=jnp.float32)
  with pytest.raises(
    TypeError,
  ):
    tx.init({"z": jnp.zeros(2, jnp.complex64)})


def test_complex_params_keep_the_imaginary_part_by_default():
  tx = optax_accum.accumulate(2)
  params = jnp.zeros(2, jnp.complex64)
  grads = [
    jnp.array([1 + 2j, 3j], jnp.complex64),
    jnp.array([3 - 4j, 1 + 1j], jnp.complex64),
  ]
  outs, state = _run(tx, params, grads)
  assert state.acc_grads.dtype == jnp.complex64
  np.testing.assert_allclose(outs[-1], [2 - 1j, 0.5 + 2j])


def test_float16_accumulator_dtype_is_rejected():
  with pytest.raises(ValueError):
    optax_accum.accumulate(2, accumulator_dtype=jnp.float16)


def test_float16_params_accumulate_in_float32_without_overflow():
  params = jnp.zeros(4, jnp.float16)
  grads = [jnp.full(4, 60000.0, jnp.float16)] * 4
  outs, state = _run(optax_accum.accumulate(4), params, grads)
  assert state.acc_grads.dtype == jnp.float32
  np.testing.assert_array_equal(outs[-1], np.full(4, 60000.0, np.float16))


def test_grad_norm_is_computed_in_float32():
  params = jnp.zeros(10, jnp.float16)
  grads = [jnp.full(10, 100.0, jnp.float16)]
  _, state = _run(optax_accum.accumulate(1), params, grads)
  # sqrt(10) * 100 = 316.2; its square, 1e5, overflows float16.
  np.testing.assert_allclose(state.grad_norm, np.sqrt(10.0) * 100, rtol=1e-6)
  assert state.grad_norm.dtype == jnp.float32


def test_overflowing_window_is_discarded_with_should_skip_update_fn():
  params = jnp.ones(2)
  tx = optax_accum.accumulate(
    2, optax.adamw(0.1), should_skip_update_fn=optax.skip_not_finite
  )
  big = jnp.full(2, 3e38)  # finite; two of them sum to inf in float32
  outs, state = _run(tx, params, [big, big])
  np.testing.assert_array_equal(outs[-1], np.zeros(2))
  assert not bool(state.has_updated) and int(state.gradient_step) == 0
  assert int(state.inner_opt_state[0].count) == 0  # adamw did not step
  assert not np.isfinite(float(state.grad_norm))
  # The next window is clean.
  outs, state = _run_from(tx, state, params, [jnp.ones(2), jnp.ones(2)])
  assert bool(state.has_updated) and int(state.gradient_step) == 1


def test_overflowing_window_without_a_skip_function_is_applied_as_is():
  params = jnp.ones(2)
  big = jnp.full(2, 3e38)
  outs, state = _run(optax_accum.accumulate(2), params, [big, big])
  assert np.all(np.isinf(outs[-1]))  # documented: not caught
  assert bool(state.has_updated)


def test_zero_weight_microbatch_with_nan_gradient_contributes_nothing():
  tx = optax_accum.accumulate(3)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(jnp.array([1.0, 2.0]), state, params, weight=2.0)
  _, state = step(jnp.full(2, jnp.nan), state, params, weight=0.0)
  u, state = step(jnp.array([4.0, 8.0]), state, params, weight=1.0)
  np.testing.assert_allclose(u, [2.0, 4.0])


def _run_from(tx, state, params, grads):
  step = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(u)
  return outs, state
