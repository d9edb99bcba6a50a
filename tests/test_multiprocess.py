"""Two processes, 4 CPU devices each, deferred reduction (issue 5)."""

import os
import socket
import subprocess
import sys

import chex
from helpers import make_problem
from helpers import train_large_batch
import numpy as np
import optax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_large_batch(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(HERE), env.get("PYTHONPATH", "")]
  )
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(HERE, "multiprocess_worker.py"),
        str(i),
        str(port),
        str(outs[i]),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode())
  finally:
    for p in procs:  # stops by itself: no worker outlives the test
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(
    "gloo" in log.lower() and "not" in log.lower() and p.returncode
    for log, p in zip(logs, procs)
  ):
    pytest.skip("this jaxlib has no gloo CPU collectives:\n" + logs[0][-500:])
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = [dict(np.load(o)) for o in outs]
  chex.assert_trees_all_equal(got[0], got[1])
  params, xs, ys = make_problem(steps=3, batch=64, dim=8, out=4)
  want, _ = train_large_batch(optax.adamw(1e-2), params, xs, ys)
  for prefix in ("", "jit_"):  # shard_map, then plain jit on the mesh
    chex.assert_trees_all_close(
      {k: got[0][prefix + k] for k in want},
      {k: np.asarray(v) for k, v in want.items()},
      rtol=1e-5,
      atol=1e-6,
    )
