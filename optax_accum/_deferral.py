"""Deferred reduction over ``axis_name``: the accumulator's layout and the
window's one reduction, in each of the places JAX runs SPMD code.

With ``axis_name``, every device adds its own gradient to its own
accumulator and the sums meet in one reduction when the window ends (the
pattern of PyTorch's ``no_sync`` and MaxText's ``unreduced`` gradient
accumulation, MaxText PR #5099). JAX 0.10 gives the per-device sums a type:
an array *unreduced* over an axis holds, on each device, a partial sum whose
logical value is the sum over the axis. The mode is chosen at trace time
from where ``update`` runs:

- ``CHECKED``: inside ``jax.shard_map`` with ``check_vma=True`` (JAX's
  default) over a mesh whose ``axis_name`` axes are Explicit. Gradients
  arrive *varying* (each device's own; the params were ``pcast`` to
  varying). ``acc_grads``, ``acc_weight`` and ``acc_value`` are unreduced;
  the counters and ``inner_opt_state`` are invariant (the same on every
  device); ``lax.psum`` in the emitting branch is the reduction.
- ``MESH``: plain ``jax.jit`` under ``jax.set_mesh`` with Explicit axes.
  Gradients arrive as global arrays typed unreduced over ``axis_name`` (from
  :func:`optax_accum.unreduced_value_and_grad`), and ``weight`` and
  ``value`` are global. ``jax.reshard`` to the param's partitioning in the
  emitting branch is the reduction.
- ``UNCHECKED``: inside ``jax.shard_map(check_vma=False)`` or ``jax.pmap``,
  where JAX does not type per-device values: the state is stacked per
  device by the caller and ``lax.psum`` in the emitting branch reduces.
- ``SINGLE``: ``CHECKED`` or ``MESH`` over axes of one device: nothing to
  defer; the state is plain and values are reduced on arrival.

``CHECKED`` and ``MESH`` share one state layout, made by ``init`` under
``jax.set_mesh``: a state made for one runs in the other. Orbax cannot
write unreduced arrays: :func:`reduced_state` and :func:`unreduced_state`
convert the state for a checkpoint and back.
"""

import dataclasses
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_accum import _validate

CHECKED = 'checked'
MESH = 'mesh'
UNCHECKED = 'unchecked'
NONE = 'none'  # no axis_name: nothing to reduce
# CHECKED or MESH over axes of one device: nothing to defer (and JAX 0.10
# cannot lower a pcast to unreduced there). The incoming values are reduced
# (no communication) and the state is plain, as without axis_name.
SINGLE = 'single'


def axis_names(axis_name) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def spec_of(x) -> P:
  """The PartitionSpec in `x`'s type (``P()`` where it has none)."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  return P() if spec is None else spec


def entry_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one entry of a PartitionSpec."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def spec_axes(spec: P) -> set[str]:
  """The mesh axes a PartitionSpec shards over."""
  return {a for entry in spec for a in entry_axes(entry)}


def axes_size(names) -> int:
  """The number of devices along `names` in the current mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  size = 1
  for n in names:
    size *= mesh.shape[n]
  return size


def vary(x, axes):
  """`x` cast to varying over those of `axes` it does not vary over yet."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return lax.pcast(x, missing, to='varying') if missing else x


def unreduced_axes(x) -> frozenset:
  """The axes over which `x` is typed unreduced (global or in shard_map)."""
  out = set()
  out |= set(spec_of(x).unreduced)
  manual = getattr(jax.typeof(x), 'manual_axis_type', None)
  out |= set(getattr(manual, 'unreduced', ()) or ())
  return frozenset(out)


def varying_axes(x) -> frozenset:
  """The mesh axes over which `x`'s type says it varies (check_vma)."""
  manual = getattr(jax.typeof(x), 'manual_axis_type', None)
  return frozenset(getattr(manual, 'varying', ()) or ())


def layout_names(axis_name) -> Optional[tuple[str, ...]]:
  """The axes of an unreduced layout for ``init``, or None.

  ``init`` under ``jax.set_mesh`` (outside ``shard_map``) with every name of
  ``axis_name`` an Explicit axis of the mesh makes ``acc_grads``,
  ``acc_weight`` and ``acc_value`` unreduced over them, unless the axes
  hold one device (`SINGLE`: nothing to defer).
  """
  if axis_name is None:
    return None
  names = axis_names(axis_name)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(n in mesh.manual_axes for n in names):
    return None
  if all(n in mesh.explicit_axes for n in names) and axes_size(names) > 1:
    return names
  return None


def unreduced_zeros(p, dtype, names, where: str):
  """Zeros shaped and partitioned like `p`, typed unreduced over `names`."""
  spec = spec_of(p)
  clash = spec_axes(spec) & set(names)
  if clash:
    raise ValueError(
      f'The param at {where} is sharded over {sorted(clash)} (its '
      f'sharding is {spec}), an axis of `axis_name`='
      f'{shown(list(names))!r}. The reduction over an axis a param is '
      'sharded on (FSDP) runs every micro-batch, as a reduce-scatter, and '
      'cannot be deferred: defer only the replica axis of an (replica, '
      'fsdp) mesh (HSDP), or drop `axis_name`.'
    )
  return jnp.zeros(
    jnp.shape(p), dtype, out_sharding=spec.update(unreduced=frozenset(names))
  )


def mode_of(axis_name) -> str:
  """Which of CHECKED, MESH, UNCHECKED ``update`` runs in.

  Raises:
    NameError: no axis of that name in the current mesh, shard_map or pmap.
    ValueError: the axis is an Auto axis of the mesh in plain jit, or a
      shard_map over only some of the axes of ``axis_name``.
  """
  names = axis_names(axis_name)
  mesh = jax.sharding.get_abstract_mesh()
  manual = [n in mesh.manual_axes for n in names]
  if any(manual) and not all(manual):
    raise ValueError(
      f'accumulate(..., axis_name={axis_name!r}) runs in a shard_map over '
      f'only some of those axes (manual here: {sorted(mesh.manual_axes)}). '
      'Map over all of them, or name only the mapped ones.'
    )
  if not any(manual):
    if not mesh.empty and all(n in mesh.axis_names for n in names):
      auto = [n for n in names if n not in mesh.explicit_axes]
      if auto:
        raise ValueError(
          f'accumulate(..., axis_name={axis_name!r}) runs under jax.jit on '
          f'a mesh where {auto} are not Explicit axes; JAX types unreduced '
          'gradients only over Explicit axes. Make the mesh with '
          "jax.make_mesh(..., axis_types=(AxisType.Explicit, ...)) (the "
          'default), or call update inside jax.shard_map over the axis.'
        )
      return MESH
    try:  # jax.pmap's axes are not in the abstract mesh
      for n in names:
        lax.axis_index(n)
    except NameError as e:
      raise NameError(
        f'accumulate(..., axis_name={axis_name!r}): no axis of that name '
        'here. Call update inside jax.shard_map (or jax.pmap) over it, or '
        'under jax.jit inside `with jax.set_mesh(mesh)` where it is an '
        'Explicit mesh axis.'
      ) from e
    return UNCHECKED
  checked = all(n in varying_axes(lax.axis_index(n)) for n in names)
  return CHECKED if checked else UNCHECKED


@dataclasses.dataclass(frozen=True)
class Deferral:
  """How one ``update`` types, adds and reduces its per-device sums."""

  names: tuple[str, ...]
  mode: str

  @property
  def shown(self):
    """`axis_name` as the user wrote it, for messages."""
    return self.names[0] if len(self.names) == 1 else self.names

  @property
  def typed(self) -> bool:
    """Whether the accumulator is typed unreduced (CHECKED or MESH)."""
    return self.mode in (CHECKED, MESH)

  def check(self, updates, state, weight, flush, value) -> None:
    """Raises where the inputs do not fit the mode, naming what to write.

    Raises:
      ValueError: a gradient of the wrong type (invariant in CHECKED, not
        unreduced in MESH), a state whose accumulator is not unreduced, a
        ``flush`` that varies across the axis, a ``weight`` or ``value``
        typed unreduced.
    """
    if self.mode == NONE:
      _check_no_axis(updates, state)
    if not self.typed:
      return
    names = set(self.names)
    leaves = jax.tree.leaves_with_path(updates)
    self._check_state(state)
    if self.mode == CHECKED:
      self._check_checked(updates, state, weight, value)
      bad = [
        _validate.leaf_name(path)
        for path, g in leaves
        if not names <= varying_axes(g)
      ]
      if bad:
        first = _first(updates, bad)
        raise ValueError(
          f'accumulate(..., axis_name={self.shown!r}) inside '
          "jax.shard_map(check_vma=True) takes each device's own "
          f'gradient, but the gradients at {", ".join(bad[:3])} are '
          f'invariant over {sorted(names - varying_axes(first))}: '
          'shard_map already summed them '
          'across devices, which is the reduction that accumulation '
          'defers. Differentiate with respect to '
          f"jax.lax.pcast(params, {self.shown!r}, to='varying') inside the "
          'shard_map.'
        )
      if flush is not None and varying_axes(flush) & names:
        raise ValueError(
          f'`flush` varies across {sorted(varying_axes(flush) & names)}: '
          'every device must end the window together, or the one '
          'reduction waits forever. Compute flush from values that are '
          'the same on every device (a step count), or lax.pmax it.'
        )
    else:
      bad = [
        _validate.leaf_name(path)
        for path, g in leaves
        if names != unreduced_axes(g)
      ]
      if bad:
        raise ValueError(
          f'accumulate(..., axis_name={self.shown!r}) under jax.jit on a '
          'mesh takes gradients typed unreduced over the axis (each '
          'device holds its own partial sum), but the gradients at '
          f'{", ".join(bad[:3])} are typed '
          f'{jax.typeof(_first(updates, bad))}: reduced, or unreduced over '
          'other axes. Compute '
          'them with optax_accum.unreduced_value_and_grad'
          f'(loss_fn, axis_name={self.shown!r}), or drop axis_name to '
          'reduce every micro-batch.'
        )
      if value is not None and unreduced_axes(value):
        raise ValueError(
          f'`value` is typed {jax.typeof(value)}; under jax.jit on a mesh it '
          "is the micro-batch's global mean loss (a replicated scalar), as "
          'optax_accum.unreduced_value_and_grad returns it.'
        )

  def contribution(self, x):
    """A weighted per-device term, typed to add to an unreduced sum.

    CHECKED: each device's own (varying) term becomes its partial sum
    (``pcast`` to unreduced; no communication). MESH: already unreduced.
    """
    if self.mode != CHECKED:
      return x
    missing = tuple(n for n in self.names if n not in varying_axes(x))
    if missing:  # the same on every device: each device's own term
      x = lax.pcast(x, missing, to='varying')
    return lax.pcast(x, self.names, to='unreduced')

  def global_scalar(self, x):
    """A replicated scalar as an unreduced one with the same logical value."""
    if self.mode == MESH:
      return jax.reshard(x, P(unreduced=frozenset(self.names)))
    first = lax.axis_index(self.names) == 0
    x = jnp.where(first, x, jnp.zeros_like(x))  # varying: one holds it
    return lax.pcast(x, self.names, to='unreduced')

  def scalar_term(self, x):
    """A scalar term (weight, weight * value) to add to an unreduced sum:
    each device's own in CHECKED, the global one in MESH."""
    if self.mode == MESH:
      return self.global_scalar(x)
    return self.contribution(x)

  def reduced_scale(self, w):
    """A replicated scalar that may multiply an unreduced (MESH) array."""
    if self.mode != MESH:
      return w
    return jax.reshard(w, P(reduced=frozenset(self.names)))

  def _check_state(self, state) -> None:
    """Raises for a state whose sums are not unreduced over exactly the
    axes of `axis_name`."""
    names = set(self.names)
    have = set().union(
      *(unreduced_axes(a) for a in jax.tree.leaves(state.acc_grads)),
      unreduced_axes(state.acc_weight),
    )
    if have and have != names:
      raise ValueError(
        f'The accumulator state is unreduced over {sorted(have)}, but this '
        f'accumulate has axis_name={self.shown!r}: make the state with '
        'tx.init of the same optimizer, under jax.set_mesh.'
      )
    bad = [
      _validate.leaf_name(path)
      for path, a in jax.tree.leaves_with_path(state.acc_grads)
      if not names <= unreduced_axes(a)
    ]
    if bad or not names <= unreduced_axes(state.acc_weight):
      raise ValueError(
        f'The accumulator state passed to update is not unreduced over '
        f'{self.shown!r} (at {", ".join(bad[:3]) or "acc_weight"}). Make '
        'it with tx.init(params) (or restore it with restore_checkpoint) '
        'inside `with jax.set_mesh(mesh)` (the mesh with Explicit axes '
        f'{self.shown!r}), and inside jax.shard_map pass it with the specs '
        'of its types: in_specs/out_specs '
        'jax.tree.map(lambda x: jax.typeof(x).sharding.spec, opt_state).'
      )

  def _check_checked(self, updates, state, weight, value) -> None:
    """CHECKED: raises for values that vary over other manual axes than
    `axis_name` where the accumulator does not."""
    names = set(self.names)
    for (path, g), a in zip(
      jax.tree.leaves_with_path(updates), jax.tree.leaves(state.acc_grads)
    ):
      extra = varying_axes(g) - names - varying_axes(a)
      if extra:
        raise ValueError(
          f'The gradient at {_validate.leaf_name(path)} varies over '
          f'{sorted(extra)} besides `axis_name`={self.shown!r}, but the '
          'accumulator (shaped like the param) does not: reduce it over '
          f'them first (jax.lax.psum(g, {shown(sorted(extra))!r}), or an '
          'all-gather of the param inside the loss, as FSDP does), or add '
          'them to axis_name.'
        )
    for name, x in (('weight', weight), ('value', value)):
      extra = varying_axes(x) - names if x is not None else set()
      if extra:
        raise ValueError(
          f'`{name}` varies over {sorted(extra)} besides `axis_name`='
          f'{self.shown!r}. Inside shard_map it is the count (or mean loss) '
          'of the items behind this gradient: where the gradient is '
          f'reduced over {sorted(extra)} (FSDP), the group\'s, '
          f'jax.lax.psum(n, {shown(sorted(extra))!r}).'
        )

  def complete(self, x):
    """CHECKED: a per-device scalar sum (a norm's squares, a count) summed
    over the axes other than `axis_name` that it still varies over (shards
    of a param sharded over fsdp), so every device agrees."""
    if self.mode != CHECKED:
      return x
    axes = tuple(sorted(varying_axes(x)))
    return lax.psum(x, axes) if axes else x

  def agree(self, tree):
    """CHECKED: each leaf made the same on every device (`lax.pmax` over
    the axes it varies over): a skip decision and its state."""
    if self.mode != CHECKED:
      return tree

    def one(x):
      axes = tuple(sorted(varying_axes(x)))
      if not axes:
        return x
      dtype = jnp.result_type(x)
      wide = jnp.int32 if jnp.issubdtype(dtype, jnp.bool_) else dtype
      return lax.pmax(jnp.asarray(x, wide), axes).astype(dtype)

    return jax.tree.map(one, tree)

  def arrive(self, updates, state, weight, flush, extra_args):
    """Checks a mini-step's inputs (see `check`); returns `(updates,
    weight, flush, extra_args)`, reduced on arrival in SINGLE.

    UNCHECKED: JAX does not type a flush that differs across devices, and
    devices that disagree would wait forever in the window's reduction: a
    device that flushes ends the window on all (a scalar all-reduce).
    """
    self.check(updates, state, weight, flush, extra_args.get('value'))
    updates, weight = self.incoming((updates, weight))
    if 'value' in extra_args:
      extra_args = {**extra_args, 'value': self.incoming(extra_args['value'])}
    if self.mode == UNCHECKED and flush is not None:
      flush = lax.pmax(flush.astype(jnp.int32), self.names) > 0
    return updates, weight, flush, extra_args

  def incoming(self, tree):
    """SINGLE: a micro-batch's values reduced on arrival (one device: no
    communication); otherwise as they are."""
    if self.mode != SINGLE:
      return tree

    def one(x):
      if x is None:
        return x
      if varying_axes(x) & set(self.names):
        return lax.psum(x, self.names)
      if unreduced_axes(x):
        return jax.reshard(x, spec_of(x).update(unreduced=frozenset()))
      return x

    return jax.tree.map(one, tree)

  def reduce(self, tree):
    """The window's one reduction: per-device sums to their total."""
    if self.mode in (NONE, SINGLE):
      return tree
    if self.mode == MESH:
      return jax.tree.map(
        lambda x: jax.reshard(x, spec_of(x).update(unreduced=frozenset())),
        tree,
      )
    return lax.psum(tree, self.names)

  def zeros_like_reduced(self, shape, dtype, g):
    """Zeros typed like the emitted (reduced, invariant) update for `g`."""
    if self.mode == MESH and jnp.shape(g) == tuple(shape):
      spec = spec_of(g).update(unreduced=frozenset())
      return jnp.zeros(shape, dtype, out_sharding=spec)
    return jnp.zeros(shape, dtype)

  def reduce_like(self, g):
    """`g` with the type the reduced sum of such values has (for shapes)."""
    if self.mode == MESH:
      return jax.reshard(g, spec_of(g).update(unreduced=frozenset()))
    if self.mode == CHECKED:
      return lax.psum(g, self.names)
    return g


def of(axis_name) -> Deferral:
  """The deferral of an ``update`` with this ``axis_name`` here."""
  if axis_name is None:
    return Deferral((), NONE)
  names = axis_names(axis_name)
  mode = mode_of(axis_name)
  if mode in (CHECKED, MESH) and axes_size(names) == 1:
    mode = SINGLE
  return Deferral(names, mode)


def _check_no_axis(updates, state) -> None:
  """Without axis_name: raises for gradients that need one.

  Raises:
    ValueError: gradients typed unreduced (from unreduced_value_and_grad),
      or inside shard_map gradients that vary over an axis over which the
      accumulator does not (a forgotten axis_name).
  """
  leaves = jax.tree.leaves(updates)
  unreduced = set().union(*(unreduced_axes(g) for g in leaves))
  if unreduced:
    raise ValueError(
      f'The gradients are typed unreduced over {sorted(unreduced)} (each '
      "device's part of the sum), but the accumulator has no axis_name: "
      f'write accumulate(..., axis_name={shown(sorted(unreduced))!r}) to '
      'reduce them once per window.'
    )
  acc = jax.tree.leaves(state.acc_grads)
  varying = set().union(*(varying_axes(g) for g in leaves))
  extra = varying - set().union(*(varying_axes(a) for a in acc))
  if acc and extra:
    raise ValueError(
      f'Inside jax.shard_map the gradients vary over {sorted(extra)} but the '
      'accumulator state does not, and the accumulator has no axis_name. To '
      'reduce them once per window, write accumulate(..., '
      f'axis_name={shown(sorted(extra))!r}) and make the state with '
      'tx.init under jax.set_mesh; to train each device on its own, pass a '
      'per-device state (in_specs/out_specs P(axis) on a stacked state).'
    )


def shown(names):
  return names[0] if len(names) == 1 else tuple(names)


def _first(tree, names) -> Any:
  for path, x in jax.tree.leaves_with_path(tree):
    if _validate.leaf_name(path) == names[0]:
      return x
  return None


def _reduced_leaf(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    # jax.eval_shape records the abstract mesh, or no sharding for a
    # counter: orbax places arrays on the concrete mesh that is set.
    mesh = jax.sharding.get_mesh()
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = sharding.spec.update(unreduced=frozenset())
      if not isinstance(sharding.mesh, jax.sharding.AbstractMesh):
        mesh = sharding.mesh
    elif sharding is None:
      spec = P()
    else:
      return x
    if mesh.empty:
      return x
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec)
    )
  spec = spec_of(x)
  if not spec.unreduced:
    return x
  return jax.reshard(x, spec.update(unreduced=frozenset()))


def reduced_state(opt_state: Any) -> Any:
  """The optimizer state with every leaf typed unreduced reduced.

  With ``accumulate(..., axis_name=AXIS)`` and ``init`` under
  ``jax.set_mesh``, ``acc_grads``, ``acc_weight`` and ``acc_value`` are
  typed unreduced over AXIS: each device holds its part of the sum, which
  orbax cannot save and ``numpy`` cannot read. This returns the same
  logical values resharded to the leaves' partitioning without AXIS
  (``jax.reshard``: one all-reduce per unreduced leaf); other leaves are
  returned as they are. On ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape
  (tx.init, params)`` under ``jax.set_mesh``) it gives the matching target
  for an orbax restore, on the concrete mesh that is set (orbax cannot
  place arrays on the abstract mesh ``eval_shape`` records).
  :func:`unreduced_state` is its inverse.

  Args:
    opt_state: an optimizer state (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    The state, structured as ``opt_state``, with no unreduced leaf.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name='data')
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> with jax.set_mesh(mesh):
    ...   state = tx.init({'w': jnp.zeros(3)})
    ...   saved = optax_accum.reduced_state(state)  # what orbax saves
    ...   restored = optax_accum.unreduced_state(saved, state)
    >>> jax.typeof(restored.acc_grads['w']) == jax.typeof(state.acc_grads['w'])
    True

  References:
    JAX's ``unreduced`` sharding type and ``jax.reshard``.
  """
  leaves = jax.tree.leaves(opt_state)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.tree.map(_reduced_leaf, opt_state)
  unreduced = [x for x in leaves if unreduced_axes(x)]
  if not unreduced:
    return opt_state
  reduce = jax.jit(lambda t: jax.tree.map(_reduced_leaf, t))
  mesh = getattr(getattr(unreduced[0], 'sharding', None), 'mesh', None)
  if jax.sharding.get_abstract_mesh().empty and mesh is not None:
    with jax.set_mesh(mesh):  # the arrays' own mesh
      return reduce(opt_state)
  return reduce(opt_state)


def unreduced_state(opt_state: Any, like: Any) -> Any:
  """The inverse of :func:`reduced_state`: leaves unreduced where ``like``'s
  are.

  Args:
    opt_state: a state from :func:`reduced_state` (a restored checkpoint).
    like: the state, or ``jax.eval_shape(tx.init, params)`` under the same
      ``jax.set_mesh``, whose leaves give the types.

  Returns:
    ``opt_state`` with each leaf resharded to the unreduced type of the
    matching leaf of ``like`` (``jax.reshard``: the logical value is kept,
    held by one device of each group; no communication). Restored at a
    window boundary, training continues bit for bit; mid-window, the
    window's later terms meet the saved total in another order than the
    per-device parts they would have met (equal to float32 rounding).

  Raises:
    ValueError: ``opt_state`` and ``like`` have different structures, or no
      mesh is set.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name='data')
    >>> params = {'w': jnp.zeros(3)}
    >>> with jax.set_mesh(jax.make_mesh((jax.device_count(),), ('data',))):
    ...   target = jax.eval_shape(tx.init, params)
    ...   restored = optax_accum.reduced_state(tx.init(params))  # as loaded
    ...   state = optax_accum.unreduced_state(restored, target)
    >>> jax.typeof(state.acc_grads['w']).sharding.spec.unreduced == (
    ...     target.acc_grads['w'].sharding.spec.unreduced)
    True
  """
  if jax.tree.structure(opt_state) != jax.tree.structure(like):
    raise ValueError(
      'unreduced_state takes a state structured as `like` (the optimizer '
      "state, or jax.eval_shape(tx.init, params)), but got:\n"
      f'opt_state: {jax.tree.structure(opt_state)}\n'
      f'like:      {jax.tree.structure(like)}'
    )

  def leaf(x, t):
    spec = spec_of(t)
    return jax.reshard(x, spec) if spec.unreduced else x

  if not any(unreduced_axes(t) for t in jax.tree.leaves(like)):
    return opt_state
  if jax.sharding.get_abstract_mesh().empty:
    raise ValueError(
      'unreduced_state reshards onto the mesh of `like`: call it inside '
      '`with jax.set_mesh(mesh)`.'
    )
  return jax.jit(lambda s: jax.tree.map(leaf, s, like))(opt_state)
