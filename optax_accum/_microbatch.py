"""In-step micro-batching: the window's gradient inside one jitted step."""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import numbers
from operator import index
from typing import Any, Union

import jax
from jax import lax
from jax.core import Tracer
import jax.numpy as jnp

from optax_accum import _accumulator
from optax_accum import _call_checks
from optax_accum import _checks
from optax_accum import _layout
from optax_accum import _unreduced
from optax_accum._errors import fail
from optax_accum._errors import leaf_name

_REDUCTIONS = ('mean', 'sum')


def _split(batches, num_microbatches: int):
  """``{argnum: batch}`` of (B, ...) leaves to (k, B / k, ...): micro-batch
  i holds rows i * B / k on, or rows i, i + k, ... where rows are sharded
  (each micro-batch spans every device; nothing moves)."""
  leaves = jax.tree.leaves_with_path(batches)
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for _, x in leaves}
  for path, x in leaves:
    if jnp.ndim(x) == 0 or len(sizes) > 1 or jnp.shape(x)[0] % num_microbatches:
      at = f'shape {jnp.shape(x)} at {leaf_name(path)}'
      want = f'one leading size divisible by k ({sorted(sizes, key=str)})'
      fail(ValueError, 'batch_argnums', f'{at}; give every batch leaf {want}')
  k = num_microbatches
  sharded = lambda x: _call_checks.spec_of(x)[:1] not in ((), (None,))
  strided = any(jnp.ndim(x) and sharded(x) for _, x in leaves)

  def split(x):
    x = jnp.asarray(x)
    if strided:
      return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])

  return jax.tree.map(split, batches)


def check_args(
  loss_fn, num_microbatches, reduction, batch_argnums, key_argnum, **flags
):
  """Checks the construction arguments; returns ``(k, batch_argnums,
  flags)``: an int (k concrete: an int, numpy or JAX integer scalar), a
  tuple and the ``flags`` as bools."""
  if not callable(loss_fn):
    fail(TypeError, 'loss_fn', f'{loss_fn!r}, not a function of params')
  flags = {name: _checks.flag(v, name) for name, v in flags.items()}
  if isinstance(num_microbatches, Tracer):  # jit: static_argnames
    fail(TypeError, 'num_microbatches', 'traced; make it a static argument')
  try:
    k = None if isinstance(num_microbatches, bool) else index(num_microbatches)
  except TypeError:
    k = None
  if k is None or k < 1:
    fail(ValueError, 'num_microbatches', f'{num_microbatches!r}, not >= 1')
  if reduction not in _REDUCTIONS:
    fail(ValueError, 'reduction', f'{reduction!r}, not in {_REDUCTIONS}')
  one = isinstance(batch_argnums, numbers.Integral)
  batch_argnums = (batch_argnums,) if one else tuple(batch_argnums)
  keys = () if key_argnum is None else (key_argnum,)
  bad = lambda n: isinstance(n, bool) or not isinstance(n, numbers.Integral)
  clash = set(keys) & set(batch_argnums)
  for name, nums in (('batch_argnums', batch_argnums), ('key_argnum', keys)):
    if any(bad(n) or n < 1 for n in nums) or (name == 'key_argnum' and clash):
      fail(ValueError, name, f'{nums!r}; give distinct positions >= 1')
  return k, tuple(int(n) for n in batch_argnums), flags


def microbatched_value_and_grad(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  *,
  has_aux: bool = False,
  reduction: str = 'mean',
  batch_argnums: Union[int, Sequence[int]] = 1,
  key_argnum: Union[int, None] = None,
  unroll: Union[int, bool] = 1,
  axis_name: Union[str, tuple[str, ...], None] = None,
  sq_norms: bool = False,
) -> Callable[..., Any]:
  r"""Turns a loss into the token-weighted value and gradient of a window.

  The returned function splits its batch arguments along their leading axis
  into ``num_microbatches`` micro-batches (strided where the rows are
  sharded over devices) and runs ``loss_fn`` on them in a ``lax.scan``.
  Micro-batch :math:`i` has loss :math:`L_i` and weight :math:`w_i` (its
  tokens or samples); with ``reduction="mean"``

  .. math::
    L = \frac{\sum_i w_i L_i}{\sum_i w_i}, \qquad
    g = \frac{\sum_i w_i \nabla L_i}{\sum_i w_i},

  and with ``reduction="sum"`` (:math:`L_i` a sum) :math:`w_i L_i` becomes
  :math:`L_i`. A window of total weight 0 gives zero gradient and loss. The
  returned ``weight`` feeds ``accumulate``'s ``weight``, so both compose.

  Args:
    loss_fn: ``loss_fn(params, *args) -> (loss, weight)``, or with
      ``has_aux`` ``(loss, (weight, aux))``: ``loss`` a float scalar,
      ``weight`` a non-negative scalar, ``aux`` a pytree of float arrays
      (means over the micro-batch, combined with the weights).
    num_microbatches: the number of micro-batches, a positive int.
    has_aux: whether ``loss_fn`` returns ``aux``.
    reduction: ``"mean"`` or ``"sum"``, how ``loss`` reduces over items.
    batch_argnums: the positions (in ``loss_fn``'s arguments, params being
      0) of the arguments to split; the others are passed whole.
    key_argnum: the position of a ``jax.random`` key; micro-batch ``i`` gets
      ``jax.random.fold_in(key, i)`` (with ``axis_name``, of the key folded
      with the device's index first).
    unroll: ``lax.scan``'s ``unroll`` (``True``: straight-line code).
    axis_name: None, or Explicit mesh axes (``jax.set_mesh``) sharding the
      batch: ``loss_fn`` runs per device in ``jax.shard_map`` (HSDP: params
      sharded over other axes gathered), ``grads`` unreduced over them for
      ``accumulate(..., axis_name=...)``; ``num_microbatches`` per device.
    sq_norms: also return ``(sum_i w_i |g_i|^2, n)`` of the micro-batch mean
      gradients (float32, summed over devices), for ``accumulate``'s
      ``sq_norms`` (the noise scale of the in-step form).

  Returns:
    A function of ``loss_fn``'s arguments returning ``(loss, grads,
    weight)``, ``((loss, aux), grads, weight)`` with ``has_aux``, then
    ``sq_norms`` where asked: ``grads`` shaped and typed like the params,
    ``loss`` and ``aux`` float32 (or wider), ``weight`` the total.

  Raises:
    ValueError: an argument out of range; when called, batch leaves whose
      leading sizes differ or do not divide by ``num_microbatches``, or
      ``loss_fn`` not returning scalar ``(loss, weight)``. TypeError: a
      wrong type (``loss_fn``, ``unroll``, an integer param, ``key_argnum``
      not at a key). A traced bad weight makes the result NaN.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_accum
    >>> loss_fn = lambda w, x: (jnp.mean((x * w) ** 2), x.shape[0])
    >>> f = optax_accum.microbatched_value_and_grad(loss_fn, 2)
    >>> loss, g, n = jax.jit(f)(1.0, jnp.arange(8.0))
    >>> float(loss), float(g), float(n)  # the mean over the 8 rows
    (17.5, 35.0, 8.0)

  References:
    ``optax.microbatching.microbatch`` (whose mean is unweighted); Hugging
    Face transformers PR #34191 (the global token mean); MaxText's in-step
    gradient accumulation.
  """
  given = (loss_fn, num_microbatches, reduction, batch_argnums, key_argnum)
  k, argnums, flags = check_args(*given, has_aux=has_aux, sq_norms=sq_norms)
  has_aux, sq_norms = flags['has_aux'], flags['sq_norms']
  if not isinstance(unroll, numbers.Integral) or unroll < 0:  # bools pass
    fail(TypeError, 'unroll', f'{unroll!r}; give a bool or an int >= 0')
  options = (has_aux, reduction, argnums, key_argnum, unroll, sq_norms)
  sums = WindowSums(loss_fn, k, *options)
  names = _checks.axis_name(axis_name)
  if names is not None:
    return _unreduced.value_and_grad(sums, names)

  def value_and_grad(params, *args):
    g_sum, w_sum, l_sum, a_sum = sums(params, *args)
    denom = jnp.where(w_sum == 0, 1.0, w_sum)  # NaN stays NaN
    # A multiply, which XLA fuses into each consumer (the optimizer's
    # kernels); a divide it would write to a full-size temporary first.
    mean = lambda g, p: (g * (1 / denom.astype(g.dtype))).astype(p.dtype)
    grads = jax.tree.map(mean, g_sum, jax.tree.map(jnp.asarray, params))
    loss = l_sum / denom.astype(l_sum.dtype)
    return sums.outputs(loss, grads, w_sum, a_sum, denom)

  return value_and_grad


@dataclasses.dataclass(frozen=True)
class WindowSums:
  """The checked arguments of ``microbatched_value_and_grad``; called, the
  window's sums ``(sum_i w_i g_i, sum_i w_i, sum_i w_i L_i, sum_i w_i
  aux_i)`` (``g_i``, ``L_i`` unweighted with ``reduction="sum"``)."""

  loss_fn: Callable[..., Any]
  num_microbatches: int
  has_aux: bool
  reduction: str
  batch_argnums: tuple[int, ...]
  key_argnum: Union[int, None]
  unroll: Union[int, bool]
  sq_norms: bool = False

  def outputs(self, loss, grads, total, a_sum, denom):
    """What the function returns: ``(loss, grads, weight)`` (``(loss, aux)``
    with ``has_aux``), then ``sq_norms`` where asked."""
    if self.sq_norms:
      a_sum, (sq, n) = a_sum
    aux = jax.tree.map(lambda a: a / denom.astype(a.dtype), a_sum)
    out = ((loss, aux) if self.has_aux else loss, grads, total)
    # n is summed as w (1 / w): rounded back to a count.
    return (*out, (sq, jnp.round(n))) if self.sq_norms else out

  def weighted_loss(self, params, args):
    """``(loss, (weight, loss, aux))`` of one micro-batch, checked."""
    out = self.loss_fn(params, *args)
    form = '(loss, (weight, aux))' if self.has_aux else '(loss, weight)'
    if not (isinstance(out, tuple) and len(out) == 2) or (
      self.has_aux and not (isinstance(out[1], tuple) and len(out[1]) == 2)
    ):
      fail(ValueError, 'loss_fn', f'returned {jax.tree.structure(out)}; {form}')
    loss, rest = out
    weight, aux = rest if self.has_aux else (rest, None)
    scalar = lambda x: not isinstance(x, (tuple, list, dict, type(None)))
    if not all(scalar(x) and jnp.shape(x) == () for x in (loss, weight)):
      fail(ValueError, 'loss_fn', f'returned non-scalars; return {form}')
    # A bad weight raises (concrete) or poisons the sums (traced). It scales
    # the float32 gradient, never a low-precision loss's cotangent.
    weight = _call_checks.weight_of(weight, self.weight_dtype(params))
    return loss, (weight, loss, aux)

  def weight_dtype(self, params):
    """float32, or the widest accumulator dtype of the params."""
    real = lambda p: jnp.finfo(_accumulator.default_dtype(p.dtype)).dtype
    leaves = jax.tree.leaves(jax.tree.map(jnp.asarray, params))
    return _accumulator.promote(jnp.float32, *map(real, leaves))

  def call_args(self, args, micro, i):
    """The arguments of micro-batch ``i``."""
    call_args = list(args)
    for n, value in micro.items():
      call_args[n - 1] = value
    if self.key_argnum is not None:
      key = args[self.key_argnum - 1]
      call_args[self.key_argnum - 1] = jax.random.fold_in(key, i)
    return call_args

  def body(self, params, args, carry, xs):
    """Adds one micro-batch's terms into the carried sums."""
    i, micro = xs
    grad = jax.grad(self.weighted_loss, has_aux=True)
    grads, (weight, loss, aux) = grad(params, self.call_args(args, micro, i))
    g_sum, w_sum, l_sum, a_sum = carry
    # sum_i w_i dL_i (mean) or sum_i dL_i (sum), divided once at the end.
    # A weight-0 micro-batch adds nothing, even a NaN gradient or loss.
    scale = weight if self.reduction == 'mean' else jnp.ones_like(weight)
    if self.sq_norms:  # w |mean g_i|^2 and w (1 / w), summed as aux is
      mean_sq = _accumulator.sq_norm(grads) / jnp.square(weight / scale)
      aux = (aux, (mean_sq, 1 / weight))
    zero = weight == 0
    term = lambda x, s, d: x.astype(d) * s.astype(d)
    add = lambda a, x, s: a + jnp.where(zero, 0, term(x, s, a.dtype))
    g_sum = jax.tree.map(lambda a, g: add(a, g, scale), g_sum, grads)
    a_sum = jax.tree.map(lambda a, x: add(a, x, weight), a_sum, aux)
    return (g_sum, w_sum + weight, add(l_sum, loss, scale), a_sum), None

  def __call__(self, params, *args):
    keys = [] if self.key_argnum is None else [('key_argnum', self.key_argnum)]
    for name, n in [('batch_argnums', n) for n in self.batch_argnums] + keys:
      if n > len(args):
        fail(ValueError, name, f'{n}, beyond the {len(args) + 1} arguments')
    batches = {n: args[n - 1] for n in self.batch_argnums}
    split = _split(batches, self.num_microbatches)
    key = None if self.key_argnum is None else args[self.key_argnum - 1]
    if key is not None and not _is_key(key):
      fail(TypeError, 'key_argnum', f'{jax.typeof(key)}, not a random key')
    first = (jnp.zeros([], jnp.int32), jax.tree.map(lambda x: x[0], split))
    acc_dtype = lambda p: _accumulator.default_dtype(jnp.result_type(p))
    check = lambda path, p: _checks.param_dtype(path, p.dtype, acc_dtype(p))
    jax.tree.map_with_path(check, jax.eval_shape(lambda: params))
    call0 = lambda p: self.weighted_loss(p, self.call_args(args, first[1], 0))
    loss0, aux0 = jax.eval_shape(lambda p: call0(p)[1][1:], params)
    if self.sq_norms:
      aux0 = (aux0, (jax.ShapeDtypeStruct((), jnp.float32),) * 2)
    # The loss and aux sums in float32, or their own dtype when wider.
    zeros = lambda s: jnp.zeros(s.shape, _accumulator.promote(s.dtype, 'f4'))
    g0 = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=acc_dtype(p)), params)
    w0 = jnp.zeros([], self.weight_dtype(params))
    carry0 = (g0, w0, zeros(loss0), jax.tree.map(zeros, aux0))
    body = functools.partial(self.body, params, args)
    # Inside shard_map(check_vma=True) a sum varies across devices where its
    # terms do: the initial carry takes the types of one step's output.
    out = jax.eval_shape(lambda c, x: body(c, x)[0], carry0, first)
    like = lambda x, o: _layout.vary(x, sorted(_call_checks.varying_axes(o)))
    carry0 = jax.tree.map(like, carry0, out)
    xs = (jnp.arange(self.num_microbatches), split)
    return lax.scan(body, carry0, xs, unroll=self.unroll)[0]


def _is_key(key) -> bool:
  """A typed ``jax.random`` key or a raw uint32 one (``[..., 2]``)."""
  dtype = jnp.result_type(key)
  raw = dtype == jnp.uint32 and jnp.shape(key)[-1:] == (2,)
  return raw or jnp.issubdtype(dtype, jax.dtypes.prng_key)
