"""The accumulator: its dtypes, how a micro-batch is added, how the sum is
read. ``"kahan_bfloat16"`` keeps a bfloat16 sum and error term
(``acc_compensation``) and adds with Kahan's algorithm (CACM 8(1), 1965)."""

import jax
import jax.numpy as jnp

from optax_accum import _checks
from optax_accum import _layout
from optax_accum._errors import fail


def default_dtype(param_dtype) -> jnp.dtype:
  """float32 (complex64), or the param dtype when it is wider."""
  param_dtype = jnp.dtype(param_dtype)
  floor = jnp.dtype(
    jnp.complex64
    if jnp.issubdtype(param_dtype, jnp.complexfloating)
    else jnp.float32
  )
  if param_dtype.itemsize >= floor.itemsize:
    return jax.dtypes.canonicalize_dtype(param_dtype)
  return floor


def promote(*dtypes) -> jnp.dtype:
  """JAX's standard promotion of ``dtypes``, whatever the user's promotion
  mode: our dtypes are decided here, and every operand cast to them."""
  with jax.numpy_dtype_promotion('standard'):
    return jnp.dtype(jnp.result_type(*dtypes))


def init(params, accumulator_dtype, names):
  """``(acc_grads, acc_compensation, weight_dtype)``: zeros like the params
  (unreduced over ``names``), Kahan's terms or None, and the widest real
  accumulator dtype (float32 at least): weights' and the mean's."""
  kahan = accumulator_dtype == _checks.KAHAN_BFLOAT16
  if kahan and names is not None:
    fail(ValueError, 'accumulator_dtype', 'kahan_bfloat16 with an axis_name')

  def zeros(path, p):
    dtype = jnp.result_type(p)
    if kahan:
      acc_dtype = jnp.dtype(jnp.bfloat16)
    elif accumulator_dtype is None:
      acc_dtype = (
        default_dtype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else dtype
      )
    else:
      acc_dtype = jnp.dtype(accumulator_dtype)
    _checks.param_dtype(path, dtype, acc_dtype)
    if names is not None:
      return _layout.unreduced_zeros(path, p, acc_dtype, names)
    return jnp.zeros_like(p, dtype=acc_dtype)  # keeps the param's sharding

  acc_grads = jax.tree.map_with_path(zeros, params)
  real = [jnp.finfo(a.dtype).dtype for a in jax.tree.leaves(acc_grads)]
  weight_dtype = promote(jnp.float32, *real)
  compensation = jax.tree.map(jnp.zeros_like, acc_grads) if kahan else None
  return acc_grads, compensation, weight_dtype


def add(state, grads, weight, value, fresh, layout):
  """``(acc_grads, acc_compensation, acc_weight, acc_value)`` with ``weight
  * grads`` added; overwritten where ``fresh`` (in the same pass, never
  zeroed apart). Weight 0 adds nothing, even a NaN gradient."""
  wdtype = state.acc_weight.dtype
  w = jnp.ones([], wdtype) if weight is None else weight.astype(wdtype)

  def weighted(g, dtype):
    g = g.astype(dtype)
    if weight is None:
      return g
    scaled = g * layout.scale(w).astype(dtype)
    return jnp.where(w > 0, scaled, jnp.zeros_like(scaled))

  def plain(acc, g):
    term = layout.term(weighted(g, acc.dtype))
    return jnp.where(fresh, term, acc + term)

  if state.acc_compensation is None:
    acc_grads = jax.tree.map(plain, state.acc_grads, grads)
    compensation = None
  else:
    acc_grads, compensation = _kahan_add(state, grads, weighted, fresh)
  # The scalar sums start over with the window too (0 after a window ends
  # anyway; a restored state of another version may hold more).
  fresh_sum = lambda acc, x: jnp.where(fresh, x, acc + x)
  acc_weight = fresh_sum(state.acc_weight, layout.scalar(w))
  acc_value = jnp.where(fresh, jnp.zeros_like(state.acc_value), state.acc_value)
  if value is not None:
    vdtype = acc_value.dtype
    term = jnp.where(
      w > 0, w.astype(vdtype) * value.astype(vdtype), jnp.zeros([], vdtype)
    )
    acc_value = acc_value + layout.scalar(term)
  return acc_grads, compensation, acc_weight, acc_value


def _kahan_add(state, grads, weighted, fresh):
  def one(acc, comp, g):  # float32 arithmetic, bfloat16 stores
    s = jnp.where(fresh, 0.0, acc.astype(jnp.float32))
    c = jnp.where(fresh, 0.0, comp.astype(jnp.float32))
    y = weighted(g, jnp.float32) - c
    t = (s + y).astype(acc.dtype)
    return t, ((t.astype(jnp.float32) - s) - y).astype(comp.dtype)

  treedef = jax.tree.structure(state.acc_grads)
  pairs = [
    one(a, c, g)
    for a, c, g in zip(
      treedef.flatten_up_to(state.acc_grads),
      treedef.flatten_up_to(state.acc_compensation),
      treedef.flatten_up_to(grads),
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


def norm(tree, complete) -> jax.Array:
  """The global L2 norm, float32."""
  return jnp.sqrt(sq_norm(tree, complete)).astype(jnp.float32)
