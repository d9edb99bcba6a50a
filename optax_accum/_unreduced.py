"""Gradients typed unreduced over a mesh axis: the ``axis_name`` path of
``microbatched_value_and_grad``, for any model."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_accum import _call_checks
from optax_accum import _layout
from optax_accum._errors import fail
from optax_accum._errors import leaf_name


def _gather(x, spec: P):
  """All-gathers the dims of a local shard that `spec` shards."""
  for dim, entry in enumerate(spec):
    axes = _layout.entry_axes(entry)
    if axes:
      x = lax.all_gather(x, axes, axis=dim, tiled=True)
  return x


def _reduce_to_shard(g, spec: P, reduce_axes: tuple[str, ...]):
  """A per-device gradient to this device's shard of its sum over
  ``reduce_axes``: reduce-scatters along sharded dims, an all-reduce else."""
  for dim, entry in enumerate(spec):
    axes = _layout.entry_axes(entry)
    if axes:
      g = lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
  left = tuple(a for a in reduce_axes if a not in _layout.spec_axes(spec))
  return lax.psum(g, left) if left else g


def _check_call(axis_name, names, params, args, batch_argnums, k):
  """Checks a call; the specs of the params, of the arguments; batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(n in mesh.explicit_axes for n in names):
    fail(ValueError, 'axis_name', f'{axis_name!r}, no Explicit axis of {mesh}')
  param_specs = jax.tree.map(_call_checks.spec_of, params)
  is_spec = lambda s: isinstance(s, P)
  for path, spec in jax.tree.leaves_with_path(param_specs, is_leaf=is_spec):
    if _layout.spec_axes(spec) & set(names):
      fail(ValueError, 'axis_name', f'{axis_name!r} shards {leaf_name(path)}')
  arg_specs = [jax.tree.map(_call_checks.spec_of, a) for a in args]
  batch_axes = _batch_axes(axis_name, names, args, batch_argnums, k)
  for path, spec in jax.tree.leaves_with_path(param_specs, is_leaf=is_spec):
    other = _layout.spec_axes(spec) - set(batch_axes)
    if other:
      at = f'{leaf_name(path)} is sharded over {sorted(other)}'
      fail(ValueError, 'params', f'{at}, which shard no batch (TP)')
  return param_specs, arg_specs, batch_axes


def _batch_axes(axis_name, names, args, batch_argnums, k):
  """The mesh axes sharding the batch arguments' leading axis, checked."""
  batch_axes: tuple[str, ...] = ()
  for n in batch_argnums:
    batch = args[n - 1] if n <= len(args) else ()
    for path, x in jax.tree.leaves_with_path(batch):
      spec = _call_checks.spec_of(x) if jnp.ndim(x) else P()
      lead = _layout.entry_axes(spec[0]) if len(spec) else ()
      per_device = jnp.shape(x)[0] // _layout.axes_size(lead) if lead else 0
      if not set(names) <= set(lead):
        where = f'argument {n} at {leaf_name(path)}'
        fail(ValueError, 'batch_argnums', f'{where}: {spec}, not {axis_name!r}')
      if per_device % k:
        rows = f'{per_device} rows per device'
        fail(ValueError, 'num_microbatches', f'{k} does not divide {rows}')
      batch_axes = tuple(dict.fromkeys(batch_axes + lead))
  return batch_axes


def _local(sums, names, param_specs, batch_axes, single, p_local, *args):
  """One device's part in the shard_map: the params gathered and
  differentiated as its own (varying) copy; its gradient sum reduced over
  the batch axes but ``names`` (fsdp) and left unreduced over ``names``."""
  args = list(args)
  if sums.key_argnum is not None and sums.key_argnum <= len(args):
    key = args[sums.key_argnum - 1]
    args[sums.key_argnum - 1] = jax.random.fold_in(
      key, lax.axis_index(batch_axes)
    )
  is_spec = lambda s: isinstance(s, P)
  whole = lambda x, spec: _layout.vary(_gather(x, spec), batch_axes + names)
  p_var = jax.tree.map(whole, p_local, param_specs, is_leaf=is_spec)
  g_sum, w_sum, l_sum, a_sum = sums(p_var, *args)
  total, l_tot, a_tot = lax.psum((w_sum, l_sum, a_sum), batch_axes)
  denom = jnp.where(total == 0, 1.0, total)  # NaN stays NaN
  now_axes = tuple(a for a in batch_axes if a not in names)

  def finish(g, p, spec):
    g = _reduce_to_shard(g, spec, now_axes)
    g = (g * (1 / denom.astype(g.dtype))).astype(jnp.result_type(p))
    if single:  # typed unreduced outside (jax cannot pcast here)
      return lax.psum(g, names)
    return lax.pcast(g, names, to='unreduced')

  grads = jax.tree.map(finish, g_sum, p_local, param_specs, is_leaf=is_spec)
  loss = l_tot / denom.astype(l_tot.dtype)
  return sums.outputs(loss, grads, total, a_tot, denom)


def value_and_grad(sums, names):
  """``microbatched_value_and_grad(..., axis_name=names)``: ``sums`` (a
  ``WindowSums`` of one device's shard) run in one ``jax.shard_map`` over
  the mesh; the gradients leave it typed unreduced over ``names``."""
  axis_name = names[0] if len(names) == 1 else names
  is_spec = lambda s: isinstance(s, P)

  def value_and_grad(params, *args):
    split = (sums.batch_argnums, sums.num_microbatches)
    checked = _check_call(axis_name, names, params, list(args), *split)
    param_specs, arg_specs, batch_axes = checked
    # An axis of size 1 has nothing to defer; JAX (0.10) cannot lower a
    # pcast to unreduced over it: the gradient is typed outside instead.
    single = _layout.axes_size(names) == 1
    unreduced = lambda s: s.update(unreduced=frozenset(names))
    grad_specs = jax.tree.map(unreduced, param_specs, is_leaf=is_spec)
    parts = (sums, names, param_specs, batch_axes, single)
    local = functools.partial(_local, *parts)
    out_specs = (P(), param_specs if single else grad_specs, P())
    out_specs += (P(),) * sums.sq_norms  # (its two scalars, reduced)
    in_specs = (param_specs, *arg_specs)
    mapped = jax.shard_map(local, in_specs=in_specs, out_specs=out_specs)
    value, grads, total, *norms = mapped(params, *args)
    if single:
      grads = jax.tree.map(jax.reshard, grads, grad_specs, is_leaf=is_spec)
    return (value, grads, total, *norms)

  return value_and_grad
