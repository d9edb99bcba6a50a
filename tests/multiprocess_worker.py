"""One process of tests/test_multiprocess.py: 4 CPU devices of a 2x4 mesh.

  python tests/multiprocess_worker.py PROCESS_ID PORT OUT.npz

Trains the conftest regression problem with optax_accum's deferred
reduction (axis_name='data') across both processes' 8 devices, once in a
shard_map(check_vma=False) with stacked state and once under plain jit on
an Explicit mesh with unreduced gradients, and saves the final params of
both as this process sees them.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import grad_fn  # pylint: disable=g-import-not-at-top
from helpers import make_problem  # pylint: disable=g-import-not-at-top

import optax_accum  # pylint: disable=g-import-not-at-top

K, STEPS, BATCH = 4, 3, 64


def main():
  process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = jax.make_mesh(
    (8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  params, xs, ys = make_problem(steps=STEPS, batch=BATCH, dim=8, out=4)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")

  def local(params, state, x, y):
    state = jax.tree.map(lambda a: a[0], state)
    updates, state = tx.update(grad_fn(params, x, y), state, params)
    return (
      optax.apply_updates(params, updates),
      jax.tree.map(lambda a: a[None], state),
    )

  step = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P("data")),
      check_vma=False,
    )
  )

  def global_array(local_data, spec):
    return jax.make_array_from_process_local_data(
      NamedSharding(mesh, spec), np.asarray(local_data)
    )

  # Each process holds the rows of its own 4 devices.
  lo, hi = 4 * process_id, 4 * process_id + 4
  state = jax.tree.map(
    lambda a: global_array(np.broadcast_to(a, (4,) + jnp.shape(a)), P("data")),
    tx.init(params),
  )
  p = jax.tree.map(lambda a: global_array(a, P()), params)
  micro = BATCH // K
  for x, y in zip(xs, ys):
    for i in range(K):
      xm, ym = x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]
      per_dev = micro // 8
      p, state = step(
        p,
        state,
        global_array(xm[lo * per_dev : hi * per_dev], P("data")),
        global_array(ym[lo * per_dev : hi * per_dev], P("data")),
      )
  saved = {k: np.asarray(v.addressable_data(0)) for k, v in p.items()}
  saved.update({f"jit_{k}": v for k, v in train_under_jit(process_id).items()})
  np.savez(out, **saved)
  jax.distributed.shutdown()


def train_under_jit(process_id):
  """The same training under plain jit on an Explicit mesh: gradients from
  microbatched_value_and_grad(..., axis_name=...), reduced once per window
  across processes."""
  mesh = jax.make_mesh((8,), ("data",))  # Explicit axes
  params, xs, ys = make_problem(steps=STEPS, batch=BATCH, dim=8, out=4)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")

  def loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2), x.shape[0]

  vg = optax_accum.microbatched_value_and_grad(
    loss, 1, batch_argnums=(1, 2), axis_name="data"
  )

  def global_array(local_data, spec):
    return jax.make_array_from_process_local_data(
      NamedSharding(mesh, spec), np.asarray(local_data)
    )

  with jax.set_mesh(mesh):
    p = jax.tree.map(lambda a: global_array(a, P()), params)
    state = tx.init(p)

    @jax.jit
    def step(p, state, x, y):
      _, g, n = vg(p, x, y)
      return optax_accum.apply_gradients(tx, g, state, p, weight=n)

    micro = BATCH // K
    per_proc = micro // 2
    for x, y in zip(xs, ys):
      for i in range(K):
        rows = slice(
          i * micro + process_id * per_proc,
          i * micro + (process_id + 1) * per_proc,
        )
        p, state = step(
          p,
          state,
          global_array(x[rows], P("data")),
          global_array(y[rows], P("data")),
        )
  return {k: np.asarray(v.addressable_data(0)) for k, v in p.items()}


if __name__ == "__main__":
  main()
