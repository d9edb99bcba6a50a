"""Reading compiled HLO text: full-size copies and the collectives' kinds.

Shared by the benchmarks and the tests (tests/conftest.py puts this folder
on the path): one definition of what counts. Where a step reduces, and how
many bytes, is `optax_accum.reduction_report`'s.
"""

import re

import jax


def _shapes(params) -> set[str]:
  short = {
    "float32": "f32",
    "float64": "f64",
    "bfloat16": "bf16",
    "float16": "f16",
  }
  return {
    f"{short.get(jax.numpy.result_type(p).name, '?')}["
    + ",".join(map(str, p.shape))
    + "]"
    for p in jax.tree.leaves(params)
    if p.size > 1
  }


def full_size_copies(hlo_text: str, params) -> int:
  """Counts `copy` ops of param-shaped buffers in compiled HLO text.

  Copies of a broadcast constant are left out: XLA may share one zeros
  buffer between same-shaped leaves of emitted updates and copy it, a write
  rather than a copy of state. What is counted are copies of params, state
  or gradients.
  """
  shapes = _shapes(params)
  n = 0
  for line in hlo_text.splitlines():
    m = re.search(r"= (\w+\[[\d,]*\])\{[\d,]*\} copy\(%([\w.\-]+)", line)
    if m and m.group(1) in shapes and "broadcast" not in m.group(2):
      n += 1
  return n


def collectives(hlo_text: str) -> list[tuple[str, str]]:
  """`(shape, op)` of every collective op in HLO text."""
  return re.findall(
    r"= (\S+) (all-gather|all-to-all|collective-permute|all-reduce|"
    r"reduce-scatter)(?:-start)?\(",
    hlo_text,
  )
