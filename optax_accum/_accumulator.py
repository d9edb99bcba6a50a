"""The accumulator: its dtypes, how a gradient is added, how the sum is read.

Plain mode keeps one array per param, ``acc_grads``. The compensated mode
``"kahan_bfloat16"`` keeps a bfloat16 sum and a bfloat16 error term
(``acc_compensation``) and adds with Kahan's algorithm (Kahan 1965,
"Further remarks on reducing truncation errors", CACM 8(1)): the rounding
error of each bfloat16 store is carried into the next addition.
"""

from typing import Union

import jax
import jax.numpy as jnp

from optax_accum import _validate

KAHAN_BFLOAT16 = "kahan_bfloat16"

AccumulatorDtype = Union[None, str, jax.typing.DTypeLike]


def canonical_accumulator_dtype(accumulator_dtype: AccumulatorDtype):
  """Checks `accumulator_dtype`; returns None, "kahan_bfloat16" or a dtype.

  `None` stays `None` (the per-leaf default). float64 becomes float32 when
  `jax_enable_x64` is off, as everywhere in JAX.

  Raises:
    TypeError: `accumulator_dtype` is not a floating dtype nor
      "kahan_bfloat16".
    ValueError: `accumulator_dtype` is float16, a float8 or another
      floating dtype that is not float32, float64, bfloat16 or complex.
  """
  if accumulator_dtype is None or accumulator_dtype == KAHAN_BFLOAT16:
    return accumulator_dtype
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError as e:
    raise TypeError(
      '`accumulator_dtype` must be a floating dtype such as jnp.float32 or '
      f'"{KAHAN_BFLOAT16}", but got {accumulator_dtype!r}.'
    ) from e
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      '`accumulator_dtype` must be a floating dtype such as jnp.float32 or '
      f'"{KAHAN_BFLOAT16}", but got {accumulator_dtype!r}. This is because '
      'gradients are summed in it.'
    )
  supported = (
    jnp.float32,
    jnp.float64,
    jnp.bfloat16,
    jnp.complex64,
    jnp.complex128,
    jnp.float16,
  )
  if dtype not in [jnp.dtype(d) for d in supported]:
    raise ValueError(
      f'`accumulator_dtype` {dtype} is not supported: use None (float32, '
      'the default), jnp.float32, jnp.float64, jnp.bfloat16, '
      f'"{KAHAN_BFLOAT16}", or jnp.complex64/complex128 for complex params.'
    )
  if dtype == jnp.float16:
    raise ValueError(
      '`accumulator_dtype` float16 is not supported: its largest value is '
      '65504, so a sum of micro-batch gradients overflows to inf long '
      'before their mean would. Use None (float32, the default), '
      f'jnp.bfloat16 or "{KAHAN_BFLOAT16}" for a 2-byte sum.'
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


def init(params, accumulator_dtype):
  """Returns `(acc_grads, acc_compensation)` zeros shaped like `params`.

  `acc_compensation` is None except in the "kahan_bfloat16" mode.

  Raises:
    TypeError: a param leaf is not a floating (or complex) array, or a
      complex param meets a real accumulator dtype (or the reverse).
  """

  def zeros(path, p):
    dtype = jnp.result_type(p)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f'The param at {_validate.leaf_name(path)} has dtype {dtype}; '
        'accumulate only takes floating-point params, because integer and '
        'boolean leaves have no gradient to accumulate. Filter them out of '
        'the params (for example with optax.masked or nnx.Param).'
      )
    complex_param = jnp.issubdtype(dtype, jnp.complexfloating)
    if accumulator_dtype == KAHAN_BFLOAT16:
      acc_dtype = jnp.dtype(jnp.bfloat16)
    elif accumulator_dtype is None:
      acc_dtype = default_accumulator_dtype(dtype)
    else:
      acc_dtype = jnp.dtype(accumulator_dtype)
    if complex_param != jnp.issubdtype(acc_dtype, jnp.complexfloating):
      raise TypeError(
        f'The param at {_validate.leaf_name(path)} has dtype {dtype} but '
        f'`accumulator_dtype` is {accumulator_dtype!r}: a real accumulator '
        'drops the imaginary part of a complex gradient, and a complex one '
        'is wasted on a real gradient. Leave accumulator_dtype=None (a '
        'complex64 or wider sum for complex params) or give a matching '
        'dtype.'
      )
    return jnp.zeros_like(p, dtype=acc_dtype)  # keeps the param's sharding

  acc_grads = jax.tree.map_with_path(zeros, params)
  if accumulator_dtype == KAHAN_BFLOAT16:
    return acc_grads, jax.tree.map(jnp.zeros_like, acc_grads)
  return acc_grads, None


def add(acc_grads, acc_compensation, updates, weight, accept, fresh):
  """Adds `weight * updates` where `accept`; starts over where `fresh`.

  Args:
    acc_grads: the running sums (a pytree).
    acc_compensation: None, or the Kahan error terms shaped like acc_grads.
    updates: the micro-batch gradient, shaped like acc_grads.
    weight: None (1) or a float32 scalar; where it is 0 the micro-batch adds
      exact zeros whatever its gradient holds.
    accept: bool scalar; false leaves the accumulator as it is.
    fresh: bool scalar; true means the window is empty and the old sums are
      dropped (overwritten in the same pass, never zeroed separately; with
      zeros when the micro-batch is rejected).

  Returns:
    `(acc_grads, acc_compensation)`.
  """

  def weighted(g, dtype):
    g = g.astype(dtype)
    if weight is None:
      return g
    # A weight-0 micro-batch contributes nothing, even a NaN gradient.
    return jnp.where(weight > 0, g * weight.astype(dtype), jnp.zeros([], dtype))

  if acc_compensation is None:

    def plain(acc, g):
      g = weighted(g, acc.dtype)
      zero = jnp.zeros([], acc.dtype)
      return jnp.where(
        fresh, jnp.where(accept, g, zero), jnp.where(accept, acc + g, acc)
      )

    return jax.tree.map(plain, acc_grads, updates), None

  def kahan(acc, comp, g):
    # The arithmetic runs in float32 registers; only the stores are bf16.
    s = jnp.where(fresh, 0.0, acc.astype(jnp.float32))
    c = jnp.where(fresh, 0.0, comp.astype(jnp.float32))
    y = weighted(g, jnp.float32) - c
    t = (s + y).astype(acc.dtype)
    new_comp = ((t.astype(jnp.float32) - s) - y).astype(comp.dtype)
    # Rejected: keep the sums, or drop them when the window is empty.
    return (
      jnp.where(accept, t, s.astype(acc.dtype)),
      jnp.where(accept, new_comp, c.astype(comp.dtype)),
    )

  treedef = jax.tree.structure(acc_grads)
  pairs = [
    kahan(a, c, g)
    for a, c, g in zip(
      treedef.flatten_up_to(acc_grads),
      treedef.flatten_up_to(acc_compensation),
      treedef.flatten_up_to(updates),
    )
  ]
  return (
    treedef.unflatten([p[0] for p in pairs]),
    treedef.unflatten([p[1] for p in pairs]),
  )


def total(acc_grads, acc_compensation):
  """The accumulated sum, compensated in the Kahan mode (float32 there)."""
  if acc_compensation is None:
    return acc_grads
  return jax.tree.map(
    lambda s, c: s.astype(jnp.float32) - c.astype(jnp.float32),
    acc_grads,
    acc_compensation,
  )


def add_unreduced(acc_grads, updates, weight, fresh, deferral):
  """`add` for an accumulator typed unreduced (see `_deferral`).

  Every micro-batch is accepted (rejection is per window there); the
  weighted gradient becomes this device's partial sum and is added with the
  linear operations an unreduced array allows.
  """

  def one(acc, g):
    g = g.astype(acc.dtype)
    if weight is not None:
      w = deferral.reduced_scale(weight).astype(acc.dtype)
      g = jnp.where(weight > 0, g * w, jnp.zeros_like(g))
    g = deferral.contribution(g)
    return jnp.where(fresh, g, acc + g)

  return jax.tree.map(one, acc_grads, updates)
