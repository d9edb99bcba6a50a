"""Reading compiled HLO text: full-size copies, collectives, their bytes.

Shared by the benchmarks and the tests (tests/conftest.py puts this folder
on the path): one definition of what counts.
"""

import re

import jax

_BYTES = {"f32": 4, "s32": 4, "pred": 1, "bf16": 2, "f16": 2, "f64": 8}


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


def entry_computation(hlo_text: str) -> str:
  """The ENTRY computation of HLO text: what runs outside any branch."""
  start = hlo_text.index("\nENTRY")
  return hlo_text[start : hlo_text.index("\n}", start)]


def collectives(hlo_text: str) -> list[tuple[str, str]]:
  """`(shape, op)` of every collective op in HLO text."""
  return re.findall(
    r"= (\S+) (all-gather|all-to-all|collective-permute|all-reduce|"
    r"reduce-scatter)(?:-start)?\(",
    hlo_text,
  )


def collective_bytes(hlo_text: str, op: str = "all-reduce") -> int:
  """Bytes of the operands of every `op` (a collective) in HLO text."""
  n = 0
  for line in hlo_text.splitlines():
    m = re.search(rf"= (.*?) {op}(?:-start)?\(", line)
    if not m:
      continue
    for dtype, dims in re.findall(
      r"(f32|s32|pred|bf16|f16|f64)\[([\d,]*)\]", m.group(1)
    ):
      size = 1
      for d in dims.split(","):
        size *= int(d) if d else 1
      n += size * _BYTES[dtype]
  return n


def all_reduce_bytes(hlo_text: str) -> int:
  """Bytes of the operands of every all-reduce in HLO text."""
  return collective_bytes(hlo_text, "all-reduce")


def computations(hlo_text: str) -> dict[str, str]:
  """`{name: body}` of every computation in HLO text."""
  return {
    m.group(1): m.group(2)
    for m in re.finditer(
      r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S
    )
  }


def _branch_roots(body: str) -> set[str]:
  roots = set(
    re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", body)
  )
  for group in re.findall(r"branch_computations=\{([^}]*)\}", body):
    roots |= {c.strip().lstrip("%") for c in group.split(",")}
  return roots


def branch_computations(comps: dict[str, str]) -> set[str]:
  """Names of the computations run only inside a conditional's branches
  (what an emitting step runs once per window), from `computations`."""
  called = {
    name: set(
      re.findall(r"(?:to_apply|calls|body|condition)=%?([\w.\-]+)", body)
    )
    | _branch_roots(body)
    for name, body in comps.items()
  }
  todo = [r for body in comps.values() for r in _branch_roots(body)]
  seen: set[str] = set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo.extend(called.get(c, ()))
  return seen
