"""microbatched_value_and_grad(..., axis_name=...): gradients unreduced
over a mesh axis."""

import chex
from helpers import MESH_LAYOUTS
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import optax_accum

N_DEV = 8


def _problem(seed=0, batch=32):
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(batch, 4)), jnp.float32)
  m = jnp.asarray(rng.random(batch) < 0.5, jnp.float32)
  return params, x, y, m


def mean_loss(p, x, y, m):
  err = jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, -1)
  n = jnp.sum(m)
  return jnp.sum(err * m) / jnp.maximum(n, 1.0), (n, {"err": jnp.mean(err)})


def sum_loss(p, x, y, m):
  err = jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, -1)
  return jnp.sum(err * m), (jnp.sum(m), {"err": jnp.mean(err)})


def _reduced(tree):
  return jax.tree.map(
    lambda g: jax.reshard(
      g, jax.typeof(g).sharding.spec.update(unreduced=frozenset())
    ),
    tree,
  )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_microbatches", [1, 2])
@pytest.mark.parametrize("mesh_name", sorted(MESH_LAYOUTS))
def test_value_and_grad_is_the_global_token_weighted_mean(
  mesh_name, num_microbatches, reduction
):
  shape, names, axis, w_spec, batch_spec = MESH_LAYOUTS[mesh_name]
  params, x, y, m = _problem()
  loss_fn = mean_loss if reduction == "mean" else sum_loss
  n = jnp.sum(m)

  def global_loss(p):
    err = jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, -1)
    return jnp.sum(err * m) / n

  want_loss, want_g = jax.value_and_grad(global_loss)(params)
  # aux: each device's micro-batch mean, weighted by its tokens.
  err = jnp.sum((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2, -1)
  parts = N_DEV * num_microbatches
  means = jnp.mean(err.reshape(parts, -1), 1)
  counts = jnp.sum(m.reshape(parts, -1), 1)
  want_aux = jnp.sum(means * counts) / n

  vg = optax_accum.microbatched_value_and_grad(
    loss_fn,
    num_microbatches,
    axis_name=axis,
    has_aux=True,
    reduction=reduction,
    batch_argnums=(1, 2, 3),
  )
  with jax.set_mesh(jax.make_mesh(shape, names)):
    p = {"w": jax.device_put(params["w"], w_spec), "b": params["b"]}
    batch = [jax.device_put(a, batch_spec) for a in (x, y, m)]
    (loss, aux), raw, weight = jax.jit(vg)(p, *batch)
    g = jax.jit(_reduced)(raw)
  for leaf in jax.tree.leaves(raw):
    assert jax.typeof(leaf).sharding.spec.unreduced == {axis}
  chex.assert_trees_all_close(g, want_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["err"], want_aux, rtol=1e-5)
  assert float(weight) == float(n)


def test_a_batch_not_sharded_over_the_axis_raises_naming_it():
  params, x, y, m = _problem()
  vg = optax_accum.microbatched_value_and_grad(
    mean_loss, 1, axis_name="data", has_aux=True, batch_argnums=(1, 2, 3)
  )
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    with pytest.raises(ValueError) as e:
      jax.jit(vg)(params, x, jax.device_put(y, P("data")), m)
  assert e.value.argument == "batch_argnums"


def test_without_a_mesh_raises_saying_how_to_call_it():
  params, x, y, m = _problem()
  vg = optax_accum.microbatched_value_and_grad(
    mean_loss, 1, axis_name="data", has_aux=True, batch_argnums=(1, 2, 3)
  )
  with pytest.raises(ValueError):
    jax.jit(vg)(params, x, y, m)


def test_a_param_sharded_over_the_axis_raises():
  params, x, y, m = _problem()
  vg = optax_accum.microbatched_value_and_grad(
    mean_loss, 1, axis_name="data", has_aux=True, batch_argnums=(1, 2, 3)
  )
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = {"w": jax.device_put(params["w"], P("data")), "b": params["b"]}
    batch = [jax.device_put(a, P("data")) for a in (x, y, m)]
    with pytest.raises(ValueError):
      jax.jit(vg)(p, *batch)


@pytest.mark.parametrize("axis_name", [3, ("data", 1), ""])
def test_a_bad_axis_name_raises_naming_it(axis_name):
  with pytest.raises(TypeError) as e:
    optax_accum.microbatched_value_and_grad(mean_loss, 1, axis_name=axis_name)
  assert e.value.argument == "axis_name"


def test_a_tensor_parallel_param_raises_saying_what_to_do():
  params, x, y, m = _problem()
  vg = optax_accum.microbatched_value_and_grad(
    mean_loss, 1, axis_name="data", has_aux=True, batch_argnums=(1, 2, 3)
  )
  with jax.set_mesh(jax.make_mesh((4, 2), ("data", "model"))):
    p = {"w": jax.device_put(params["w"], P(None, "model")), "b": params["b"]}
    batch = [jax.device_put(a, P("data")) for a in (x, y, m)]
    with pytest.raises(ValueError):
      jax.jit(vg)(p, *batch)


def test_batch_leaves_that_cannot_be_split_raise_saying_why():
  params, x, y, m = _problem()

  def loss(p, batch):
    return mean_loss(p, batch["x"], batch["y"], batch["m"])

  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    batch = {k: jax.device_put(a, P("data")) for k, a in zip("xym", (x, y, m))}
    vg3 = optax_accum.microbatched_value_and_grad(
      loss, 3, axis_name="data", has_aux=True
    )
    with pytest.raises(ValueError) as e:
      jax.jit(vg3)(params, batch)
    assert e.value.argument == "num_microbatches"  # sharded right, rows not
    vg = optax_accum.microbatched_value_and_grad(
      loss, 1, axis_name="data", has_aux=True
    )
    with pytest.raises(ValueError):
      jax.jit(vg)(params, {**batch, "s": jnp.float32(1.0)})


def test_an_axis_name_not_in_the_mesh_raises_listing_the_axes():
  params, x, y, m = _problem()
  vg = optax_accum.microbatched_value_and_grad(
    mean_loss, 1, axis_name="dp", has_aux=True, batch_argnums=(1, 2, 3)
  )
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    batch = [jax.device_put(a, P("data")) for a in (x, y, m)]
    with pytest.raises(ValueError):
      jax.jit(vg)(params, *batch)
