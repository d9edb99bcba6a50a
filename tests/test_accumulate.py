"""Tests for optax_accum.accumulate: equivalence, the chainable form, jit."""

import dataclasses
import pickle

import chex
from helpers import count_compiles
from helpers import counting_inner
from helpers import grad_fn
from helpers import make_problem
from helpers import max_abs_diff
from helpers import microbatches
from helpers import stateless
from helpers import train_accumulated
from helpers import train_large_batch
import hlo as hlo_lib
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

K = 5

OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.05),
  "sgd_nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
  "lion": lambda: optax.lion(1e-3),
  "adafactor": lambda: optax.adafactor(1e-2),
  "rmsprop": lambda: optax.rmsprop(1e-2),
  "clip_adamw_warmup_cosine": lambda: optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-4),
      weight_decay=0.1,
    ),
  ),
}

FORMS = {
  "inner": lambda opt: optax_accum.accumulate(K, opt),
  "chain": lambda opt: optax_accum.chain(optax_accum.accumulate(K), opt),
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_large_batch(problem, name, form):
  params, xs, ys = problem
  want_params, want_state = train_large_batch(
    OPTIMIZERS[name](), params, xs, ys
  )
  tx = FORMS[form](OPTIMIZERS[name]())
  got_params, got_state = train_accumulated(tx, params, xs, ys, lambda i: K)

  chex.assert_trees_all_close(got_params, want_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    got_state.inner_opt_state, want_state, rtol=1e-5, atol=1e-6
  )
  assert int(got_state.gradient_step) == len(xs)
  assert int(got_state.mini_step) == 0
  # The parameters really moved: equality is not trivially at the start.
  assert max_abs_diff(got_params, params) > 1e-3


def test_chain_keeps_elements_before_the_accumulator_per_microbatch(problem):
  params, xs, ys = problem
  # scale(2) before the accumulator sees every micro-batch; its effect on
  # the mean is the same factor 2, so this equals sgd(2 * lr) on large batch.
  tx = optax_accum.chain(
    optax.scale(2.0), optax_accum.accumulate(K), optax.sgd(0.05)
  )
  got, state = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.sgd(0.1), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert isinstance(state[1], optax_accum.AccumulateState)


def test_mid_steps_do_not_run_the_inner_update():
  calls = []
  tx = optax_accum.accumulate(K, counting_inner(calls))
  params = jnp.zeros(3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3 * K):
    _, state = update(jnp.ones(3), state, params)
  jax.effects_barrier()
  assert len(calls) == 3


def _full_size_copies(tx, params):
  """`copy` ops of param-shaped buffers in the donated, compiled step."""

  def step(state, grads, params):
    updates, state = tx.update(grads, state, params)
    return state, updates

  hlo = (
    jax.jit(step, donate_argnums=0)
    .lower(tx.init(params), params, params)
    .compile()
    .as_text()
  )
  return hlo_lib.full_size_copies(hlo, params)


def test_compiled_step_copies_no_full_size_buffer():
  """Issue 3: the accumulator and AdamW's moments are updated in place."""
  # Distinct shapes, so XLA cannot share one zeros buffer between leaves.
  params = {"w": jnp.zeros((37, 41)), "b": jnp.zeros(43)}
  assert (
    _full_size_copies(optax_accum.accumulate(K, optax.adamw(1e-3)), params) == 0
  )
  assert (
    _full_size_copies(
      optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-3)), params
    )
    == 0
  )
  # The detector finds the copies that optax.MultiSteps' select makes.
  assert _full_size_copies(
    optax.MultiSteps(optax.adamw(1e-3), K).gradient_transformation(), params
  )


def test_extra_args_reach_the_inner_optimizer():
  def update(updates, state, params=None, *, factor):
    del params
    return jax.tree.map(lambda u: factor * u, updates), state

  inner = stateless(update)
  tx = optax_accum.accumulate(2, inner)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(jnp.array([1.0, 2.0]), state, params, factor=3.0)
  u, state = step(jnp.array([3.0, 4.0]), state, params, factor=3.0)
  np.testing.assert_allclose(u, [6.0, 9.0])


# The chainable form, ``inner=None``.


def test_chainable_form_emits_zeros_then_the_mean():
  tx = optax_accum.accumulate(3)
  params = {"a": jnp.zeros(2), "b": jnp.zeros((), jnp.bfloat16)}
  grads = [
    {"a": jnp.array([1.0, -2.0]), "b": jnp.asarray(1.5, jnp.bfloat16)},
    {"a": jnp.array([4.0, 0.5]), "b": jnp.asarray(-3.0, jnp.bfloat16)},
    {"a": jnp.array([-2.0, 7.0]), "b": jnp.asarray(6.0, jnp.bfloat16)},
  ]
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i, g in enumerate(grads):
    u, state = step(g, state, params)
    chex.assert_trees_all_equal_dtypes(u, g)
    if i < 2:
      chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g))
      assert not bool(optax_accum.has_updated(state))
  want = jax.tree.map(
    lambda *x: jnp.mean(jnp.stack(x).astype(jnp.float32), 0), *grads
  )
  chex.assert_trees_all_close(u, optax.tree.cast_like(want, u), rtol=1e-6)
  assert bool(optax_accum.has_updated(state))
  assert int(state.mini_step) == 0
  # The next window starts from the next micro-batch alone.
  u, state = step(grads[1], state, params)
  chex.assert_trees_all_close(
    state.acc_grads, optax.tree.cast(grads[1], jnp.float32)
  )


def test_chainable_form_with_sgd_matches_large_batch(problem):
  params, xs, ys = problem
  tx = optax.chain(optax_accum.accumulate(K), optax.sgd(0.05))
  got, _ = train_accumulated(tx, params, xs, ys, lambda i: K)
  want, _ = train_large_batch(optax.sgd(0.05), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", [optax.adam, optax.adamw])
def test_chainable_form_drifts_with_a_stateful_optimizer(problem, opt):
  """Pins down the trap documented in `accumulate`'s warning."""
  params, xs, ys = problem
  want, _ = train_large_batch(opt(1e-2), params, xs, ys)
  chainable, chainable_state = train_accumulated(
    optax.chain(optax_accum.accumulate(K), opt(1e-2)),
    params,
    xs,
    ys,
    lambda i: K,
  )
  exact, exact_state = train_accumulated(
    optax_accum.chain(optax_accum.accumulate(K), opt(1e-2)),
    params,
    xs,
    ys,
    lambda i: K,
  )
  # Adam's count advances on every mini-step in optax.chain, once per
  # gradient step in the exact form.
  adam_count = lambda s: int(_adam_state(s).count)
  assert adam_count(chainable_state[1]) == K * len(xs)
  assert adam_count(exact_state.inner_opt_state) == len(xs)
  assert max_abs_diff(chainable, want) > 1e-2
  assert max_abs_diff(exact, want) < 1e-5


def _adam_state(state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))


# jit, scan, schedules.


def test_no_recompilation_after_the_first_step():
  params, xs, ys = make_problem(steps=3)
  tx = optax_accum.accumulate(
    lambda step: jnp.where(step < 1, 2, 4), optax.adamw(1e-2)
  )

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state, params):
    return tx.update(g, state, params)

  state = tx.init(params)
  for _ in range(12):  # mid-steps, emitting steps, and a change of k
    _, state = step(grad_fn(params, xs[0], ys[0]), state, params)
  assert int(state.gradient_step) == 1 + 2  # k=2 once, then k=4 twice


def test_state_dtypes_are_stable_and_scan_accepts_the_state():
  params, xs, ys = make_problem(steps=4, batch=20)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2))
  state = tx.init(params)
  _, new_state = jax.jit(tx.update)(
    grad_fn(params, xs[0], ys[0]), state, params
  )
  chex.assert_trees_all_equal_dtypes(new_state, state)
  chex.assert_trees_all_equal_shapes(new_state, state)

  micro_x = xs.reshape(-1, 4, xs.shape[-1])
  micro_y = ys.reshape(-1, 4, ys.shape[-1])

  def body(carry, batch):
    params, state = carry
    updates, state = tx.update(grad_fn(params, *batch), state, params)
    return (optax.apply_updates(params, updates), state), None

  (scanned, scan_state), _ = jax.jit(
    lambda c: lax.scan(body, c, (micro_x, micro_y))
  )((params, state))
  looped, loop_state = train_accumulated(tx, params, xs, ys, lambda i: K)
  chex.assert_trees_all_close(scanned, looped, rtol=1e-6, atol=1e-7)
  assert int(scan_state.gradient_step) == int(loop_state.gradient_step) == 4


def test_varying_every_k_schedule_matches_large_batches():
  params, xs, ys = make_problem(steps=6, batch=24)
  k_of_step = lambda step: jnp.where(step < 3, 2, 4)
  tx = optax_accum.accumulate(k_of_step, optax.adam(1e-2))
  got, state = train_accumulated(
    tx, params, xs, ys, lambda i: int(k_of_step(i))
  )
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == 6


def test_float_schedule_is_rounded():
  tx = optax_accum.accumulate(optax.constant_schedule(3.0))
  params = jnp.zeros(())
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(jnp.ones(()), state, params)
  assert int(state.gradient_step) == 1


# Errors.


@pytest.mark.parametrize(
  "k, error",
  [
    (0, ValueError),
    (-3, ValueError),
    (2.0, TypeError),
    (True, TypeError),
    (None, TypeError),
    ("5", TypeError),
  ],
)
def test_bad_every_k_schedule_raises_naming_the_value(k, error):
  with pytest.raises(error):
    optax_accum.accumulate(k)


@pytest.mark.parametrize("value", [0, -4, float("nan"), 0.2])
def test_schedule_value_below_one_means_one_at_every_gradient_step(value):
  # k=2 for the first gradient step, then `value`: every accepted
  # micro-batch ends a window from then on.
  tx = optax_accum.accumulate(
    lambda step: jnp.where(step < 1, 2.0, value),
    optax.adamw(0.1),
    should_skip_update_fn=optax.skip_not_finite,
  )
  params = jnp.ones(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  flags = []
  for g in [1.0, 1.0, 1.0, jnp.nan, jnp.nan, 1.0, jnp.nan]:
    _, state = step(jnp.full(2, g), state, params)
    flags.append(bool(state.has_updated))
  # A rejected micro-batch never ends a window, whatever k is.
  assert flags == [False, True, True, False, False, True, False]
  assert int(state.gradient_step) == 3 and int(state.every_k) == 1
  assert int(state.num_rejected) == 3


def test_schedule_value_beyond_int32_is_the_largest_k():
  tx = optax_accum.accumulate(lambda step: jnp.float32(1e12))
  state = tx.init(jnp.zeros(2))
  assert int(state.every_k) == 2**31 - 1


def test_every_k_beyond_int32_is_rejected_at_construction():
  with pytest.raises(ValueError):
    optax_accum.accumulate(2**31)


def test_schedule_returning_a_vector_raises():
  with pytest.raises(ValueError):
    optax_accum.accumulate(lambda step: jnp.array([2, 2]))


def test_updates_with_another_structure_raise():
  tx = optax_accum.accumulate(2)
  state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
  with pytest.raises(ValueError) as info:
    tx.update({"a": jnp.zeros(2)}, state)
  assert "'b'" in str(info.value)


def test_updates_with_another_shape_raise():
  tx = optax_accum.accumulate(2)
  state = tx.init({"a": jnp.zeros(2)})
  with pytest.raises(ValueError):
    tx.update({"a": jnp.zeros(3)}, state)


def test_integer_params_are_rejected_by_name():
  tx = optax_accum.accumulate(2)
  with pytest.raises(TypeError):
    tx.init({"w": jnp.zeros(2), "step": jnp.zeros((), jnp.int32)})


def test_has_updated_finds_the_state_in_a_chain_and_raises_without_it():
  tx = optax.chain(optax.scale(1.0), optax_accum.accumulate(1))
  state = tx.init(jnp.zeros(2))
  assert not bool(optax_accum.has_updated(state))
  _, state = tx.update(jnp.ones(2), state)
  assert bool(optax_accum.has_updated(state))
  with pytest.raises(ValueError):
    optax_accum.has_updated(optax.adam(1e-3).init(jnp.zeros(2)))


# Structure: a declared configuration, a plain optax transformation.


def test_transformation_is_plain_optax_with_a_declared_configuration():
  tx = optax_accum.accumulate(3, optax.adam(1e-3))
  assert type(tx) is optax.GradientTransformationExtraArgs  # pylint: disable=unidiomatic-typecheck
  assert not getattr(tx, "__dict__", {})  # nothing set on the instance
  config = tx.update.__self__
  assert dataclasses.is_dataclass(config)
  assert config.every_k_schedule == 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.every_k_schedule = 4


def test_state_pickles_replaces_and_maps():
  tx = optax_accum.chain(optax_accum.accumulate(3), optax.adamw(1e-2))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2)}, state, params)
  back = pickle.loads(pickle.dumps(state))
  chex.assert_trees_all_equal(back, state)
  assert isinstance(back, optax_accum.AccumulateState)
  assert int(state._replace(mini_step=jnp.asarray(2)).mini_step) == 2
  doubled = jax.tree.map(lambda x: 2 * x, state)
  assert isinstance(doubled, optax_accum.AccumulateState)
  np.testing.assert_array_equal(doubled.acc_grads["w"], 2.0)


def test_eager_update_compiles_once_per_input_signature():
  tx = optax_accum.accumulate(3, optax.adamw(1e-2))
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  with count_compiles() as compiles:
    counts = []
    for i in range(10):
      _, state = tx.update(grads, state, params, weight=float(i + 1))
      counts.append(len(compiles))
  # Op by op, as optax: each operation compiles once, in the first window
  # (both branches); later calls compile nothing.
  assert counts[-1] == counts[2]
  assert int(state.gradient_step) == 3


def test_migrating_a_multisteps_state_between_windows(problem):
  params, xs, ys = problem
  # k = 2 on even gradient steps, 4 on odd ones.
  schedule = lambda step: jnp.where(step % 2 == 0, 2, 4)
  k_of_step = lambda i: 2 if i % 2 == 0 else 4
  multisteps = optax.MultiSteps(
    optax.adam(1e-2), schedule
  ).gradient_transformation()
  want, _ = train_accumulated(multisteps, params, xs, ys, k_of_step)
  # Three gradient steps with MultiSteps, then the README's switch.
  p, ms = train_accumulated(multisteps, params, xs[:3], ys[:3], k_of_step)
  tx = optax_accum.chain(optax_accum.accumulate(schedule), optax.adam(1e-2))
  state = tx.init(p)._replace(
    inner_opt_state=ms.inner_opt_state, gradient_step=ms.gradient_step
  )
  update = jax.jit(tx.update)
  for i, (x, y) in enumerate(zip(xs[3:], ys[3:]), 3):
    for xm, ym in microbatches(x, y, k_of_step(i)):
      updates, state = update(grad_fn(p, xm, ym), state, p)
      p = optax.apply_updates(p, updates)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_eager_update_runs_inner_python_logic_as_python():
  """No hidden jit: an inner that branches on a Python extra argument, or
  reads Python state, sees them as they are on every eager call."""
  seen = []
  scale = {"now": 1.0}

  def update(updates, state, params=None, *, double=False):
    del params
    seen.append(double)  # runs as Python on every gradient step
    factor = 2.0 * scale["now"] if double else scale["now"]
    return jax.tree.map(lambda u: factor * u, updates), state

  inner = stateless(update)
  tx = optax_accum.accumulate(2, inner)
  params = jnp.zeros(2)
  state = tx.init(params)
  out = []
  for double, now in ((False, 1.0), (True, 1.0), (True, 3.0), (False, 3.0)):
    scale["now"] = now
    u, state = tx.update(jnp.ones(2), state, params, double=double)
    out.append(float(u[0]))
  assert out == [0.0, 2.0, 0.0, 3.0]
  assert True in seen and False in seen
