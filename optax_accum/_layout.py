"""The parallel layout of an accumulator, decided once per trace by
:func:`of`: where its sums live and how the window's one reduction runs.

No ``axis_name`` (:class:`Layout`): every method is an identity. With it,
each device adds into its own sum and the sums meet once per window (DDP's
``no_sync``, MaxText #5099): :class:`Checked` in ``jax.shard_map``
(``lax.psum``), :class:`Mesh` under plain ``jax.jit`` (``jax.reshard``),
:class:`Unchecked` in ``shard_map(check_vma=False)`` or ``pmap`` (a state
stacked by the caller), :class:`Single` for axes of one device.

The state's layout, and why: ``init`` under ``jax.set_mesh`` types the
sums *unreduced* over ``axis_name`` (JAX's type for per-device parts of a
sum), the rest replicated; not per-device sums on a leading axis, because
then GSPMD's partial sums enter the state under plain ``jit`` with no copy
and no second layout of the params, and JAX refuses mixing it up with a
reduced state. Tools that read whole states (numpy, ``device_put``,
orbax) take :func:`optax_accum.reduced_state`, one call; and
:func:`optax_accum.unreduced_state` (or ``restore_checkpoint``) turns it back.
"""

import math
from typing import Optional

import jax
from jax import lax
from jax.core import Tracer
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_accum import _call_checks
from optax_accum._call_checks import spec_of
from optax_accum._call_checks import varying_axes
from optax_accum._errors import fail
from optax_accum._errors import leaf_name


def entry_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one entry of a PartitionSpec."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def spec_axes(spec: P) -> set[str]:
  return {a for entry in spec for a in entry_axes(entry)}


def axes_size(names) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[n] for n in names)


def vary(x, axes):
  """``x`` cast to varying over those of ``axes`` it does not vary over."""
  missing = tuple(a for a in sorted(axes) if a not in varying_axes(x))
  return lax.pcast(x, missing, to='varying') if missing else x


def reduced(x):
  """``x`` resharded without its unreduced axes (their one reduction)."""
  spec = spec_of(x)
  unreduced = spec.update(unreduced=frozenset())
  return jax.reshard(x, unreduced) if spec.unreduced else x


class Layout:
  """No ``axis_name``: every method is an identity."""

  names: tuple[str, ...] = ()
  own_weight = True  # each device's weight is its own (False: global)

  check = staticmethod(_call_checks.no_axis_call)

  def cond(self, pred, true_fn, false_fn, *operands):
    """``lax.cond`` (eager: the branch as Python). Where the operands vary
    (in ``jax.shard_map``, a per-device state: init on varying params), each
    output varies over the axes either branch's does."""
    if not isinstance(pred, Tracer):
      return (true_fn if bool(pred) else false_fn)(*operands)
    leaves = jax.tree.leaves(operands)
    if not self.names and any(map(varying_axes, leaves)):
      outs = [jax.eval_shape(f, *operands) for f in (true_fn, false_fn)]
      axes = jax.tree.map(lambda a, b: varying_axes(a) | varying_axes(b), *outs)
      agree = lambda f: lambda *o: jax.tree.map(vary, f(*o), axes)
      true_fn, false_fn = agree(true_fn), agree(false_fn)
    return lax.cond(pred, true_fn, false_fn, *operands)

  def arrive(self, tree):
    """A micro-batch's values as this layout adds them."""
    return tree

  def term(self, x):
    """A per-device term, typed to add into this device's part of a sum."""
    return x

  def scalar(self, x):
    """A weight (or weight x value) term for a scalar sum."""
    return self.term(x)

  def scale(self, w):
    """A replicated scalar typed to multiply a per-device part."""
    return w

  def reduce(self, tree):
    """The window's one reduction: per-device parts to their total."""
    return tree

  def complete(self, x):
    """A per-device scalar (a norm's squares) summed over the shards."""
    return x

  def agree(self, tree):
    """Each leaf made the same on every device (a skip verdict)."""
    return tree

  def reduced_like(self, g):
    """``g`` typed as the reduced sum of such values (for shapes)."""
    return g

  def zeros(self, shape, g):
    """Zeros of ``shape`` typed like the update emitted for ``g``."""
    if jnp.shape(g) == shape.shape:
      return jnp.zeros_like(g, dtype=shape.dtype)
    return jnp.zeros(shape.shape, shape.dtype)


class _Axes(Layout):
  def __init__(self, names):
    self.names = names

  def check(self, state, grads, weight, flush, value) -> None:
    pass  # JAX types no per-device values here (Single, Unchecked)


class Single(_Axes):
  """Axes of one device: reduced on arrival (no communication)."""

  def arrive(self, tree):
    def one(x):
      if x is not None and varying_axes(x) & set(self.names):
        return lax.psum(x, self.names)
      return x if x is None else reduced(x)

    return jax.tree.map(one, tree)


class Unchecked(_Axes):
  """``shard_map(check_vma=False)`` or ``pmap``: a stacked state."""

  def arrive(self, tree):
    grads, weight, flush, value = tree
    if flush is not None:  # one device flushing ends the window on all
      flush = lax.pmax(flush.astype(jnp.int32), self.names) > 0
    return grads, weight, flush, value

  def reduce(self, tree):
    return lax.psum(tree, self.names)


class Checked(_Axes):
  """``shard_map(check_vma=True)``: varying gradients, unreduced sums."""

  def check(self, state, grads, weight, flush, value) -> None:
    _call_checks.unreduced_state(self.names, state.acc_grads, state.acc_weight)
    scalars = {'weight': weight, 'value': value, 'flush': flush}
    _call_checks.checked_call(self.names, grads, state.acc_grads, scalars)

  def term(self, x):
    return lax.pcast(vary(x, self.names), self.names, to='unreduced')

  def reduce(self, tree):
    return lax.psum(tree, self.names)

  def complete(self, x):
    axes = tuple(sorted(varying_axes(x)))
    return lax.psum(x, axes) if axes else x

  def agree(self, tree):
    def one(x):
      axes = tuple(sorted(varying_axes(x)))
      if not axes:
        return x
      wide = jnp.int32 if jnp.result_type(x) == jnp.bool_ else x.dtype
      return lax.pmax(jnp.asarray(x, wide), axes).astype(x.dtype)

    return jax.tree.map(one, tree)

  def reduced_like(self, g):
    return lax.psum(g, self.names)

  def zeros(self, shape, g):  # invariant, as the reduced mean's update
    return jnp.zeros(shape.shape, shape.dtype)


class Mesh(_Axes):
  """Plain ``jax.jit`` on a mesh: unreduced gradients, global scalars."""

  def check(self, state, grads, weight, flush, value) -> None:
    _call_checks.unreduced_state(self.names, state.acc_grads, state.acc_weight)
    _call_checks.mesh_call(self.names, grads, value)

  own_weight = False

  def scalar(self, x):  # a global scalar, held as one unreduced part
    return jax.reshard(x, P(unreduced=frozenset(self.names)))

  def scale(self, w):
    return jax.reshard(w, P(reduced=frozenset(self.names)))

  def reduce(self, tree):
    return jax.tree.map(reduced, tree)

  def reduced_like(self, g):
    return reduced(g)

  def zeros(self, shape, g):
    spec = spec_of(g).update(unreduced=frozenset())
    like = jnp.shape(g) == shape.shape  # sharded as the emitted update
    out_sharding = spec if like else None
    return jnp.zeros(shape.shape, shape.dtype, out_sharding=out_sharding)


def of(axis_names: Optional[tuple[str, ...]]) -> Layout:
  """The layout of an ``update`` with these axes where it runs now."""
  if axis_names is None:
    return Layout()
  mesh = jax.sharding.get_abstract_mesh()
  manual = [n in mesh.manual_axes for n in axis_names]
  if any(manual) and not all(manual):
    mapped = sorted(mesh.manual_axes)
    fail(ValueError, 'axis_name', f'{axis_names}; shard_map maps {mapped}')
  if any(manual):  # shard_map: typed per device where check_vma is on
    if not all(n in varying_axes(lax.axis_index(n)) for n in axis_names):
      return Unchecked(axis_names)
    one = axes_size(axis_names) == 1
    return Single(axis_names) if one else Checked(axis_names)
  if not mesh.empty and all(n in mesh.axis_names for n in axis_names):
    auto = [n for n in axis_names if n not in mesh.explicit_axes]
    if auto:
      fail(ValueError, 'axis_name', f'{auto} are Auto axes; make them Explicit')
    one = axes_size(axis_names) == 1
    return Single(axis_names) if one else Mesh(axis_names)
  try:  # jax.pmap's axes are not in the abstract mesh
    for n in axis_names:
      lax.axis_index(n)
  except NameError:
    fail(NameError, 'axis_name', f'{axis_names}: no such axis (set_mesh?)')
  return Unchecked(axis_names)


def init_names(axis_names) -> Optional[tuple[str, ...]]:
  """The Explicit axes of >1 device ``init`` types the sums unreduced on."""
  mesh = jax.sharding.get_abstract_mesh()
  out = lambda n: n in mesh.manual_axes or n not in mesh.explicit_axes
  if axis_names is None or mesh.empty or any(map(out, axis_names)):
    return None
  return axis_names if axes_size(axis_names) > 1 else None


def unreduced_zeros(path, p, dtype, names):
  """Zeros shaped and partitioned like ``p``, unreduced over ``names``."""
  spec = spec_of(p)
  if spec_axes(spec) & set(names):
    fail(ValueError, 'axis_name', f'{names} shards {leaf_name(path)} (FSDP)')
  spec = spec.update(unreduced=frozenset(names))
  return jnp.zeros(jnp.shape(p), dtype, out_sharding=spec)


def scalar_zeros(dtype, names):
  if names is None:
    return jnp.zeros([], dtype)
  return jnp.zeros([], dtype, out_sharding=P(unreduced=frozenset(names)))
