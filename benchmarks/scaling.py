"""Data-parallel accumulation on 8 devices: reduce every micro-batch or once.

Runs a jitted train step (`optax_accum.apply_gradients`, AdamW, state
donated) on 8 host CPU devices (a stand-in for 8 GPUs or hosts; the program
is the same SPMD program) for a two-layer MLP, per-device micro-batches of 8
samples, k in {1, 4, 16}:

  per micro-batch     plain jit on a ("data",) mesh, `jax.grad` of the global
                      loss (XLA all-reduces the gradient on every call),
                      `accumulate(k, adamw)`;
  shard_map deferral  `jax.shard_map` (check_vma=True, JAX's default), the
                      gradient w.r.t. `pcast(params, 'data', to='varying')`,
                      `accumulate(k, adamw, axis_name='data')`;
  jit deferral        plain jit, `microbatched_value_and_grad` with
                      `axis_name='data'`,
                      `accumulate(k, adamw, axis_name='data')`;
  HSDP per micro-batch / HSDP deferral
                      a (replica=2, fsdp=4) mesh with the weight matrices
                      sharded over fsdp: `jax.grad` of the global loss, or
                      `microbatched_value_and_grad` with
                      `axis_name='replica'` (the fsdp reduce-scatter runs
                      every micro-batch, the replica all-reduce once).

Reports the median time per mini-step and the bytes all-reduced and
reduce-scattered per window, read from the compiled HLO: collectives inside
a conditional's branches run once per window (the emitting branch), all
others on every mini-step. The scalar all-reduces of weights and losses are
counted too.

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
import functools
import platform
import statistics
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_accum

sys.path.insert(0, os.path.dirname(__file__))

N_DEV = 8
LOCAL_BATCH = 8


def make_params(n):
  d = max(8, 4 * int(round((n / 2) ** 0.5 / 4)))
  key1, key2 = jax.random.split(jax.random.key(0))
  return {
    "w1": 0.01 * jax.random.normal(key1, (d, d)),
    "w2": 0.01 * jax.random.normal(key2, (d, d)),
    "b": jnp.zeros(d),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def counted_loss(params, x, y):
  return loss_fn(params, x, y), x.shape[0]


def step_per_micro_batch(tx):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    return optax_accum.apply_gradients(tx, grads, state, params)

  return step


def step_jit_deferral(tx, axis):
  vg = optax_accum.microbatched_value_and_grad(
    counted_loss, 1, batch_argnums=(1, 2), axis_name=axis
  )

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y):
    _, grads, n = vg(params, x, y)
    return optax_accum.apply_gradients(tx, grads, state, params, weight=n)

  return step


def step_shard_map_deferral(tx, state):
  def local(params, state, x, y):
    grads = jax.grad(loss_fn)(lax.pcast(params, "data", to="varying"), x, y)
    return optax_accum.apply_gradients(tx, grads, state, params)

  specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, state)
  return jax.jit(
    jax.shard_map(
      local,
      in_specs=(P(), specs, P("data"), P("data")),
      out_specs=(P(), specs),
    ),
    donate_argnums=(0, 1),
  )


def window_bytes(report, k):
  """(all-reduce, reduce-scatter) bytes per window of k mini-steps, from
  optax_accum.reduction_report."""
  return [
    sum(
      r.bytes * (1 if r.emitting else k)
      for r in report.reductions
      if r.op == op
    )
    for op in ("all-reduce", "reduce-scatter")
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=4e6)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  params = make_params(int(args.params))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  d = params["w1"].shape[0]
  rng = np.random.default_rng(0)
  x_host = rng.normal(size=(N_DEV * LOCAL_BATCH, d)).astype(np.float32)
  y_host = rng.normal(size=(N_DEV * LOCAL_BATCH, d)).astype(np.float32)
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, {N_DEV} host CPU "
    f"devices on {os.cpu_count()} cores ({platform.machine()}); "
    f"{n_params:,} float32 params ({4 * n_params / 2**20:.1f} MiB), "
    f"{LOCAL_BATCH} samples per device per micro-batch, medians\n"
  )
  print(
    "| k | system | ms per mini-step | MiB all-reduced per window "
    "| MiB reduce-scattered per window |"
  )
  print("|---|---|---|---|---|")
  dp = jax.make_mesh((N_DEV,), ("data",))
  hsdp = jax.make_mesh((2, N_DEV // 2), ("replica", "fsdp"))
  systems = [
    ("per micro-batch", dp, None, P()),
    ("shard_map deferral", dp, "data", P()),
    ("jit deferral", dp, "data", P()),
    ("HSDP per micro-batch", hsdp, None, P("fsdp")),
    ("HSDP deferral", hsdp, "replica", P("fsdp")),
  ]
  for k in (1, 4, 16):
    for name, mesh, axis, w_spec in systems:
      tx = optax_accum.accumulate(k, optax.adamw(1e-3), axis_name=axis)
      with jax.set_mesh(mesh):
        batch_spec = P(mesh.axis_names)
        p = {
          "w1": jax.device_put(jnp.copy(params["w1"]), w_spec),
          "w2": jax.device_put(jnp.copy(params["w2"]), w_spec),
          "b": jax.device_put(jnp.copy(params["b"]), P()),
        }
        x = jax.device_put(x_host, batch_spec)
        y = jax.device_put(y_host, batch_spec)
        state = tx.init(p)
        if name.startswith("shard_map"):
          step = step_shard_map_deferral(tx, state)
        elif axis is None:
          step = step_per_micro_batch(tx)
        else:
          step = step_jit_deferral(tx, axis)
        compiled = step.lower(p, state, x, y).compile()
        report = optax_accum.reduction_report(step, p, state, x, y)
        reduced, scattered = window_bytes(report, k)
        for _ in range(k):  # warm-up window
          p, state = compiled(p, state, x, y)
        times = []
        for _ in range(args.rounds):
          for _ in range(k):
            t0 = time.perf_counter()
            p, state = compiled(p, state, x, y)
            jax.block_until_ready(p)
            times.append(time.perf_counter() - t0)
      print(
        f"| {k} | {name} | {1e3 * statistics.median(times):.2f} "
        f"| {reduced / 2**20:.2f} | {scattered / 2**20:.2f} |"
      )


if __name__ == "__main__":
  main()
