"""``plan_microbatches``: the largest micro-batch whose compiled step fits a
memory budget, found from ``memory_analysis()`` before anything runs."""

from collections.abc import Callable, Sequence
import dataclasses
import inspect
import itertools
from numbers import Integral
from operator import index
from typing import Any, Optional, Union

import jax
import numpy as np

from optax_accum._errors import fail
from optax_accum._errors import leaf_name


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan:
  """What :func:`optax_accum.plan_microbatches` returns, bytes per device:
  ``k * micro_batch_size`` is the global batch; ``peak_bytes``, the chosen
  step's compiled peak; ``predicted_bytes``, the line through the two
  nearest other probes there (None with fewer, as when k is 1);
  ``probes``, ``((size, peak_bytes), ...)`` of every compilation."""

  micro_batch_size: int
  k: int
  peak_bytes: int
  predicted_bytes: Optional[int]
  memory_limit: int
  probes: tuple[tuple[int, int], ...]


def _abstract(x, rows=None):
  """An array as a ``jax.ShapeDtypeStruct`` (named sharding, ``rows``)."""
  if not isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
    return x  # a Python or numpy scalar stays (it may be static)
  shape = tuple(x.shape) if rows is None else (rows, *x.shape[1:])
  sharding = getattr(x, 'sharding', None)
  named = isinstance(sharding, jax.sharding.NamedSharding)
  sharding = sharding if named else None
  return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)


def _batch(args, batch_argnums):
  """The global batch size and the rows per shard of the leading axis."""
  sizes, shards = set(), 1
  for n in batch_argnums:
    for path, x in jax.tree.leaves_with_path(args[n]):
      if not getattr(x, 'shape', ()):
        fail(ValueError, 'batch_argnums', f'{n}: a scalar at {leaf_name(path)}')
      sizes.add(x.shape[0])
      sharding = getattr(x, 'sharding', None)
      if isinstance(sharding, jax.sharding.NamedSharding):
        shards = max(shards, x.shape[0] // sharding.shard_shape(x.shape)[0])
  if len(sizes) != 1:
    fail(ValueError, 'batch_argnums', f'leading sizes {sorted(sizes)}; one')
  return sizes.pop(), shards


def _memory_limit(memory_limit, args) -> int:
  if memory_limit is None:
    arrays = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)]
    device = next(iter(arrays[0].devices())) if arrays else jax.devices()[0]
    stats = device.memory_stats() or {}
    if 'bytes_limit' not in stats:
      fail(ValueError, 'memory_limit', f'None, and {device} reports none')
    return int(stats['bytes_limit'] * 0.9)  # 10% for the runtime's own
  bad = isinstance(memory_limit, (bool, np.bool_, str, bytes))
  if bad or not hasattr(memory_limit, '__float__'):  # int, numpy, JAX
    fail(TypeError, 'memory_limit', f'{memory_limit!r}, not bytes')
  try:
    limit = float(memory_limit)
  except OverflowError:  # an int beyond float64
    limit = float('inf')
  if not 1 <= limit < float('inf'):
    fail(ValueError, 'memory_limit', f'{memory_limit!r}, not finite >= 1')
  return int(limit)


def lowering(step, args, k_argname):
  """``step``'s own ``lower`` (of a partial's jitted function too), so the
  donation and in-place updates (``nnx.jit``) are those that will run."""
  if hasattr(step, 'lower'):
    return step.lower
  func: Any = getattr(step, 'func', None)
  bound = getattr(step, 'keywords', {})
  if hasattr(func, 'lower'):  # functools.partial of a jitted step
    return lambda *a, **kw: func.lower(*step.args, *a, **{**bound, **kw})
  nnx = lambda x: any(
    c.__module__.startswith('flax.nnx') for c in type(x).__mro__
  )
  if any(map(nnx, jax.tree.leaves(args, is_leaf=nnx))):  # in-place updates
    fail(TypeError, 'step', 'a plain function of NNX objects: nnx.jit it')
  return jax.jit(step, static_argnames=k_argname).lower


def _k_keyword(step, k_argname) -> None:
  """``k_argname``: None or a keyword of ``step`` (of the function jitted)."""
  try:
    params = inspect.signature(getattr(step, '__wrapped__', step)).parameters
  except (TypeError, ValueError):  # no signature: the call will tell
    return
  var = any(p.kind == p.VAR_KEYWORD for p in params.values())
  if k_argname is not None and not (k_argname in params or var):
    fail(TypeError, 'k_argname', f'{k_argname!r}, not among {list(params)}')


def _search(sizes, peak, limit) -> int:
  """The index of the largest size whose peak fits (-1: none), the next one's
  not: the largest size, the middle one, twice where the line through the
  bracket's ends (or the two smallest probes) meets the limit, bisection."""
  n, probed = len(sizes), []
  lo, hi = -1, n
  while hi - lo > 1:
    t = len(probed)
    i = (n - 1, (n - 1) // 2)[t] if t < 2 else (lo + hi) // 2
    if t in (2, 3):
      ends = (lo, hi) if lo >= 0 else sorted(probed)[:2]
      at = _line(sizes, peak, ends)(limit) * (1 + 1e-9)  # float rounding
      i = sum(m <= at for m in sizes) - 1
    i = min(max(i, lo + 1), hi - 1)
    probed.append(i)
    lo, hi = (i, hi) if peak(sizes[i]) <= limit else (lo, i)
  return lo


def _line(sizes, peak, ends):
  """The size at which the line through the two probes reaches a peak."""
  (m0, p0), (m1, p1) = [(sizes[j], peak(sizes[j])) for j in ends]
  return lambda bytes_: m0 + (bytes_ - p0) * (m1 - m0) / max(p1 - p0, 1)


def _predicted(peaks, m) -> Optional[int]:
  """The line through the two probes nearest ``m`` (but ``m``, and size 1
  where others are: XLA can lay it out otherwise), at ``m``."""
  others = [p for p in peaks if p not in (m, 1)]
  others = others if len(others) >= 2 else [p for p in peaks if p != m]
  near = sorted(others, key=lambda p: abs(p - m))[:2]
  if len(near) < 2:
    return None
  (m0, p0), (m1, p1) = [(p, peaks[p]) for p in near]
  return round(p0 + (p1 - p0) * (m - m0) / (m1 - m0))


def plan_microbatches(
  step: Callable[..., Any],
  *args: Any,
  batch_argnums: Union[int, Sequence[int]] = 1,
  memory_limit: Optional[int] = None,
  k_argname: Optional[str] = None,
) -> MicrobatchPlan:
  """The largest micro-batch whose compiled ``step`` fits ``memory_limit``.

  Compiles ``step`` (nothing runs) for micro-batch sizes dividing the
  global batch and reads each peak per device from ``memory_analysis()``
  (temp + arguments + outputs - aliased): the largest size, the middle,
  twice where the line through the probes meets the limit, then bisection
  (at most 5 + log2(divisors) compilations). The chosen size's peak fits,
  the next larger size's does not.

  Args:
    step: the train step as you run it: ``jax.jit``- or ``nnx.jit``-ed
      (donation counts), a ``functools.partial`` of one (to bind keywords)
      or a pure function. Cross-step form: it takes one micro-batch;
      in-step form: the global batch and k as the static ``k_argname``.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``), the global
      batch at ``batch_argnums``: pytrees of one leading size (items).
    batch_argnums: the positions of the batch in ``args`` (0-based).
    memory_limit: bytes per device; None: 90% of ``bytes_limit``.
    k_argname: None (cross-step form) or the keyword taking k.

  Returns:
    A :class:`MicrobatchPlan`.

  Raises:
    ValueError: ``memory_limit`` below every peak (the least named), or
      None where the device reports none; ``batch_argnums`` out of range
      or sizes differing. TypeError: an argument of a wrong kind.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_accum
    >>> step = lambda w, x: w - 0.1 * x.T @ jnp.tanh(x @ w)
    >>> plan = optax_accum.plan_microbatches(
    ...     step, jnp.zeros((64, 64)), jnp.zeros((32, 64)),
    ...     memory_limit=60_000)
    >>> plan.k * plan.micro_batch_size, plan.peak_bytes <= 60_000
    (32, True)

  References:
    jax-ml/jax #31292; Accelerate's ``find_executable_batch_size``.
  """
  if not callable(step):
    fail(TypeError, 'step', f'{step!r}, not callable')
  limit = _memory_limit(memory_limit, args)
  argnums: Any = batch_argnums
  try:
    one = isinstance(argnums, Integral)
    nums = tuple(map(index, (argnums,) if one else argnums))
  except TypeError:
    fail(TypeError, 'batch_argnums', f'{batch_argnums!r}; give ints')
  if not nums or any(not 0 <= n < len(args) for n in nums):
    fail(ValueError, 'batch_argnums', f'{batch_argnums!r}; {len(args)} args')
  _k_keyword(step, k_argname)
  size, shards = _batch(args, nums)
  sizes = [m for m in range(1, size + 1) if size % m == 0 and m % shards == 0]
  lower = lowering(step, args, k_argname)
  peaks: dict[int, int] = {}

  def peak(m):
    if m not in peaks:
      kw = {} if k_argname is None else {k_argname: size // m}
      rows = lambda x: _abstract(x, m if k_argname is None else None)
      call = [
        jax.tree.map(rows if n in nums else _abstract, a)
        for n, a in enumerate(args)
      ]
      a: Any = lower(*call, **kw).compile().memory_analysis()  # per device
      used = a.temp_size_in_bytes + a.argument_size_in_bytes  # less aliased
      peaks[m] = int(used + a.output_size_in_bytes - a.alias_size_in_bytes)
    return peaks[m]

  lo = _search(sizes, peak, limit)
  if lo < 0:  # size 1 can cost more than 2 (XLA lays it out otherwise):
    fit = lambda i: peak(sizes[i]) <= limit  # up from 2 while sizes fit
    lo = max(itertools.takewhile(fit, range(1, len(sizes))), default=-1)
  if lo < 0:
    least = min(peaks, key=lambda size: peaks[size])
    least = f'the least peak is {peaks[least]}, at size {least}'
    fail(ValueError, 'memory_limit', f'{limit} bytes; {least}')
  near = sorted(range(len(sizes)), key=lambda i: abs(i - lo))  # two other
  while lo < len(sizes) - 1 and len(peaks) < min(3, len(sizes)):  # probes
    peak(sizes[next(i for i in near if sizes[i] not in peaks)])
  m, table = sizes[lo], tuple(sorted(peaks.items()))
  found = (peaks[m], _predicted(peaks, m), limit, table)
  return MicrobatchPlan(m, size // m, *found)
