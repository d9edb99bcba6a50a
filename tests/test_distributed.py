"""Sharded params and the deferred data-parallel reduction (issue 5)."""

import re

import chex
from helpers import grad_fn
from helpers import make_problem
from helpers import microbatches
from helpers import train_large_batch
import hlo as hlo_lib
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_accum

K = 4
N_DEV = 8

LAYOUTS = {
  # name: (mesh shape, axis names, spec of w (dim, out), spec of b (out,))
  "data_parallel": ((8,), ("data",), P(), P()),
  "fsdp": ((8,), ("data",), P("data", None), P()),
  "tensor_parallel": ((2, 4), ("data", "model"), P(None, "model"), P("model")),
}


def _mesh(shape, names, axis_type):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _sharded_problem(layout, axis_type, steps=3):
  shape, names, w_spec, b_spec = LAYOUTS[layout]
  mesh = _mesh(shape, names, axis_type)
  params, xs, ys = make_problem(steps=steps, batch=32, dim=8, out=4)
  specs = {"w": w_spec, "b": b_spec}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  sharded = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
  return mesh, shardings, params, sharded, xs, ys


def _collectives(hlo_text):
  return hlo_lib.collectives(hlo_text)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_acc_grads_keep_the_param_sharding(layout, axis_type):
  mesh, shardings, params, sharded, xs, ys = _sharded_problem(layout, axis_type)
  tx = optax_accum.chain(optax_accum.accumulate(K), optax.adamw(1e-2))
  with jax.set_mesh(mesh):
    state = tx.init(sharded)
    update = jax.jit(tx.update, donate_argnums=1)
    grads = jax.tree.map(
      jax.device_put,
      grad_fn(params, xs[0], ys[0]),
      shardings,
    )
    hlo = update.lower(grads, state, sharded).compile().as_text()
    for _ in range(K + 1):
      updates, state = update(grads, state, sharded)
  for name, sharding in shardings.items():
    ndim = params[name].ndim
    assert state.acc_grads[name].sharding.is_equivalent_to(sharding, ndim)
    assert updates[name].sharding.is_equivalent_to(sharding, ndim)
  # No resharding: the only collective is the scalar all-reduce of the
  # emitted gradient's norm (telemetry), on emitting steps.
  for shape, op in _collectives(hlo):
    assert op == "all-reduce" and re.fullmatch(r"f32\[\](\{\})?", shape), (
      shape,
      op,
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_training_matches_unsharded_large_batch(layout):
  mesh, shardings, params, sharded, xs, ys = _sharded_problem(
    layout, AxisType.Auto, steps=4
  )
  want, _ = train_large_batch(optax.adamw(1e-2), params, xs, ys)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2))

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(grad_fn(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    p, state = sharded, tx.init(sharded)
    for x, y in zip(xs, ys):
      for xm, ym in microbatches(x, y, K):
        p, state = step(p, state, xm, ym)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
  assert p["w"].sharding.is_equivalent_to(shardings["w"], 2)


# Deferred reduction inside shard_map(check_vma=False) (or jax.pmap), where
# JAX does not type per-device values: the state is stacked per device. The
# typed modes (JAX's default check_vma=True, plain jit) are in
# tests/test_deferral.py.


def _per_device(state):
  """Stacks a state along a new leading axis, one copy per device."""
  return jax.tree.map(
    lambda x: jnp.broadcast_to(x, (N_DEV,) + jnp.shape(x)), state
  )


def _shard_map_step(tx, mesh, weighted):
  def local(params, state, x, y, mask):
    state = jax.tree.map(lambda a: a[0], state)
    if weighted:
      loss = lambda p: (
        jnp.sum(mask * jnp.sum((x @ p["w"] + p["b"] - y) ** 2, -1))
        / jnp.maximum(jnp.sum(mask), 1.0)
        / y.shape[-1]
      )
      updates, state = tx.update(
        jax.grad(loss)(params), state, params, weight=jnp.sum(mask)
      )
    else:
      updates, state = tx.update(grad_fn(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
    return params, jax.tree.map(lambda a: a[None], state)

  return jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
      out_specs=(P(), P("data")),
      check_vma=False,
    ),
    donate_argnums=1,
  )


def test_deferred_reduction_matches_large_batch_and_reduces_once():
  mesh = _mesh((N_DEV,), ("data",), AxisType.Auto)
  params, xs, ys = make_problem(steps=4, batch=K * N_DEV * 2, dim=8, out=4)
  want, _ = train_large_batch(optax.adamw(1e-2), params, xs, ys)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")
  step = _shard_map_step(tx, mesh, weighted=False)
  state = _per_device(tx.init(params))
  p = params
  ones = jnp.ones((K * N_DEV * 2 // K,))
  with jax.set_mesh(mesh):
    report = optax_accum.reduction_report(
      step, p, state, xs[0][:16], ys[0][:16], ones
    )
    for x, y in zip(xs, ys):
      for xm, ym in microbatches(x, y, K):
        p, state = step(p, state, xm, ym, ones)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
  # The one all-reduce of a gradient step lives in the emitting branch of
  # the conditional: every mini-step has none.
  assert report.every_call_bytes == 0
  assert report.emitting_bytes >= 4 * params["w"].size


def test_deferred_reduction_with_unequal_token_counts_is_the_global_mean():
  mesh = _mesh((N_DEV,), ("data",), AxisType.Auto)
  params, xs, ys = make_problem(steps=1, batch=K * N_DEV * 4, dim=8, out=4)
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random(xs.shape[:2]) < 0.6, jnp.float32)

  # The global masked-mean gradient over the whole window.
  def global_loss(p):
    err = jnp.sum((xs[0] @ p["w"] + p["b"] - ys[0]) ** 2, -1)
    return jnp.sum(mask[0] * err) / jnp.sum(mask[0]) / ys.shape[-1]

  want = jax.tree.map(
    lambda p, g: p - 0.1 * g, params, jax.grad(global_loss)(params)
  )
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  step = _shard_map_step(tx, mesh, weighted=True)
  state = _per_device(tx.init(params))
  p = params
  with jax.set_mesh(mesh):
    for (xm, ym), mm in zip(
      microbatches(xs[0], ys[0], K), jnp.split(mask[0], K)
    ):
      p, state = step(p, state, xm, ym, mm)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_deferred_window_rejected_on_every_device_takes_no_step():
  mesh = _mesh((N_DEV,), ("data",), AxisType.Auto)
  params, xs, ys = make_problem(steps=1, batch=2 * N_DEV * 2, dim=8, out=4)
  tx = optax_accum.accumulate(
    2,
    optax.adamw(1e-2),
    axis_name="data",
    should_skip_update_fn=optax.skip_not_finite,
  )
  step = _shard_map_step(tx, mesh, weighted=False)
  state = _per_device(tx.init(params))
  p = params
  ones = jnp.ones((2 * N_DEV,))
  nan_x = jnp.full_like(xs[0], jnp.nan)
  with jax.set_mesh(mesh):
    for xm, ym in microbatches(nan_x, ys[0], 2):  # one window, all NaN
      p, state = step(p, state, xm, ym, ones)
  chex.assert_trees_all_equal(p, params)
  assert int(state.gradient_step[0]) == 0
  assert not bool(state.has_updated[0])
  assert int(state.inner_opt_state[0].count[0]) == 0  # adamw not stepped


def test_an_axis_name_that_is_not_mapped_raises_naming_it():
  mesh = _mesh((N_DEV,), ("data",), AxisType.Auto)
  tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name="model")
  params = jnp.ones(2)
  step = jax.shard_map(
    lambda p, s: tx.update(p, s, p),
    mesh=mesh,
    in_specs=(P(), P()),
    out_specs=(P(), P()),
  )
  with (
    jax.set_mesh(mesh),
    pytest.raises(
      NameError,
    ),
  ):
    jax.jit(step).lower(params, tx.init(params))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_apply_gradients_on_a_mesh_keeps_shardings_and_numbers(axis_type):
  mesh = _mesh((4, 2), ("data", "model"), axis_type)
  with jax.set_mesh(mesh):
    params = {
      "w": jax.device_put(
        jnp.ones((8, 6)), NamedSharding(mesh, P("data", "model"))
      ),
      "b": jax.device_put(jnp.ones(6), NamedSharding(mesh, P("model"))),
    }
    tx = optax_accum.chain(
      optax.clip_by_global_norm(1.0),
      optax_accum.accumulate(3),
      optax.adamw(1e-2),
    )

    def two_lines(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    fused = jax.jit(lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p))
    want_p, want_s = params, tx.init(params)
    got_p, got_s = params, tx.init(params)
    for i in range(6):
      g = jax.tree.map(lambda p, i=i: p * (i + 1) * 0.1, params)
      want_p, want_s = jax.jit(two_lines)(want_p, want_s, g)
      got_p, got_s = fused(got_p, got_s, g)
  chex.assert_trees_all_close(got_p, want_p, rtol=1e-6, atol=1e-7)
  assert got_p["w"].sharding.spec == P("data", "model")
  assert got_s[1].acc_grads["w"].sharding.spec == P("data", "model")


def test_unchecked_flush_on_one_device_ends_the_window_on_all():
  """JAX does not type a flush that differs across devices here; devices
  that disagreed would wait forever in the window's one reduction."""
  mesh = _mesh((N_DEV,), ("data",), AxisType.Auto)
  params = {"w": jnp.ones(3)}
  tx = optax_accum.accumulate(4, optax.sgd(0.1), axis_name="data")

  def local(p, state, flag):
    state = jax.tree.map(lambda a: a[0], state)
    updates, state = tx.update(p, state, p, flush=flag[0] > 0)
    return optax.apply_updates(p, updates), jax.tree.map(
      lambda a: a[None], state
    )

  step = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data")),
      out_specs=(P(), P("data")),
      check_vma=False,
    )
  )
  state = _per_device(tx.init(params))
  flag = jnp.zeros(N_DEV).at[3].set(1.0)  # only device 3 flushes
  with jax.set_mesh(mesh):
    _, state = step(params, state, flag)
  np.testing.assert_array_equal(state.gradient_step, np.ones(N_DEV))
  np.testing.assert_array_equal(state.mini_step, np.zeros(N_DEV))


@pytest.mark.parametrize("weighted", [False, True])
def test_a_per_device_state_without_axis_name_trains_each_device_alone(
  weighted,
):
  """In shard_map, params made varying and init there give a per-device
  state (an ensemble over devices): each device's own exact mean, in a
  lax.scan whose carry keeps its types."""
  mesh = _mesh((N_DEV,), ("data",), AxisType.Explicit)
  params, xs, _ = make_problem(steps=1, batch=8 * N_DEV, dim=3, out=1)
  loss = lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)  # noqa: E731
  xs = xs[0].reshape(K, 8 * N_DEV // K, 3)  # K micro-batches, rows sharded
  tx = optax_accum.accumulate(K, optax.adam(0.1))

  def local(p, x):
    p = jax.lax.pcast(p, "data", to="varying")
    state = tx.init(p)

    def body(carry, xm):
      p, state = carry
      n = jnp.sum(xm[:, 0] > -1e9).astype(jnp.float32)  # varying
      w = {"weight": n} if weighted else {}
      g = jax.grad(loss)(p, xm)
      return optax_accum.apply_gradients(tx, g, state, p, **w), None

    (p, _), _ = jax.lax.scan(body, (p, state), x)
    return jax.tree.map(lambda a: a[None], p)

  with jax.set_mesh(mesh):
    step = jax.jit(
      jax.shard_map(local, in_specs=(P(), P(None, "data")), out_specs=P("data"))
    )
    got = jax.tree.map(
      np.asarray, step(params, jax.device_put(xs, P(None, "data")))
    )

  def large_batch_step(xs_of_device):  # one device's K micro-batches
    g = jax.grad(lambda p: sum(loss(p, x) for x in xs_of_device) / K)(params)
    o = optax.adam(0.1)
    return optax.apply_updates(params, o.update(g, o.init(params))[0])

  per_device = xs.reshape(K, N_DEV, -1, 3)
  want = [large_batch_step(per_device[:, d]) for d in range(N_DEV)]
  want = jax.tree.map(lambda *a: np.stack(a), *want)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_per_device_weight_for_a_replicated_state_names_weight():
  mesh = _mesh((N_DEV,), ("data",), AxisType.Explicit)
  tx = optax_accum.accumulate(2, optax.sgd(0.1))
  params = {"w": jnp.ones(3)}

  def local(p, s, x):
    return tx.update(p, s, p, weight=jnp.sum(x))[1].mini_step

  with jax.set_mesh(mesh):
    state = tx.init(params)
    step = jax.shard_map(local, in_specs=(P(), P(), P("data")), out_specs=P())
    with pytest.raises(ValueError) as e:
      jax.jit(step)(params, state, jax.device_put(jnp.ones(N_DEV), P("data")))
  assert e.value.argument == "weight"
