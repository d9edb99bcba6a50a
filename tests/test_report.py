"""reduction_report reads where a compiled step reduces (8 host devices):
once per window on the deferred paths, every call where GSPMD reduces."""

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_accum
from optax_accum import _report

W = {"w": jnp.ones((64, 32))}
GRAD_BYTES = 64 * 32 * 4


def loss_fn(p, x):
  return jnp.mean((x @ p["w"]) ** 2), jnp.float32(x.shape[0])


def _jit_step(tx, vg):
  def step(p, s, x):
    _, g, n = vg(p, x)
    return optax_accum.apply_gradients(tx, g, s, p, weight=n)

  return step


def test_plain_jit_deferral_reduces_the_gradient_once_per_window():
  mesh = jax.make_mesh((8,), ("data",))
  tx = optax_accum.accumulate(4, optax.adamw(1e-3), axis_name="data")
  vg = optax_accum.microbatched_value_and_grad(loss_fn, 1, axis_name="data")
  with jax.set_mesh(mesh):
    p, x = jax.device_put(W, P()), jax.device_put(jnp.ones((16, 64)), P("data"))
    report = optax_accum.reduction_report(_jit_step(tx, vg), p, tx.init(p), x)
  assert report.every_call_bytes < 1024
  assert report.emitting_bytes >= GRAD_BYTES
  assert report.by_axis()[("data",)][1] >= GRAD_BYTES


def test_checked_shard_map_reduces_the_gradient_once_per_window():
  mesh = jax.make_mesh((8,), ("data",))
  tx = optax_accum.accumulate(4, optax.sgd(0.1), axis_name="data")

  def local(p, s, x):
    loss, n = loss_fn(p, x)
    del loss
    g = jax.grad(lambda q: loss_fn(q, x)[0])(lax.pcast(p, "data", to="varying"))
    return optax_accum.apply_gradients(tx, g, s, p, weight=n)

  with jax.set_mesh(mesh):
    state = tx.init(W)
    specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, state)
    step = jax.shard_map(
      local, in_specs=(P(), specs, P("data")), out_specs=(P(), specs)
    )
    x = jax.device_put(jnp.ones((16, 64)), P("data"))
    report = optax_accum.reduction_report(step, W, state, x)
  assert report.every_call_bytes < 1024
  assert report.emitting_bytes >= GRAD_BYTES


def test_hsdp_defers_the_replica_axis_and_reduces_fsdp_every_call():
  mesh = jax.make_mesh((2, 4), ("replica", "fsdp"))
  tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name="replica")
  vg = optax_accum.microbatched_value_and_grad(loss_fn, 2, axis_name="replica")
  with jax.set_mesh(mesh):
    p = jax.device_put(W, P("fsdp"))
    x = jax.device_put(jnp.ones((32, 64)), P(("replica", "fsdp")))
    report = optax_accum.reduction_report(_jit_step(tx, vg), p, tx.init(p), x)
  every, emitting = report.by_axis()[("replica",)]
  assert every < 1024 and emitting >= GRAD_BYTES // 4  # one fsdp shard
  assert report.by_axis()[("fsdp",)][0] >= GRAD_BYTES  # reduce-scattered


def test_gspmd_reduces_every_call_and_inside_the_micro_batch_scan():
  mesh = jax.make_mesh((8,), ("data",))
  tx = optax_accum.accumulate(4, optax.sgd(0.1))
  vg = optax_accum.microbatched_value_and_grad(loss_fn, 2)
  with jax.set_mesh(mesh):
    p, x = jax.device_put(W, P()), jax.device_put(jnp.ones((32, 64)), P("data"))
    report = optax_accum.reduction_report(_jit_step(tx, vg), p, tx.init(p), x)
    plain = optax_accum.reduction_report(
      jax.jit(jax.grad(lambda q, x: loss_fn(q, x)[0])),
      {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=P())},
      x,
    )
  assert report.every_call_bytes >= GRAD_BYTES
  assert report.in_loop_bytes >= GRAD_BYTES
  assert plain.every_call_bytes >= GRAD_BYTES and plain.emitting_bytes == 0


@pytest.mark.parametrize(
  "line, groups",
  [
    (
      "replica_groups={{0,4},{1,5},{2,6},{3,7}}, x",
      [{0, 4}, {1, 5}, {2, 6}, {3, 7}],
    ),
    ("replica_groups=[2,4]<=[8], x", [{0, 1, 2, 3}, {4, 5, 6, 7}]),
    ("replica_groups=[4,2]<=[2,4]T(1,0), x", [{0, 4}, {1, 5}, {2, 6}, {3, 7}]),
    (
      "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], "
      "device_ids=([2,4]T(1,0)) {'axis_0'}, x",
      [{0, 1, 2, 3}, {4, 5, 6, 7}],
    ),
    (
      "replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, x",
      [set(range(8))],
    ),
  ],
)
def test_every_form_of_device_groups_is_read(line, groups):
  assert _report._groups(line) == {frozenset(g) for g in groups}


def test_groups_are_named_by_the_mesh_axes_they_span():
  mesh = jax.make_mesh((2, 4), ("replica", "fsdp"))
  ids = np.arange(8).reshape(2, 4)
  assert _report._axes({frozenset(r) for r in ids.T.tolist()}, mesh) == (
    "replica",
  )
  assert _report._axes({frozenset(range(8))}, mesh) == ("replica", "fsdp")


def test_bytes_follow_the_hlo_element_types():
  shapes = "(c64[100], pred[8], s8[4], f8e4m3fn[10], u64[2], bf16[3]{0})"
  assert _report._bytes(shapes) == 800 + 8 + 4 + 10 + 16 + 6
  assert _report._bytes("f32[2,4]{1,0}") == 32
