"""Accumulator dtypes: which dtype each `acc_grads` leaf gets."""

from typing import Optional

import jax
import jax.numpy as jnp


def canonical_accumulator_dtype(
    accumulator_dtype: Optional[jax.typing.DTypeLike],
) -> Optional[jnp.dtype]:
  """Checks `accumulator_dtype` and returns it as a canonical float dtype.

  `None` stays `None` (the per-leaf default). float64 becomes float32 when
  `jax_enable_x64` is off, as everywhere in JAX.

  Raises:
    TypeError: `accumulator_dtype` is not a floating dtype.
  """
  if accumulator_dtype is None:
    return None
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError as e:
    raise TypeError(
        '`accumulator_dtype` must be a floating dtype such as jnp.float32, but '
        f'got {accumulator_dtype!r}.'
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        '`accumulator_dtype` must be a floating dtype such as jnp.float32, but '
        f'got {accumulator_dtype!r}. This is because gradients are summed in it.'
    )
  return jax.dtypes.canonicalize_dtype(dtype)


def default_accumulator_dtype(param_dtype: jnp.dtype) -> jnp.dtype:
  """float32, or the param dtype when it is wider (float64 under x64)."""
  param_dtype = jnp.dtype(param_dtype)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    floor = jnp.dtype(jnp.complex64)
  else:
    floor = jnp.dtype(jnp.float32)
  if param_dtype.itemsize >= floor.itemsize:
    return jax.dtypes.canonicalize_dtype(param_dtype)
  return floor


def accumulator_zeros(params, accumulator_dtype: Optional[jnp.dtype]):
  """Zeros shaped like `params`, one accumulator leaf per param leaf.

  Raises:
    TypeError: a param leaf is not a floating (or complex) array.
  """

  def zeros(path, p):
    dtype = jnp.result_type(p)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f'The param at {jax.tree_util.keystr(path)} has dtype {dtype}; '
          'accumulate only takes floating-point params, because integer and '
          'boolean leaves have no gradient to accumulate. Filter them out of '
          'the params (for example with optax.masked or nnx.Param).'
      )
    dtype = accumulator_dtype or default_accumulator_dtype(dtype)
    return jnp.zeros(jnp.shape(p), dtype)

  return jax.tree.map_with_path(zeros, params)
