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


@pytest.fixture
def problem():
  return make_problem()


# A script for subprocesses, not a test module: importing it would set up
# this process for distributed CPU runs.
collect_ignore = ["multiprocess_worker.py"]
