"""How many pieces one step crosses: the named functions of optax_accum (and
of optax, for optax.MultiSteps) called while one jitted step is traced,
the modules they live in, and how often the path switches module.

Paths: one `apply_gradients(accumulate(4, adamw))` step; the same with
`optax.MultiSteps(adamw, 4)` (its `update`, counted in optax's
`_accumulation.py`); under plain `jax.jit` on an 8-device mesh, the in-step
`microbatched_value_and_grad(..., axis_name=...)` and the step after it.

  python benchmarks/call_path.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import optax  # noqa: E402

import optax_accum  # noqa: E402


def traced_calls(step, *args, where=("optax_accum",)):
  """``[(module file, function)]`` called while ``step`` is lowered."""
  calls = []

  def profile(frame, event, arg):
    del arg
    name = frame.f_code.co_filename
    if event == "call" and any(f"/{w}/" in name for w in where):
      calls.append((os.path.basename(name), frame.f_code.co_name))

  sys.setprofile(profile)
  try:
    step.lower(*args)
  finally:
    sys.setprofile(None)
  return [c for c in calls if not c[1].startswith("<")]  # named only


def row(label, calls):
  functions = list(dict.fromkeys(calls))
  modules = {m for m, _ in functions}
  switches = sum(a[0] != b[0] for a, b in zip(calls, calls[1:]))
  return f"| {label} | {len(functions)} | {len(modules)} | {switches} |"


def main():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  grads = jax.tree.map(jnp.ones_like, params)
  rows = []
  tx = optax_accum.accumulate(4, optax.adamw(1e-3))
  step = jax.jit(lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p))
  calls = traced_calls(step, params, tx.init(params), grads)
  rows.append(row("`apply_gradients(accumulate(4, adamw))`", calls))
  ms = optax.MultiSteps(optax.adamw(1e-3), 4)
  step = jax.jit(lambda p, s, g: ms.update(g, s, p))
  calls = traced_calls(step, params, ms.init(params), grads, where=("optax",))
  calls = [c for c in calls if c[0] == "_accumulation.py"]
  rows.append(row("`optax.MultiSteps(adamw, 4).update`", calls))

  def loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2), jnp.float32(x.shape[0])

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    tx = optax_accum.accumulate(4, optax.adamw(1e-3), axis_name="data")
    vg = optax_accum.microbatched_value_and_grad(
      loss, 1, batch_argnums=(1, 2), axis_name="data"
    )
    x = jax.device_put(jnp.ones((16, 4)), P("data"))
    y = jax.device_put(jnp.ones((16, 3)), P("data"))
    calls = traced_calls(jax.jit(vg), p, x, y)
    rows.append(row("8 devices: `microbatched_value_and_grad`", calls))
    _, g, n = jax.jit(vg)(p, x, y)
    step = jax.jit(
      lambda p, s, g, n: optax_accum.apply_gradients(tx, g, s, p, weight=n)
    )
    calls = traced_calls(step, p, tx.init(p), g, n)
    rows.append(row("8 devices: `apply_gradients(..., axis_name)`", calls))
  versions = f"jax {jax.__version__}, optax {optax.__version__}"
  print(f"optax_accum {optax_accum.__version__}, {versions}\n")
  print("| path | named functions | modules | module switches |")
  print("|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
