"""The README's quick example runs and its assertions hold."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_example_runs():
  text = README.read_text()
  section = text.split("## Quick example", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert "assert" in code  # the example checks its own result
  exec(compile(code, "README quick example", "exec"), {})


def test_ci_runs_exactly_the_readme_test_command():
  text = README.read_text()
  command = re.search(r"The tests:\n\n```bash\n(.*?)\n```", text, re.S).group(1)
  ci_path = README.parent / ".ci" / "run"
  if not ci_path.exists():
    pytest.skip("no .ci/run outside a repository checkout (an sdist)")
  ci = ci_path.read_text()
  assert command in ci.splitlines()


def test_checkpoint_example_runs(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  import optax_accum  # pylint: disable=g-import-not-at-top

  text = README.read_text()
  section = text.split("## Checkpoints", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  params = {"w": jnp.ones(3)}
  tx = optax_accum.chain(optax_accum.accumulate(4), optax.adamw(1e-2))
  opt_state = tx.init(params)
  _, opt_state = tx.update(params, opt_state, params)
  namespace = {
    "jax": jax,
    "ocp": ocp,
    "tx": tx,
    "params": params,
    "opt_state": opt_state,
    "step": 1,
    "directory": tmp_path / "ckpt",
  }
  exec(compile(code, "README checkpoint example", "exec"), namespace)
  restored = namespace["restored"]["opt_state"]
  assert isinstance(restored, optax_accum.AccumulateState)
  assert int(restored.mini_step) == 1


def test_many_devices_example_runs_and_matches_the_large_batch():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import optax_accum  # pylint: disable=g-import-not-at-top

  text = README.read_text()
  section = text.split("## Many devices", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] - y) ** 2), x.shape[0]

  params = {"w": jnp.ones((3, 2))}
  batches = [
    (jnp.arange(48.0).reshape(16, 3) / (10 + i), jnp.ones((16, 2)))
    for i in range(2)
  ]
  namespace = {
    "jax": jax,
    "optax": optax,
    "optax_accum": optax_accum,
    "k": 2,
    "params": params,
    "loss_fn": loss_fn,
  }
  exec(compile(code, "README many-devices example", "exec"), namespace)
  p, state = params, namespace["state"]
  mesh = jax.make_mesh((8,), ("data",))
  with jax.set_mesh(mesh):
    for x, y in batches:
      batch = (jax.device_put(x, P("data")), jax.device_put(y, P("data")))
      p, state = namespace["step"](p, state, batch)
  x = jnp.concatenate([b[0] for b in batches])
  y = jnp.concatenate([b[1] for b in batches])
  opt = optax.adamw(1e-3)
  g = jax.grad(lambda q: loss_fn(q, (x, y))[0])(params)
  updates, _ = opt.update(g, opt.init(params), params)
  want = optax.apply_updates(params, updates)
  assert jnp.allclose(p["w"], want["w"], rtol=1e-5, atol=1e-7)
