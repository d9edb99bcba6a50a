"""``reduction_report``: where a compiled step reduces, read from its HLO."""

from collections.abc import Callable
import dataclasses
import itertools
import math
import re
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from optax_accum import _plan

_OP = re.compile(r'= (.+?) (all-reduce|reduce-scatter)(?:-start)?\((.*)$')
_CALLS = re.compile(
  r'(to_apply|calls|body|condition|true_computation|'
  r'false_computation)=%?([\w.\-]+)'
)


class Reduction(NamedTuple):
  """One all-reduce or reduce-scatter (``axes`` None: no mesh axes match)."""

  op: str
  bytes: int
  axes: Optional[tuple[str, ...]]
  emitting: bool  # inside a conditional's branch
  in_loop: bool  # inside a while body (a scan)


@dataclasses.dataclass(frozen=True)
class ReductionReport:
  """What :func:`optax_accum.reduction_report` returns: ``reductions`` and,
  in bytes per device, ``every_call_bytes`` (outside any conditional),
  ``emitting_bytes`` (inside conditionals: the gradient step's branch),
  ``in_loop_bytes`` (per iteration of loop bodies: a micro-batch scan) and
  ``by_axis()``, ``{axes: (every_call_bytes, emitting_bytes)}``."""

  reductions: tuple[Reduction, ...]

  def _sum(self, keep: Callable[[Reduction], bool]) -> int:
    return sum(r.bytes for r in self.reductions if keep(r))

  every_call_bytes = property(lambda self: self._sum(lambda r: not r.emitting))
  emitting_bytes = property(lambda self: self._sum(lambda r: r.emitting))
  in_loop_bytes = property(lambda self: self._sum(lambda r: r.in_loop))

  def by_axis(self) -> dict[Any, tuple[int, int]]:
    every = lambda a: self._sum(lambda r: r.axes == a and not r.emitting)
    emitting = lambda a: self._sum(lambda r: r.axes == a and r.emitting)
    axes = {r.axes for r in self.reductions}
    return {a: (every(a), emitting(a)) for a in axes}


def _computations(text):
  """``{name: lines}`` of every computation; the ENTRY's name."""
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head:
      name = head.group(2)
      comps[name] = []
      entry = name if head.group(1) else entry
    elif name is not None and line.strip() != '}':
      comps[name].append(line)
  return comps, entry


def _places(comps, entry):
  """``{computation: (emitting, in_loop)}`` for those reachable from the
  entry: inside a conditional's branch, inside a while body."""
  places, todo = {}, [(entry, False, False)]
  while todo:
    name, emitting, in_loop = todo.pop()
    if name not in comps or places.get(name) == (emitting, in_loop):
      continue
    places[name] = (emitting, in_loop)
    for line in comps[name]:
      for kind, callee in _CALLS.findall(line):
        branch = kind.endswith('_computation')
        todo.append((callee, emitting or branch, in_loop or kind == 'body'))
      for group in re.findall(r'branch_computations=\{([^}]*)\}', line):
        for callee in group.split(','):
          todo.append((callee.strip().lstrip('%'), True, in_loop))
  return places


def _groups(line) -> Optional[set[frozenset[int]]]:
  """The device groups of a collective's HLO line, in any of its forms."""
  explicit = re.search(r'replica_groups=\{(\{[\d,{} ]*\})\}', line)
  if explicit:
    found = re.findall(r'\{([\d, ]*)\}', explicit.group(1))
    return {frozenset(int(i) for i in g.split(',') if i.strip()) for g in found}
  iota = r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?'
  iota = re.search(iota, line)
  named = re.search(
    r"mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
    r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
    line,
  )
  if iota:
    dims = [int(d) for d in iota.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(4):
      ids = ids.transpose([int(p) for p in iota.group(4).split(',')])
    rows = ids.reshape(int(iota.group(1)), int(iota.group(2)))
    return {frozenset(r.tolist()) for r in rows}
  if named:
    axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
    sizes = [int(n) for _, n in axes]
    dims = [
      int(d) for d in (named.group(2) or str(math.prod(sizes))).split(',')
    ]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if named.group(3):
      ids = ids.transpose([int(p) for p in named.group(3).split(',')])
    ids = ids.reshape(sizes)
    over = [i for i, (a, _) in enumerate(axes) if f"'{a}'" in named.group(4)]
    return _axis_groups(ids, over)
  return None


def _axis_groups(ids, over) -> set[frozenset[int]]:
  keep = [i for i in range(ids.ndim) if i not in over]
  moved = np.transpose(ids, keep + list(over))
  rows = moved.reshape(-1, math.prod(ids.shape[i] for i in over) if over else 1)
  return {frozenset(r.tolist()) for r in rows}


def _axes(groups, mesh) -> Optional[tuple[str, ...]]:
  """The mesh axes whose device groups are ``groups``."""
  if groups is None or mesh is None:
    return None
  ids = np.arange(mesh.size).reshape(tuple(mesh.shape.values()))
  names = list(mesh.shape)
  for n in range(1, len(names) + 1):
    for over in itertools.combinations(range(len(names)), n):
      if _axis_groups(ids, list(over)) == groups:
        return tuple(names[i] for i in over)
  return None


def _bytes(shapes: str) -> int:
  n = 0
  for kind, bits, dims in re.findall(r'([a-z]+)(\d*)\w*\[([\d,]*)\]', shapes):
    size = 1 if kind == 'pred' else int(bits) // 8  # c64: 8 bytes
    n += math.prod(int(d) for d in dims.split(',') if d) * size
  return n


def _mesh_of(args):
  for x in jax.tree.leaves(args):
    sharding = getattr(x, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def reduction_report(
  fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> ReductionReport:
  """Compiles ``fn`` for these arguments and reports where it reduces.

  Nothing runs. Lists every all-reduce and reduce-scatter of the HLO:
  bytes per device (a reduce-scatter's operand), the mesh axes its device
  groups span, whether it runs in a conditional's branch (a gradient step)
  or a loop body (a micro-batch scan). Small ``every_call_bytes`` and
  ``emitting_bytes`` the gradient's: "reduces once per window".

  Args:
    fn: the step as you run it (as ``step`` of :func:`plan_microbatches`).
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``, as sharded).
    **kwargs: its keyword arguments.

  Returns:
    A :class:`ReductionReport` (``reductions``: each with ``op``,
    ``bytes``, ``axes``, ``emitting``, ``in_loop``; totals in bytes). Axes
    come from the arguments' mesh or the one set with ``jax.set_mesh``.

  Raises:
    TypeError: a plain function of NNX objects (``nnx.jit`` it); the errors
      of ``fn.lower(*args, **kwargs).compile()``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_accum
    >>> report = optax_accum.reduction_report(lambda x: x * 2, jnp.ones(3))
    >>> report.every_call_bytes, report.emitting_bytes
    (0, 0)

  References:
    MaxText PR #5104 (an every-micro-batch all-reduce found in HLO).
  """
  lower = _plan.lowering(fn, (args, kwargs), None)
  text = lower(*args, **kwargs).compile().as_text()
  comps, entry = _computations(text)
  places = _places(comps, entry)
  mesh = _mesh_of((args, kwargs))
  found = []
  for name, (emitting, in_loop) in places.items():
    for line in comps[name]:
      m = _OP.search(line)
      groups = _groups(line) if m else None
      if not m or (groups is not None and max(map(len, groups)) < 2):
        continue
      size = _bytes(m.group(1))
      if m.group(2) == 'reduce-scatter' and groups:
        size *= len(next(iter(groups)))
      axes = _axes(groups, mesh)
      found.append(Reduction(m.group(2), size, axes, emitting, in_loop))
  return ReductionReport(tuple(found))
