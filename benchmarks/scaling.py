"""Data-parallel accumulation on 8 devices: reduce every micro-batch or once.

Runs a jitted `shard_map` train step on 8 host CPU devices (a stand-in for 8
GPUs or hosts; the program is the same SPMD program) for a model of a few
dict leaves, per-device micro-batches of 8 samples, AdamW, k in {1, 4, 16}:

  per-micro-batch  psum the gradient on every micro-batch (what a train step
                   that averages gradients across devices does), then
                   optax_accum.accumulate(k, adamw) on the reduced gradient;
  deferred         optax_accum.accumulate(k, adamw, axis_name='data') on the
                   local gradient: one psum per window, in the emitting
                   branch (PyTorch's no_sync).

Reports the median time per mini-step and the bytes all-reduced per window,
read from the compiled HLO (all-reduce operands in the entry computation run
every mini-step; those inside the conditional run once per window).

  python benchmarks/scaling.py [--params 4e6]

On GPUs or several hosts, the same: build the mesh over `jax.devices()`
(after `jax.distributed.initialize()` on each host) and drop the XLA_FLAGS
line; the bytes are the same, the times are the interconnect's.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import argparse  # pylint: disable=g-import-not-at-top,g-bad-import-order
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_accum

sys.path.insert(0, os.path.dirname(__file__))
import hlo  # noqa: E402

N_DEV = 8
LOCAL_BATCH = 8


def make_params(n):
  d = max(8, int(round((n / 2) ** 0.5)))
  key1, key2 = jax.random.split(jax.random.key(0))
  return {
    "w1": 0.01 * jax.random.normal(key1, (d, d)),
    "w2": 0.01 * jax.random.normal(key2, (d, d)),
    "b": jnp.zeros(d),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def make_step(tx, mesh, deferred):
  def local(params, state, x, y):
    state = jax.tree.map(lambda a: a[0], state)
    grads = jax.grad(loss_fn)(params, x, y)
    if not deferred:
      grads = jax.lax.pmean(grads, "data")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), jax.tree.map(
      lambda a: a[None], state
    )

  return jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P("data")),
      check_vma=False,
    ),
    donate_argnums=1,
  )


def all_reduce_bytes(hlo_text):
  """(bytes per mini-step, bytes per emission) from the compiled HLO."""
  per_step = hlo.all_reduce_bytes(hlo.entry_computation(hlo_text))
  return per_step, hlo.all_reduce_bytes(hlo_text) - per_step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=4e6)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  mesh = jax.make_mesh(
    (N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  params = make_params(int(args.params))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  d = params["w1"].shape[0]
  rng = np.random.default_rng(0)
  data = NamedSharding(mesh, P("data"))
  x = jax.device_put(
    rng.normal(size=(N_DEV * LOCAL_BATCH, d)).astype(np.float32), data
  )
  y = jax.device_put(
    rng.normal(size=(N_DEV * LOCAL_BATCH, d)).astype(np.float32), data
  )
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, {N_DEV} host CPU "
    f"devices on {os.cpu_count()} cores ({platform.machine()}); "
    f"{n_params:,} float32 params ({4 * n_params / 2**20:.1f} MiB), "
    f"{LOCAL_BATCH} samples per device per micro-batch, medians\n"
  )
  print(
    "| k | reduction | ms per mini-step | MiB all-reduced per window "
    "| all-reduces per window |"
  )
  print("|---|---|---|---|---|")
  with jax.set_mesh(mesh):
    for k in (1, 4, 16):
      for deferred in (False, True):
        axis = "data" if deferred else None
        tx = optax_accum.accumulate(k, optax.adamw(1e-3), axis_name=axis)
        state = jax.device_put(
          jax.tree.map(
            lambda a: jnp.broadcast_to(a, (N_DEV,) + jnp.shape(a)),
            tx.init(params),
          ),
          NamedSharding(mesh, P("data")),
        )
        step = make_step(tx, mesh, deferred)
        p = jax.device_put(params, NamedSharding(mesh, P()))
        compiled = step.lower(p, state, x, y).compile()
        per_step, per_emit = all_reduce_bytes(compiled.as_text())
        for _ in range(k):  # warm-up window
          p, state = compiled(p, state, x, y)
        times = []
        for _ in range(args.rounds):
          for _ in range(k):
            t0 = time.perf_counter()
            p, state = compiled(p, state, x, y)
            jax.block_until_ready(p)
            times.append(time.perf_counter() - t0)
        window_bytes = k * per_step + per_emit
        n_reduce = (k if per_step else 0) + (1 if per_emit else 0)
        print(
          f"| {k} "
          f"| {'deferred (axis_name)' if deferred else 'per micro-batch'} "
          f"| {1e3 * statistics.median(times):.2f} "
          f"| {window_bytes / 2**20:.2f} | {n_reduce} |"
        )


if __name__ == "__main__":
  main()
