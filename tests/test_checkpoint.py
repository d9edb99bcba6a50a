"""Checkpoint and resume in the middle of a window (issue 5)."""

import itertools
import os
import subprocess
import sys

import chex
from flax import nnx
from helpers import grad_fn
from helpers import make_problem
from helpers import microbatches
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_accum

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
  p, s = _train(tx, params, tx.init(params), batches[: 2 * K + 2])
  path = tmp_path / "opt_state"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, s)
  ckptr.wait_until_finished()
  return path, ckptr, params, p, s, batches


def test_resume_mid_window_is_bit_for_bit(saved):
  path, ckptr, params, p, s, batches = saved
  assert int(s.mini_step) == 2 and int(s.gradient_step) == 2
  tx = _tx()
  want_p, want_s = _train(tx, p, s, batches[2 * K + 2 :])
  restored = optax_accum.restore_checkpoint(path, tx, params, ckptr)
  chex.assert_trees_all_equal(restored, s)
  got_p, got_s = _train(tx, p, restored, batches[2 * K + 2 :])
  chex.assert_trees_all_equal(got_p, want_p)
  chex.assert_trees_all_equal(got_s, want_s)
  assert int(got_s.gradient_step) == 4


@pytest.mark.parametrize("new_k", [4, 6])
def test_restore_into_another_k_finishes_the_window_with_the_saved_k(
  saved, new_k
):
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
  for x, y in batches[2 * K + 2 : 2 * K + 2 + 3]:
    p, restored = step(p, restored, x, y)
    flags.append(bool(restored.has_updated))
  assert flags == [False, False, True]


def test_restore_with_another_accumulator_dtype_raises(saved):
  path, ckptr, params, *_ = saved
  tx = _tx(accumulator_dtype=jnp.bfloat16)
  with pytest.raises(
    ValueError,
  ):
    optax_accum.restore_checkpoint(path, tx, params, ckptr)


def test_restore_with_another_optimizer_raises(saved):
  path, ckptr, params, *_ = saved
  with pytest.raises(ValueError):
    optax_accum.restore_checkpoint(
      path, _tx(inner=optax.sgd(0.1)), params, ckptr
    )


def test_restore_with_other_params_raises(saved):
  path, ckptr, params, *_ = saved
  other = {"w": jnp.zeros((7, 3)), "b": params["b"]}
  with pytest.raises(ValueError):
    optax_accum.restore_checkpoint(path, _tx(), other, ckptr)


# Checkpoints as users write them (issue 8).


def test_partition_of_two_accumulators_restores_its_own_checkpoint(tmp_path):
  params, xs, ys = make_problem(steps=3, batch=8)
  labels = {"w": "w", "b": "b"}
  tx = optax.partition(
    {
      "w": optax_accum.accumulate(4, optax.adam(1e-2)),
      "b": optax_accum.accumulate(2, optax.adam(1e-2)),
    },
    labels,
  )
  batches = [(x, y) for x, y in zip(xs, ys)] * 3
  p, s = _train(tx, params, tx.init(params), batches[:3])
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "s", s)
  ckptr.wait_until_finished()
  restored = optax_accum.restore_checkpoint(tmp_path / "s", tx, params, ckptr)
  chex.assert_trees_all_equal(restored, s)
  want = _train(tx, p, s, batches[3:])
  got = _train(tx, p, restored, batches[3:])
  chex.assert_trees_all_equal(got, want)


def _one_step_saved_and_restored(tmp_path, tx, params):
  """The state after one mini-step, and it saved and restored."""
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "s", state)
  ckptr.wait_until_finished()
  return state, optax_accum.restore_checkpoint(
    tmp_path / "s", tx, params, ckptr
  )


def test_nested_chain_state_restores(tmp_path):
  params = {"w": jnp.ones(3)}
  tx = optax.chain(
    optax.chain(optax.scale(1.0), optax_accum.accumulate(3, optax.sgd(0.1)))
  )
  state, restored = _one_step_saved_and_restored(tmp_path, tx, params)
  chex.assert_trees_all_equal(restored, state)
  assert int(restored[0][1].mini_step) == 1


_MANAGER_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax, orbax.checkpoint as ocp
import optax_accum
sys.path.insert(0, {tests!r})
from helpers import grad_fn, make_problem, microbatches

params, xs, ys = make_problem(steps=3)
tx = optax_accum.chain(optax_accum.accumulate(5), optax.adamw(1e-2))
batches = [b for x, y in zip(xs, ys) for b in microbatches(x, y, 5)]

@jax.jit
def step(params, state, x, y):
  updates, state = tx.update(grad_fn(params, x, y), state, params)
  return optax.apply_updates(params, updates), state

mgr = ocp.CheckpointManager({directory!r})
if sys.argv[1] == "save":
  state = tx.init(params)
  for x, y in batches[:7]:
    params, state = step(params, state, x, y)
  mgr.save(7, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(state)))
  mgr.wait_until_finished()
  start = 7
else:
  start = mgr.latest_step()
  restored = mgr.restore(start, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params),
      opt_state=ocp.args.StandardRestore(jax.eval_shape(tx.init, params))))
  params, state = restored.params, restored.opt_state
  assert isinstance(state, optax_accum.AccumulateState), type(state)
for x, y in batches[start:]:
  params, state = step(params, state, x, y)
np.save({out!r} + sys.argv[1] + ".npy", np.asarray(params["w"]))
"""


@pytest.mark.slow
def test_checkpoint_manager_composite_resumes_in_a_fresh_process(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(
    _MANAGER_SCRIPT.format(
      tests=os.path.dirname(__file__),
      directory=str(tmp_path / "ckpt"),
      out=str(tmp_path / "w_"),
    )
  )
  env = dict(os.environ, XLA_FLAGS="")
  for mode in ("save", "restore"):
    subprocess.run(
      [sys.executable, str(script), mode], check=True, env=env, timeout=300
    )
  # The saving process trained on to the end without a restore.
  np.testing.assert_array_equal(
    np.load(tmp_path / "w_restore.npy"), np.load(tmp_path / "w_save.npy")
  )


class _Linear(nnx.Module):
  def __init__(self, rngs):
    self.l = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.l(x)


def _nnx_optimizer(seed):
  return nnx.ModelAndOptimizer(
    _Linear(nnx.Rngs(seed)),
    optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-2)),
    wrt=nnx.Param,
  )


def test_nnx_optimizer_state_saves_and_resumes_mid_window(tmp_path):
  _, xs, ys = make_problem(steps=2)
  batches = list(_micro_stream(xs, ys))
  loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def step(opt, x, y):
    opt.update(nnx.grad(loss)(opt.model, x, y))

  opt = _nnx_optimizer(0)
  for x, y in batches[:3]:
    step(opt, x, y)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "opt", nnx.state(opt))
  ckptr.wait_until_finished()
  for x, y in batches[3:]:
    step(opt, x, y)

  resumed = _nnx_optimizer(1)  # other initial weights, overwritten below
  abstract = nnx.state(nnx.eval_shape(lambda: _nnx_optimizer(0)))
  nnx.update(resumed, ckptr.restore(tmp_path / "opt", abstract))
  assert int(resumed.opt_state.mini_step[...]) == 3
  for x, y in batches[3:]:
    step(resumed, x, y)
  chex.assert_trees_all_equal(nnx.state(resumed.model), nnx.state(opt.model))


def test_missing_path_raises_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    optax_accum.restore_checkpoint(
      tmp_path / "nothing", _tx(), {"w": jnp.zeros(2)}
    )


def test_checkpoint_manager_step_directory_gets_a_hint(tmp_path):
  params = {"w": jnp.zeros(2)}
  tx = _tx()
  mgr = ocp.CheckpointManager(tmp_path / "ckpt")
  mgr.save(
    3, args=ocp.args.Composite(opt_state=ocp.args.StandardSave(tx.init(params)))
  )
  mgr.wait_until_finished()
  with pytest.raises(
    ValueError,
  ):
    optax_accum.restore_checkpoint(tmp_path / "ckpt" / "3", tx, params)
  restored = optax_accum.restore_checkpoint(
    tmp_path / "ckpt" / "3" / "opt_state", tx, params
  )
  assert isinstance(restored, optax_accum.AccumulateState)


def test_a_state_saved_inside_a_dict_gets_a_hint(tmp_path):
  params = {"w": jnp.zeros(2)}
  tx = _tx()
  mgr = ocp.CheckpointManager(tmp_path / "ckpt")
  ckpt = {"params": params, "opt_state": tx.init(params)}
  mgr.save(3, args=ocp.args.StandardSave(ckpt))
  mgr.wait_until_finished()
  with pytest.raises(ValueError):
    optax_accum.restore_checkpoint(
      tmp_path / "ckpt" / "3" / "default", tx, params
    )


def test_without_orbax_the_error_says_to_install_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
  with pytest.raises(ImportError):
    optax_accum.restore_checkpoint("/tmp", _tx(), {"w": jnp.zeros(2)})


def test_restore_under_a_mesh_places_a_plain_state_on_it(tmp_path):
  """A state without axis_name restores under jax.set_mesh (its abstract
  shardings made concrete on the mesh that is set)."""
  params = {"w": jnp.ones(4)}
  tx = optax_accum.accumulate(3, optax.adam(0.1))
  path = str(tmp_path / "state")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tx.init(params))
  ckptr.wait_until_finished()
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    restored = optax_accum.restore_checkpoint(path, tx, params, ckptr)
  chex.assert_trees_all_equal(restored, tx.init(params))


def test_reduced_state_runs_on_the_state_s_own_mesh():
  tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    state = tx.init({"w": jnp.ones(4)})
  other = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  with jax.set_mesh(other):
    reduced = optax_accum.reduced_state(state)
  assert not reduced.acc_grads["w"].sharding.spec.unreduced
  np.testing.assert_array_equal(np.asarray(reduced.acc_grads["w"]), 0.0)
