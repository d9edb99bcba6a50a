"""The checks of construction and init (each call's: ``_call_checks``),
where a mistake would give a wrong number or an error that does not say
what to write; traced values never raise (a bad traced weight: NaN)."""

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
DEFERRAL_JAX = (0, 10, 0)  # the deferred reduction's floor
ScheduleLike = Union[int, jax.Array, Callable[[jax.Array], Any]]

# ---------------------------------------------------------------- construction


def window_k(value) -> jax.Array:
  """A schedule value as an int32 k in [1, 2**31 - 1]: rounded; below 1
  and NaN mean 1."""
  if isinstance(value, (np.ndarray, np.generic)) and not np.ndim(value):
    value = value.item()  # numpy as a Python number (whole, any size)
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


def real_dtype(dtype) -> bool:
  kinds = (jnp.integer, jnp.floating)
  return any(jnp.issubdtype(dtype, kind) for kind in kinds)


def _probe(k, gradient_step):
  """``k(gradient_step)`` as an array (a Python int of any size as 0)."""
  try:  # jit traces it: Python branching on gradient_step cannot run
    out = k(gradient_step)
  except TypeError as e:  # (JAX's tracer errors are TypeErrors)
    raised = f'{k!r} raised on a traced gradient_step (jnp.where, not if)'
    fail(TypeError, 'every_k_schedule', f'{raised}: {e}', e)
  try:
    return jnp.asarray(0 if isinstance(out, int) else out)
  except (TypeError, ValueError) as e:
    fail(TypeError, 'every_k_schedule', f'it returned {out!r}, not k', e)


def schedule(every_k_schedule: ScheduleLike) -> Callable[[jax.Array], Any]:
  """``every_k_schedule`` as a ``gradient_step -> int32 k`` function."""
  k, name = every_k_schedule, 'every_k_schedule'
  if isinstance(k, (jax.Array, np.ndarray, np.generic)):
    # optax.inject_hyperparams passes an int hyperparameter as an array.
    if jnp.shape(k) or not jnp.issubdtype(jnp.result_type(k), jnp.integer):
      fail(TypeError, name, f'{jax.typeof(k)}; give an integer scalar')
    if not isinstance(k, Tracer):
      return schedule(int(np.asarray(k)))
    return lambda gradient_step: window_k(k)
  if callable(k):
    out = jax.eval_shape(lambda s: _probe(k, s), jnp.zeros([], jnp.int32))
    if out.shape or not real_dtype(out.dtype):
      fail(ValueError, name, f'it returned {out}; return a real scalar k')
    return lambda gradient_step: window_k(k(gradient_step))
  if not isinstance(k, numbers.Integral) or isinstance(k, bool):
    fail(TypeError, name, f'{k!r}; give a positive int or gradient_step -> k')
  if not 1 <= int(k) <= INT32_MAX:
    fail(ValueError, name, f'{k!r}, outside [1, 2**31 - 1]')
  return lambda gradient_step: jnp.asarray(int(k), jnp.int32)


def transformation(value, argument: str) -> None:
  """An ``optax.GradientTransformation`` (a factory or MultiSteps named)."""
  if not isinstance(value, optax.GradientTransformation):
    hint = 'call the factory (optax.adamw(1e-3))'
    if hasattr(value, 'gradient_transformation'):
      hint = 'for optax.MultiSteps(opt, k), write accumulate(k, opt)'
    fail(TypeError, argument, f'{value!r}, not a transformation; {hint}')


def inner(value, is_accumulator: Callable[[Any], bool]) -> None:
  """``inner`` is None or a transformation that does not accumulate."""
  if value is not None:
    transformation(value, 'inner')
  if value is not None and is_accumulator(value):
    fail(ValueError, 'inner', 'an accumulator; write accumulate(k1 * k2, opt)')


def accumulator_dtype(value):
  """None or a float32/float64/bfloat16/complex dtype."""
  if value is None:
    return value
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  allowed = ('float32', 'float64', 'bfloat16', 'complex64', 'complex128')
  if dtype is None or dtype.name not in allowed:  # float16 ends at 65504
    floating = dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
    error, names = ValueError if floating else TypeError, ', '.join(allowed)
    fail(error, 'accumulator_dtype', f'{value!r}; give None or {names}')
  return jax.dtypes.canonicalize_dtype(dtype)


def skip_fn(value) -> None:
  if value is not None and not callable(value):
    fail(TypeError, 'should_skip_update_fn', f'{value!r}, not callable')


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
    fail(TypeError, 'axis_name', f'{value!r}; give a mesh axis name or tuple')
  if jax.__version_info__ < DEFERRAL_JAX:  # unreduced types, jax.reshard
    fail(RuntimeError, 'axis_name', f'needs jax>=0.10.0, not {jax.__version__}')
  return names


def flag(value, argument: str) -> bool:
  """A bool, numpy bool or concrete bool scalar array (inject_hyperparams
  passes arrays) as a Python bool."""
  concrete = not isinstance(value, Tracer) and jnp.shape(value) == ()
  if isinstance(value, (jax.Array, np.ndarray, np.bool_)) and concrete:
    value = bool(value) if jnp.result_type(value) == jnp.bool_ else value
  if not isinstance(value, bool):
    fail(TypeError, argument, f'{value!r}, not a bool')
  return value


def noise_scale(track, decay) -> bool:
  """``track_noise_scale`` as a bool; ``noise_scale_decay`` checked."""
  track = flag(track, 'track_noise_scale')
  try:
    ok = isinstance(decay, Tracer) or 0 <= float(decay) < 1  # a scalar
  except (TypeError, ValueError):
    ok = False
  if not ok or isinstance(decay, (str, bool)):
    fail(ValueError, 'noise_scale_decay', f'{decay!r}, not in [0, 1)')
  return track


# ------------------------------------------------------------------------ init


def param_dtype(path, dtype, acc_dtype) -> None:
  """A param leaf is floating, and complex where its accumulator is."""
  where = f'the param at {leaf_name(path)}'
  if not jnp.issubdtype(dtype, jnp.inexact):
    fail(TypeError, 'params', f'{where} is {dtype}; filter it out')
  complex_ = lambda d: jnp.issubdtype(d, jnp.complexfloating)
  if complex_(dtype) != complex_(acc_dtype):
    fail(TypeError, 'accumulator_dtype', f'{acc_dtype} for {dtype} at {where}')


def skip_result(result) -> Any:
  """``should_skip_update_fn``'s ``(skip, skip_state)``, checked at init."""
  if not (isinstance(result, tuple) and len(result) == 2) or (
    jnp.shape(result[0]) != () or jnp.result_type(result[0]) != jnp.bool_
  ):
    want = 'not (skip, skip_state) with a bool skip'
    fail(ValueError, 'should_skip_update_fn', f'it returned {result!r}, {want}')
  return result
