"""Flax integration: nnx.Optimizer and linen TrainState with accumulation."""

import chex
from flax import linen
from flax import nnx
from flax.training import train_state
from helpers import max_abs_diff
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum
import optax_accum.flax as optax_accum_flax

K = 4
STEPS = 5


def _data(batch=32, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(STEPS, batch, dim)).astype(np.float32)
  y = (np.sin(x.sum(-1, keepdims=True)) + 0.1 * x[..., :1]).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def _nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  grads = nnx.grad(_nnx_loss)(model, x, y)
  optimizer.update(model, grads)


def _nnx_train(tx, micro, optimizer_cls=nnx.Optimizer):
  model = MLP(nnx.Rngs(0))
  optimizer = optimizer_cls(model, tx, wrt=nnx.Param)
  xs, ys = _data()
  for x, y in zip(xs, ys):
    for xm, ym in zip(jnp.split(x, micro), jnp.split(y, micro)):
      _nnx_step(model, optimizer, xm, ym)
  return nnx.state(model, nnx.Param), optimizer


def test_nnx_optimizer_matches_large_batch():
  want, _ = _nnx_train(optax.adamw(1e-2), micro=1)
  got, optimizer = _nnx_train(
    optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-2)), micro=K
  )
  start, _ = _nnx_train(optax.adamw(0.0), micro=1)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert max_abs_diff(got, start) > 1e-3
  assert bool(optax_accum.has_updated(optimizer.opt_state))
  assert int(optimizer.opt_state.gradient_step[...]) == STEPS


class LinenMLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(1)(linen.relu(linen.Dense(16)(x)))


def _linen_train(tx, micro, state_cls=train_state.TrainState):
  model = LinenMLP()
  xs, ys = _data()
  params = model.init(jax.random.key(0), xs[0])["params"]
  state = state_cls.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state, x, y):
    loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for x, y in zip(xs, ys):
    for xm, ym in zip(jnp.split(x, micro), jnp.split(y, micro)):
      state = step(state, xm, ym)
  return state


def test_linen_train_state_matches_large_batch():
  want = _linen_train(optax.adamw(1e-2), micro=1)
  got = _linen_train(optax_accum.accumulate(K, optax.adamw(1e-2)), micro=K)
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
  start = _linen_train(optax.adamw(0.0), micro=1)
  assert max_abs_diff(got.params, start.params) > 1e-3
  assert int(got.opt_state.gradient_step) == STEPS
  # TrainState.step counts mini-steps; the gradient step is in the state.
  assert int(got.step) == STEPS * K


# The front ends of optax_accum.flax (issue 9).


def test_nnx_front_end_matches_large_batch_and_counts_gradient_steps():
  want, _ = _nnx_train(optax.adamw(1e-2), micro=1)
  got, optimizer = _nnx_train(
    optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-2)),
    micro=K,
    optimizer_cls=optax_accum_flax.Optimizer,
  )
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert int(optimizer.step[...]) == STEPS  # not STEPS * K micro-batches
  assert int(optimizer.opt_state.mini_step[...]) == 0


def test_nnx_front_end_passes_weight_and_flush():
  model = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
  w0 = model.kernel[...]
  tx = optax_accum.chain(optax_accum.accumulate(8), optax.sgd(1.0))
  optimizer = optax_accum_flax.Optimizer(model, tx, wrt=nnx.Param)
  grads = lambda g: nnx.State({"kernel": nnx.Param(jnp.full((2, 1), g))})
  optimizer.update(model, grads(1.0), weight=1.0)
  np.testing.assert_array_equal(model.kernel[...], w0)  # a mid-step
  optimizer.update(model, grads(5.0), weight=3.0, flush=True)
  np.testing.assert_allclose(model.kernel[...], w0 - 4.0)
  assert int(optimizer.step[...]) == 1


def test_nnx_front_end_without_an_accumulator_counts_every_step():
  _, optimizer = _nnx_train(
    optax.sgd(1e-2), micro=2, optimizer_cls=optax_accum_flax.Optimizer
  )
  assert int(optimizer.step[...]) == STEPS * 2


def test_linen_front_end_matches_large_batch_and_counts_gradient_steps():
  want = _linen_train(optax.adamw(1e-2), micro=1)
  got = _linen_train(
    optax_accum.accumulate(K, optax.adamw(1e-2)),
    micro=K,
    state_cls=optax_accum_flax.TrainState,
  )
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
  assert int(got.step) == STEPS


def test_linen_front_end_passes_weight_flush_and_replaces_fields():
  tx = optax_accum.chain(optax_accum.accumulate(8), optax.sgd(1.0))
  state = optax_accum_flax.TrainState.create(
    apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx
  )
  state = state.apply_gradients(grads={"w": jnp.ones(2)}, weight=1.0)
  np.testing.assert_array_equal(state.params["w"], 0.0)
  state = state.apply_gradients(
    grads={"w": jnp.full(2, 5.0)},
    weight=3.0,
    flush=jnp.asarray(True),
    apply_fn=len,
  )
  np.testing.assert_allclose(state.params["w"], -4.0)
  assert int(state.step) == 1 and state.apply_fn is len


def test_both_front_ends_refuse_the_chainable_form_in_optax_chain():
  tx = optax.chain(optax_accum.accumulate(K), optax.adam(1e-2))
  model = MLP(nnx.Rngs(0))
  optimizer = optax_accum_flax.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(_nnx_loss)(model, *[a[0] for a in _data()])
  with pytest.raises(ValueError) as e:
    optimizer.update(model, grads)
  assert e.value.argument == "tx"
  state = optax_accum_flax.TrainState.create(
    apply_fn=None, params={"w": jnp.ones(3)}, tx=tx
  )
  with pytest.raises(ValueError) as e:
    state.apply_gradients(grads={"w": jnp.ones(3)})
  assert e.value.argument == "tx"


def test_linen_front_end_takes_value_as_the_nnx_one_does():
  """value= reaches the inner (reduce_on_plateau) as the window's mean."""
  tx = optax_accum.accumulate(
    2, optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau())
  )
  state = optax_accum.flax.TrainState.create(
    apply_fn=None, params=jnp.ones(2), tx=tx
  )
  for loss in (3.0, 5.0):
    state = state.apply_gradients(grads=jnp.ones(2), value=loss)
  plateau = state.opt_state.inner_opt_state[1]
  assert float(plateau.best_value) == 4.0 and int(state.step) == 1
