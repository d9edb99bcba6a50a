"""`import optax_accum` alone reaches the Flax front ends, on first use."""

import subprocess
import sys


def test_the_flax_submodule_is_imported_on_first_use():
  code = (
    "import sys, optax_accum\n"
    "assert 'optax_accum.flax' not in sys.modules\n"
    "print(optax_accum.flax.Optimizer.__name__, 'flax' in dir(optax_accum))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  )
  assert out.stdout.split()[0] == "Optimizer"


def test_an_unknown_attribute_is_an_attribute_error():
  import optax_accum

  try:
    optax_accum.accumulator  # noqa: B018
  except AttributeError as e:
    assert "accumulator" in str(e)
  else:
    raise AssertionError("no AttributeError")
