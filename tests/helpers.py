"""Shared test helpers: a small regression problem and large-batch references.

Import them with `from helpers import ...`; tests/conftest.py holds fixtures.
"""

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax


def make_problem(seed=0, steps=10, batch=40, dim=6, out=3):
  """A linear regression: params and `steps` batches of `batch` samples."""
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(dim, out)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(out,)), jnp.float32),
  }
  true_w = rng.normal(size=(dim, out))
  xs = rng.normal(size=(steps, batch, dim))
  ys = xs @ true_w + 0.1 * rng.normal(size=(steps, batch, out))
  return params, jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)


def loss_fn(params, x, y):
  pred = x @ params["w"] + params["b"]
  return jnp.mean((pred - y) ** 2)


grad_fn = jax.jit(jax.grad(loss_fn))


def train_large_batch(opt, params, xs, ys):
  """One optimizer step per batch; returns (params, opt_state)."""
  state = opt.init(params)
  update = jax.jit(opt.update)
  for x, y in zip(xs, ys):
    updates, state = update(grad_fn(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def microbatches(x, y, k):
  """Splits one batch into k equal micro-batches, in order."""
  return zip(jnp.split(x, k), jnp.split(y, k))


def train_accumulated(tx, params, xs, ys, k_of_step):
  """Each batch i as k_of_step(i) micro-batches, one `tx.update` each."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, (x, y) in enumerate(zip(xs, ys)):
    for xm, ym in microbatches(x, y, k_of_step(i)):
      updates, state = update(grad_fn(params, xm, ym), state, params)
      params = optax.apply_updates(params, updates)
  return params, state


def max_abs_diff(a, b):
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def stateless(update):
  """A stateless transformation taking extra args, from its ``update``."""
  return optax.GradientTransformationExtraArgs(
    lambda p: optax.EmptyState(), update
  )


def counting_inner(calls):
  """An identity transformation that appends to `calls` each time it runs
  (a host callback, so it counts runs of compiled code too)."""

  def update(updates, state, params=None):
    del params
    jax.debug.callback(lambda: calls.append(1))
    return updates, state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


@contextlib.contextmanager
def count_compiles():
  """Yields a list that grows by one per XLA backend compilation."""
  compiles = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


# Meshes of 8 devices with an unreduced layout: name -> (mesh shape, axis
# names, axis_name, spec of the weight matrix w, spec of the batch).
MESH_LAYOUTS = {
  "data_parallel": ((8,), ("data",), "data", P(), P("data")),
  "hsdp": (
    (2, 4),
    ("replica", "fsdp"),
    "replica",
    P("fsdp"),
    P(("replica", "fsdp")),
  ),
  "hsdp_replicated": (
    (2, 4),
    ("replica", "fsdp"),
    "replica",
    P(),
    P(("replica", "fsdp")),
  ),
}
