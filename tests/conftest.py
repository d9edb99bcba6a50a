"""Fixtures and process setup for the tests; helpers live in helpers.py."""

import os

# Eight host CPU devices for the sharding and shard_map tests; must be set
# before JAX starts (tests/multiprocess_worker.py sets its own 4).
if "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
  )

import sys  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

# benchmarks/hlo.py reads compiled HLO for the tests and benchmarks alike.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

# optax itself relies on standard promotion (adam's bias correction mixes a
# Python float with an int32 count), so strict promotion is switched on only
# around our own code, in tests/test_dtypes.py.

from helpers import make_problem  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

# What each feature needs beyond the declared floors (pyproject.toml): on
# older releases its tests skip with the reason (CI runs both).
_DEFERRAL = "the deferred reduction (axis_name) needs jax>=0.10"
_NNX = "the NNX front end needs flax>=0.12.7 (nnx.as_pure)"
_OPTAX_REF = "the reference optax.MultiSteps differs before optax 0.2.7"
_COMPILES = "counting compilations needs jax>=0.9 monitoring"


def _has_nnx_as_pure():
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(nnx, "as_pure")


_NEW_JAX = jax.__version_info__ >= (0, 10, 0)
_NEEDS = (
  ("test_deferral.py", _NEW_JAX, _DEFERRAL),
  ("test_unreduced.py", _NEW_JAX, _DEFERRAL),
  ("test_multiprocess.py", _NEW_JAX, _DEFERRAL),
  ("test_distributed.py", _NEW_JAX, _DEFERRAL),
  ("reduces_the_gradient_once", _NEW_JAX, _DEFERRAL),
  ("hsdp", _NEW_JAX, _DEFERRAL),
  ("many_devices", _NEW_JAX, _DEFERRAL),
  ("another mesh", _NEW_JAX, _DEFERRAL),
  ("reduced_state", _NEW_JAX, _DEFERRAL),
  ("unreduced_state", _NEW_JAX, _DEFERRAL),
  ("nnx", _has_nnx_as_pure(), _NNX),
  ("Optimizer", _has_nnx_as_pure(), _NNX),
  ("both_front_ends", _has_nnx_as_pure(), _NNX),
  (
    "another_structure",
    tuple(map(int, optax.__version__.split(".")[:3])) >= (0, 2, 7),
    _OPTAX_REF,
  ),
  (
    "compiles",
    hasattr(jax.monitoring, "unregister_event_duration_listener"),
    _COMPILES,
  ),
)


def pytest_collection_modifyitems(items):
  for item in items:
    for part, available, reason in _NEEDS:
      if not available and part in item.nodeid:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def problem():
  return make_problem()


# A script for subprocesses, not a test module: importing it would set up
# this process for distributed CPU runs.
collect_ignore = ["multiprocess_worker.py"]
