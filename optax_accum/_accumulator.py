"""The accumulator: its dtypes, how a micro-batch is added, how the sum is
read."""

import jax
import jax.numpy as jnp

from optax_accum import _checks
from optax_accum import _layout


def default_dtype(param_dtype) -> jnp.dtype:
  """float32 (complex64), or the param dtype when it is wider."""
  param_dtype = jnp.dtype(param_dtype)
  complex_ = jnp.issubdtype(param_dtype, jnp.complexfloating)
  floor = jnp.dtype(jnp.complex64 if complex_ else jnp.float32)
  if param_dtype.itemsize >= floor.itemsize:
    return jax.dtypes.canonicalize_dtype(param_dtype)
  return floor


def promote(*dtypes) -> jnp.dtype:
  """JAX's standard promotion of ``dtypes``, whatever the user's promotion
  mode: our dtypes are decided here, and every operand cast to them."""
  with jax.numpy_dtype_promotion('standard'):
    return jnp.dtype(jnp.result_type(*dtypes))


def init(params, accumulator_dtype, names):
  """``(acc_grads, weight_dtype)``: zeros like the params (unreduced over
  ``names``) and the widest real accumulator dtype (float32 at least):
  weights' and the mean's."""

  def zeros(path, p):
    dtype = jnp.result_type(p)
    if accumulator_dtype is None:
      inexact = jnp.issubdtype(dtype, jnp.inexact)
      acc_dtype = default_dtype(dtype) if inexact else dtype
    else:
      acc_dtype = jnp.dtype(accumulator_dtype)
    _checks.param_dtype(path, dtype, acc_dtype)
    if names is not None:
      return _layout.unreduced_zeros(path, p, acc_dtype, names)
    return jnp.zeros_like(p, dtype=acc_dtype)  # keeps the param's sharding

  acc_grads = jax.tree.map_with_path(zeros, params)
  real = [jnp.finfo(a.dtype).dtype for a in jax.tree.leaves(acc_grads)]
  return acc_grads, promote(jnp.float32, *real)


def add(state, grads, weight, value, fresh, layout):
  """``(acc_grads, acc_weight, acc_value, acc_value_weight)`` with ``weight
  * grads`` added; overwritten where ``fresh`` (in the same pass, never
  zeroed apart). Weight 0 adds nothing, even a NaN gradient."""
  wdtype = state.acc_weight.dtype
  w = jnp.ones([], wdtype) if weight is None else weight.astype(wdtype)

  def one(acc, g):
    term = g.astype(acc.dtype)
    if weight is not None:
      term = term * layout.scale(w).astype(acc.dtype)
      term = jnp.where(w > 0, term, jnp.zeros_like(term))
    term = layout.term(term)
    return jnp.where(fresh, term, acc + term)

  acc_grads = jax.tree.map(one, state.acc_grads, grads)
  # The scalar sums start over with the window too (0 after a window ends
  # anyway; a restored state of another version may hold more).
  w_term = layout.scalar(w)
  acc_weight = jnp.where(fresh, w_term, state.acc_weight + w_term)
  restart = lambda x: jnp.where(fresh, jnp.zeros_like(x), x)
  sums = (state.acc_value, state.acc_value_weight)
  acc_value, value_weight = map(restart, sums)
  if value is not None:  # value_weight sums w_term as acc_weight does, so
    vdtype = acc_value.dtype  # the two are equal where all gave a value
    term = w.astype(vdtype) * value.astype(vdtype)
    term = jnp.where(w > 0, term, jnp.zeros([], vdtype))
    acc_value = acc_value + layout.scalar(term)
    value_weight = value_weight + w_term
  return acc_grads, acc_weight, acc_value, value_weight


def mean(acc_sum, total_weight, like):
  """``acc_sum / total_weight`` as a multiply (XLA fuses it into each
  consumer; a divide it writes to a temporary), cast like ``like``."""

  def one(a, g):
    wide = promote(a.dtype, total_weight.dtype)
    inverse = (1 / total_weight).astype(wide)
    return (a.astype(wide) * inverse).astype(jnp.result_type(g))

  return jax.tree.map(one, acc_sum, like)


def sq_norm(tree, complete=lambda x: x) -> jax.Array:
  """The squared global L2 norm; ``complete`` sums squares over shards."""
  leaves = [jnp.abs(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  dtype = promote(jnp.float32, *(x.dtype for x in leaves))
  squares = [complete(jnp.sum(jnp.square(x.astype(dtype)))) for x in leaves]
  return sum(squares[1:], squares[0])
