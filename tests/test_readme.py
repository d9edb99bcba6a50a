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
  restored = namespace["restored"].opt_state
  assert isinstance(restored, optax_accum.AccumulateState)
  assert int(restored.mini_step) == 1
