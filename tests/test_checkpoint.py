"""Checkpoint and resume in the middle of a window (issue 5)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

import optax_accum
from conftest import grad_fn
from conftest import make_problem
from conftest import microbatches

K = 5


def _micro_stream(xs, ys):
  for x, y in zip(xs, ys):
    yield from microbatches(x, y, K)


def _train(tx, params, state, batches):
  step = jax.jit(lambda p, s, x, y: _apply(tx, p, s, x, y))
  for x, y in batches:
    params, state = step(params, state, x, y)
  return params, state


def _apply(tx, params, state, x, y):
  updates, state = tx.update(grad_fn(params, x, y), state, params)
  return optax.apply_updates(params, updates), state


def _tx(k=K, inner=None, **kwargs):
  return optax_accum.chain(
      optax_accum.accumulate(k, **kwargs),
      inner if inner is not None else optax.adamw(1e-2),
  )


@pytest.fixture
def saved(tmp_path):
  """A state saved after 2 gradient steps and 2 of 5 mini-steps."""
  params, xs, ys = make_problem(steps=4)
  batches = list(_micro_stream(xs, ys))
  tx = _tx()
  p, s = _train(tx, params, tx.init(params), batches[:2 * K + 2])
  path = tmp_path / "opt_state"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, s)
  ckptr.wait_until_finished()
  return path, ckptr, params, p, s, batches


def test_resume_mid_window_is_bit_for_bit(saved):
  path, ckptr, params, p, s, batches = saved
  assert int(s.mini_step) == 2 and int(s.gradient_step) == 2
  tx = _tx()
  want_p, want_s = _train(tx, p, s, batches[2 * K + 2:])
  restored = optax_accum.restore_checkpoint(path, tx, params, ckptr)
  chex.assert_trees_all_equal(restored, s)
  got_p, got_s = _train(tx, p, restored, batches[2 * K + 2:])
  chex.assert_trees_all_equal(got_p, want_p)
  chex.assert_trees_all_equal(got_s, want_s)
  assert int(got_s.gradient_step) == 4


@pytest.mark.parametrize("new_k", [4, 6])
def test_restore_into_another_k_finishes_the_window_with_the_saved_k(
    saved, new_k):
  path, ckptr, params, p, s, batches = saved
  tx = _tx(k=new_k)
  restored = optax_accum.restore_checkpoint(path, tx, params, ckptr)
  step = jax.jit(lambda p, s, x, y: _apply(tx, p, s, x, y))
  flags = []
  for x, y in itertools.islice(itertools.cycle(batches), 3 + 2 * new_k):
    p, restored = step(p, restored, x, y)
    flags.append(bool(restored.has_updated))
  # 2 of the saved k=5 were in flight: 3 more end it; then windows of new_k.
  want = [False, False, True] + ([False] * (new_k - 1) + [True]) * 2
  assert flags == want
  assert int(restored.every_k) == new_k


def test_plain_orbax_restore_into_another_k_keeps_the_window_in_flight(saved):
  path, ckptr, params, p, s, batches = saved
  tx = _tx(k=4)
  restored = ckptr.restore(path, jax.eval_shape(tx.init, params))
  step = jax.jit(lambda p, s, x, y: _apply(tx, p, s, x, y))
  flags = []
  for x, y in batches[2 * K + 2:2 * K + 2 + 3]:
    p, restored = step(p, restored, x, y)
    flags.append(bool(restored.has_updated))
  assert flags == [False, False, True]


def test_restore_with_another_accumulator_dtype_raises(saved):
  path, ckptr, params, *_ = saved
  tx = _tx(accumulator_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"acc_grads/b as float32\[3\].*"
                     r"bfloat16\[3\]"):
    optax_accum.restore_checkpoint(path, tx, params, ckptr)


def test_restore_with_another_optimizer_raises(saved):
  path, ckptr, params, *_ = saved
  with pytest.raises(ValueError, match="another structure"):
    optax_accum.restore_checkpoint(path, _tx(inner=optax.sgd(0.1)), params,
                                   ckptr)


def test_restore_with_other_params_raises(saved):
  path, ckptr, params, *_ = saved
  other = {"w": jnp.zeros((7, 3)), "b": params["b"]}
  with pytest.raises(ValueError, match=r"float32\[6, 3\].*float32\[7, 3\]"):
    optax_accum.restore_checkpoint(path, _tx(), other, ckptr)
