"""Every check of optax_accum, grouped by when it runs.

- Construction (``accumulate``, ``chain``): the configuration, eagerly.
- Init: the params' leaves (float, complex vs real).
- Each call: in ``_call_checks``.

A check exists only where the mistake would otherwise give a silently wrong
number or an error that does not say what to write; traced values never
raise (a bad traced weight poisons the window with NaN). Every raise goes
through :func:`optax_accum._errors.fail`.
"""

from collections.abc import Callable
import numbers
from typing import Any, Union

import jax
from jax.core import Tracer
import jax.numpy as jnp
import numpy as np
import optax

from optax_accum._errors import fail
from optax_accum._errors import leaf_name

INT32_MAX = int(np.iinfo(np.int32).max)
KAHAN_BFLOAT16 = 'kahan_bfloat16'
ScheduleLike = Union[int, jax.Array, Callable[[jax.Array], Any]]

# ---------------------------------------------------------------- construction


def window_k(value) -> jax.Array:
  """A schedule value as an int32 k in [1, 2**31 - 1]: rounded; below 1
  and NaN mean 1."""
  if isinstance(value, int):  # a Python int of any size
    value = min(max(value, 1), INT32_MAX)
  k = jnp.asarray(value)
  if k.dtype == jnp.bool_:
    k = k.astype(jnp.int32)
  if not jnp.issubdtype(k.dtype, jnp.floating):
    return jnp.clip(k, 1, INT32_MAX).astype(jnp.int32)
  k = jnp.round(k.astype(jnp.float32))
  ki = jnp.clip(k, 1.0, float(np.float32(2**31 - 128))).astype(jnp.int32)
  ki = jnp.where(k >= 2.0**31 - 1, INT32_MAX, ki)
  return jnp.where(k >= 1.0, ki, 1)  # NaN compares false: 1


def schedule(every_k_schedule: ScheduleLike) -> Callable[[jax.Array], Any]:
  """``every_k_schedule`` as a ``gradient_step -> int32 k`` function."""
  k = every_k_schedule
  if isinstance(k, (jax.Array, np.ndarray, np.generic)):
    # optax.inject_hyperparams passes an int hyperparameter as an array.
    if jnp.shape(k) != () or not jnp.issubdtype(
      jnp.result_type(k), jnp.integer
    ):
      fail(
        TypeError,
        'every_k_schedule',
        f'an array of dtype {jnp.result_type(k)} and shape {jnp.shape(k)}',
        'Give an int, an integer scalar or a callable gradient_step -> k.',
      )
    if not isinstance(k, Tracer):
      return schedule(int(np.asarray(k)))
    return lambda gradient_step: window_k(k)
  if callable(k):
    probe = lambda s: jnp.asarray(0 if isinstance(k(s), int) else k(s))
    out = jax.eval_shape(probe, jnp.zeros([], jnp.int32))
    if (
      out.shape != ()
      or not jnp.issubdtype(out.dtype, jnp.number)
      or (jnp.issubdtype(out.dtype, jnp.complexfloating))
    ):
      fail(
        ValueError,
        'every_k_schedule',
        f'every_k_schedule(0) returned {out}, not a real scalar',
        'Return the number of micro-batches per window, a scalar.',
      )
    return lambda gradient_step: window_k(k(gradient_step))
  if isinstance(k, numbers.Integral) and not isinstance(k, bool):
    if not 1 <= int(k) <= INT32_MAX:
      fail(
        ValueError,
        'every_k_schedule',
        f'{k!r}, outside [1, 2**31 - 1]',
        'Give the number of micro-batches per window, at least 1.',
      )
    value = int(k)
    return lambda gradient_step: jnp.asarray(value, jnp.int32)
  fail(
    TypeError,
    'every_k_schedule',
    f'{k!r} of type {type(k).__name__}',
    'Give a positive int or a callable gradient_step -> k.',
  )


def inner(value, is_accumulator: Callable[[Any], bool]) -> None:
  """``inner`` is None or a transformation that does not accumulate."""
  if value is None:
    return
  if not isinstance(value, optax.GradientTransformation):
    name = getattr(value, '__name__', None)
    hint = (
      f'Call the factory: inner={name}(learning_rate).'
      if name and callable(value)
      else 'Give a transformation such as optax.adamw(1e-3).'
    )
    if hasattr(value, 'gradient_transformation'):
      hint = 'Pass its .gradient_transformation().'
    fail(
      TypeError,
      'inner',
      f'{value!r} of type {type(value).__name__}, '
      'not an optax.GradientTransformation',
      hint,
    )
  if is_accumulator(value):
    fail(
      ValueError,
      'inner',
      'another optax_accum.accumulate(...): nested '
      'windows are one window of the product',
      'Write accumulate(k1 * k2, opt).',
    )


def accumulator_dtype(value):
  """None, ``"kahan_bfloat16"`` or a float32/float64/bfloat16/complex dtype."""
  if value is None or (isinstance(value, str) and value == KAHAN_BFLOAT16):
    return value
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    fail(
      TypeError,
      'accumulator_dtype',
      f'{value!r}, not a floating dtype',
      f'Give None, jnp.float32, jnp.bfloat16 or "{KAHAN_BFLOAT16}".',
    )
  if dtype.name not in (
    'float32',
    'float64',
    'bfloat16',
    'complex64',
    'complex128',
  ):
    fail(
      ValueError,
      'accumulator_dtype',
      f'{dtype}, whose sums overflow '
      '(float16 ends at 65504) or are not supported',
      f'Give None (float32), jnp.bfloat16 or "{KAHAN_BFLOAT16}".',
    )
  return jax.dtypes.canonicalize_dtype(dtype)


def skip_fn(value) -> None:
  if value is not None and not callable(value):
    fail(
      TypeError,
      'should_skip_update_fn',
      f'{value!r}, not callable',
      'Give None or a function such as optax.skip_not_finite.',
    )


def axis_name(value) -> Union[tuple[str, ...], None]:
  """``axis_name`` as a tuple of names, or None."""
  if value is None:
    return None
  names = (value,) if isinstance(value, str) else value
  if not (
    isinstance(names, tuple)
    and names
    and all(isinstance(n, str) and n for n in names)
  ):
    fail(
      TypeError,
      'axis_name',
      f'{value!r}',
      'Give a mesh axis name (str) or a tuple of them, as in jax.lax.psum.',
    )
  return names


def transformation(value, argument: str) -> None:
  if not isinstance(value, optax.GradientTransformation):
    hint = 'If it is a factory such as optax.adamw, call it.'
    if hasattr(value, 'gradient_transformation'):
      hint = 'For optax.MultiSteps(opt, k), write accumulate(k, opt).'
    fail(
      TypeError,
      argument,
      f'{value!r} of type {type(value).__name__}, '
      'not an optax.GradientTransformation',
      hint,
    )


# ------------------------------------------------------------------------ init


def param_dtype(path, dtype, acc_dtype) -> None:
  """A param leaf is floating, and complex where its accumulator is."""
  if not jnp.issubdtype(dtype, jnp.inexact):
    fail(
      TypeError,
      'params',
      f'the leaf at {leaf_name(path)} has dtype {dtype}, which has no gradient',
      'Filter integer and boolean '
      'leaves out of the params (optax.masked, nnx.Param).',
    )
  if jnp.issubdtype(dtype, jnp.complexfloating) != jnp.issubdtype(
    acc_dtype, jnp.complexfloating
  ):
    fail(
      TypeError,
      'accumulator_dtype',
      f'{acc_dtype} for the {dtype} '
      f'param at {leaf_name(path)}: a real sum drops the imaginary part',
      'Leave accumulator_dtype=None, or give a matching dtype.',
    )


def skip_result(result) -> Any:
  """``should_skip_update_fn``'s ``(skip, skip_state)``, checked at init."""
  if not (isinstance(result, tuple) and len(result) == 2) or (
    jnp.shape(result[0]) != () or jnp.result_type(result[0]) != jnp.bool_
  ):
    fail(
      ValueError,
      'should_skip_update_fn',
      f'it returned {result!r}',
      'Return (skip, skip_state) with skip a bool scalar, as '
      'optax.skip_not_finite does.',
    )
  return result
