"""Checks of `accumulate`'s arguments, at construction and at `update`.

Static configuration is checked eagerly and raises naming the argument and
the value. Traced values cannot raise; where they can be wrong they are
mapped to one documented meaning (a schedule value) or poison the window
with NaN (a weight), never to a silently wrong mean.
"""

from collections.abc import Callable
import difflib
import numbers
import sys
from typing import Any, Union, cast
import warnings

import jax
from jax.core import Tracer
import jax.numpy as jnp
import numpy as np
import optax

INT32_MAX = int(np.iinfo(np.int32).max)
# The largest float32 below 2**31: casts to int32 without overflow.
_F32_BELOW_2_31 = float(np.float32(2**31 - 128))

ScheduleLike = Union[int, jax.Array, Callable[[jax.Array], Any]]


def leaf_name(path) -> str:
  """A leaf's path for error messages; a bare array is named the root."""
  return jax.tree_util.keystr(path) or '(the root)'


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def window_k(value) -> jax.Array:
  """Maps a schedule value to the k of a window: an int32 in [1, 2**31-1].

  Floats are rounded to the nearest integer; values below 1 and NaN mean 1
  (emit on every accepted micro-batch); values beyond int32 mean 2**31-1.
  """
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return jnp.asarray(min(max(int(value), 1), INT32_MAX), jnp.int32)
  k = jnp.asarray(value)
  if jnp.issubdtype(k.dtype, jnp.bool_):
    k = k.astype(jnp.int32)
  if jnp.issubdtype(k.dtype, jnp.integer):
    return jnp.clip(k, 1, INT32_MAX).astype(jnp.int32)
  k = jnp.round(k.astype(jnp.float32))
  ki = jnp.clip(k, 1.0, _F32_BELOW_2_31).astype(jnp.int32)
  ki = jnp.where(k >= 2.0**31 - 1, INT32_MAX, ki)
  return jnp.where(k >= 1.0, ki, 1)  # NaN compares false: 1


def schedule_fn(every_k_schedule: ScheduleLike):
  """Returns a `gradient_step -> int32 k` function; raises on bad input.

  Raises:
    TypeError: not an int, an integer array scalar or a callable.
    ValueError: an int (or concrete integer array) outside [1, 2**31 - 1], or
      a callable whose value at gradient step 0 is not a real scalar.
  """
  if isinstance(every_k_schedule, bool) or every_k_schedule is None:
    pass  # rejected below
  elif _is_array(every_k_schedule):
    # optax.inject_hyperparams passes an int hyperparameter as an array,
    # traced inside `update`.
    k = cast(Any, every_k_schedule)
    if jnp.shape(k) != () or not jnp.issubdtype(
      jnp.result_type(k), jnp.integer
    ):
      raise TypeError(
        '`every_k_schedule` given as an array must be an integer scalar, '
        f'but got dtype {jnp.result_type(k)} and shape {jnp.shape(k)}.'
      )
    if not isinstance(k, Tracer):
      _check_int_k(int(np.asarray(k)))
    return lambda gradient_step: window_k(k)
  elif callable(every_k_schedule):

    def probe(step):
      value = every_k_schedule(step)
      if isinstance(value, int) and not isinstance(value, bool):
        return jnp.zeros([], jnp.int32)  # any Python int is clipped
      return value

    k0 = jax.eval_shape(probe, jnp.zeros([], jnp.int32))
    if getattr(k0, 'shape', None) != () or not (
      jnp.issubdtype(k0.dtype, jnp.integer)
      or jnp.issubdtype(k0.dtype, jnp.floating)
    ):
      raise ValueError(
        '`every_k_schedule` must return a real scalar, but '
        f'every_k_schedule(0) returned {k0!r}.'
      )
    return lambda gradient_step: window_k(every_k_schedule(gradient_step))
  elif isinstance(every_k_schedule, numbers.Integral):
    k = _check_int_k(int(every_k_schedule))
    return lambda gradient_step: jnp.asarray(k, jnp.int32)
  raise TypeError(
    '`every_k_schedule` must be a positive int or a callable '
    f'`gradient_step -> k`, but got {every_k_schedule!r} of type '
    f'{type(every_k_schedule).__name__}.'
  )


def _check_int_k(k: int) -> int:
  if not 1 <= k <= INT32_MAX:
    raise ValueError(
      '`every_k_schedule` must be >= 1 and <= 2**31 - 1 (the number of '
      f'micro-batches per gradient step, an int32 counter), but got {k!r}.'
    )
  return k


def check_inner(inner, accumulate_update_cls) -> None:
  """Raises TypeError for an `inner` that is not a transformation instance.

  Raises:
    TypeError: `inner` is a factory (`optax.adamw`), a string or another
      non-transformation.
    ValueError: `inner` is itself an `accumulate(...)`.
  """
  if inner is None:
    return
  if not isinstance(inner, optax.GradientTransformation):
    hint = ''
    if hasattr(inner, 'gradient_transformation'):
      hint = ' Pass its .gradient_transformation().'
    elif hasattr(inner, '__name__') and callable(inner):
      name = inner.__name__
      hint = (
        f' `{name}` looks like a factory: call it, as in '
        f'`inner={name}(learning_rate)`.'
      )
    elif callable(inner):
      hint = ' If it is a factory (or a partial of one), call it.'
    raise TypeError(
      '`inner` must be an optax.GradientTransformation such as '
      f'optax.adamw(1e-3), but got {inner!r} of type '
      f'{type(inner).__name__}.{hint}'
    )
  if isinstance(getattr(inner.update, '__self__', None), accumulate_update_cls):
    raise ValueError(
      '`inner` is itself an optax_accum.accumulate(...). Nested windows '
      'are one window of the product: write accumulate(k1 * k2, opt) '
      'instead of accumulate(k1, accumulate(k2, opt)).'
    )


def check_updates(updates, acc_grads) -> None:
  """Raises where updates do not match the accumulator built at init.

  Raises:
    ValueError: another structure or shape.
    TypeError: an integer, boolean or (for a real accumulator) complex leaf.
  """
  got, want = jax.tree.structure(updates), jax.tree.structure(acc_grads)
  if got != want:
    raise ValueError(
      'The updates passed to accumulate(...).update do not have the '
      'structure of the params given to init. This is because the '
      'accumulator holds one array per parameter. (Params that hold more '
      "than the gradients, as optax.lookahead's LookaheadParams: init with "
      "the gradients' part, tx.init(params.fast).)\n"
      f'updates structure: {got}\nstate structure:   {want}'
    )
  for (path, u), a in zip(
    jax.tree.leaves_with_path(updates), jax.tree.leaves(acc_grads)
  ):
    where = leaf_name(path)
    if jnp.shape(u) != jnp.shape(a):
      raise ValueError(
        f'The update at {where} has shape {jnp.shape(u)}, but the '
        'accumulator (built from the params given to init) has shape '
        f'{jnp.shape(a)}.'
      )
    dtype = jnp.result_type(u)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f'The update at {where} has dtype {dtype}; accumulate takes '
        'floating-point gradients only, because a mean of integers would '
        'be truncated. Cast the gradient to a float dtype.'
      )
    if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
      a.dtype, jnp.complexfloating
    ):
      raise TypeError(
        f'The update at {where} is complex ({dtype}) but the accumulator '
        f'is real ({a.dtype}): the imaginary part would be dropped. Use '
        'complex params, or pass the real gradient.'
      )


_OWN_KEYWORDS = ('weight', 'flush', 'value')


def check_extra_args(extra_args) -> None:
  """Warns of a keyword that looks like a misspelt ``weight``, ``flush`` or
  ``value``: optax passes unknown keywords through to transformations that
  ignore them, so a slip would silently give the unweighted mean. A warning,
  not an error: an inner optimizer may take such a keyword (``weights``).
  """
  for name in extra_args:
    if name in _OWN_KEYWORDS:
      continue
    close = difflib.get_close_matches(name, _OWN_KEYWORDS, n=1, cutoff=0.8)
    if close:
      warnings.warn(
        f'accumulate got the keyword `{name}`, which it does not read: did '
        f'you mean `{close[0]}`? Keywords other than weight, flush and '
        'value reach the inner optimizer, and the ones it does not take are '
        'ignored, as in optax. Silence this warning if `inner` takes '
        f'`{name}`.',
        UserWarning,
        stacklevel=_user_stacklevel(),
      )


def _user_stacklevel() -> int:
  """The `stacklevel` of the first caller outside optax_accum, jax, optax and
  flax, so a warning points at the user's line on every path."""
  frame, level = sys._getframe(1), 1  # pylint: disable=protected-access
  while frame is not None:
    name = frame.f_globals.get('__name__', '')
    if name.split('.')[0] not in (
      'optax_accum',
      'jax',
      'jaxlib',
      'optax',
      'flax',
    ):
      return level
    frame, level = frame.f_back, level + 1
  return 1


def check_params(params, updates) -> None:
  """Raises where ``params`` hold a leaf of another shape than its gradient.

  Only where the two trees have one structure: some optimizers take params
  of another structure than the gradients (``optax.lookahead``'s
  ``LookaheadParams``).

  Raises:
    ValueError: a param whose shape differs from its gradient's.
  """
  if params is None or (
    jax.tree.structure(params) != jax.tree.structure(updates)
  ):
    return
  for (path, p), u in zip(
    jax.tree.leaves_with_path(params), jax.tree.leaves(updates)
  ):
    if jnp.shape(p) != jnp.shape(u):
      raise ValueError(
        f'The param at {leaf_name(path)} has shape {jnp.shape(p)}, but its '
        f'gradient has shape {jnp.shape(u)}.'
      )


def check_weight(weight):
  """Returns the weight as a float32 scalar, or None; raises on bad input.

  A concrete weight is checked after conversion to float32, the dtype
  weights are summed in. A traced weight cannot raise: a negative or
  non-finite one becomes NaN, which poisons the window's update.

  Raises:
    ValueError: not a scalar, or a concrete weight that is negative or not
      finite in float32.
    TypeError: a string, boolean or complex weight.
  """
  if weight is None:
    return None
  if isinstance(weight, (str, bytes)):
    raise TypeError(
      f'`weight` must be a real number, but got the string {weight!r}.'
    )
  if jnp.shape(weight) != ():
    raise ValueError(
      '`weight` must be a scalar (the number of items the micro-batch '
      f'gradient averages over), but got shape {jnp.shape(weight)}.'
    )
  dtype = jnp.result_type(weight)
  if jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(
    dtype, jnp.complexfloating
  ):
    raise TypeError(
      f'`weight` must be a real number, but got {weight!r} of dtype {dtype}.'
    )
  spec = getattr(getattr(jax.typeof(weight), 'sharding', None), 'spec', None)
  if getattr(spec, 'unreduced', None):
    raise ValueError(
      f'`weight` is typed {jax.typeof(weight)}, unreduced: a weight is the '
      "micro-batch's total number of items, a replicated scalar under "
      'jax.jit (as optax_accum.unreduced_value_and_grad returns it) and '
      "this device's own count inside jax.shard_map. Reduce it first "
      '(jax.reshard(weight, P())).'
    )
  if not isinstance(weight, Tracer):
    with np.errstate(over='ignore', invalid='ignore'):
      value = np.float32(np.asarray(weight))
    if not np.isfinite(value) or value < 0:
      raise ValueError(
        '`weight` must be a finite number >= 0 in float32 (the dtype '
        f'weights are summed in), but got {weight!r}.'
      )
    return jnp.asarray(value, jnp.float32)
  weight = jnp.asarray(weight, jnp.float32)
  return jnp.where((weight >= 0) & jnp.isfinite(weight), weight, jnp.nan)


def check_flush(flush):
  """Returns `flush` as a bool scalar array, or None.

  Raises:
    TypeError: `flush` is not a bool scalar.
  """
  if flush is None:
    return None
  if isinstance(flush, bool):
    return jnp.asarray(flush)
  dtype = getattr(flush, 'dtype', None)
  if (
    dtype is None
    or jnp.shape(flush) != ()
    or not jnp.issubdtype(dtype, jnp.bool_)
  ):
    raise TypeError(
      '`flush` must be a bool scalar (Python bool or a bool array of shape '
      f'()), but got {flush!r}. Write flush=bool(...) or flush=(x > 0).'
    )
  return jnp.asarray(flush)
