"""Gradients typed unreduced over a mesh axis, for any model."""

from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_accum import _deferral
from optax_accum import _microbatch
from optax_accum import _validate


def _gather(x, spec: P):
  """All-gathers the dims of a local shard that `spec` shards."""
  for dim, entry in enumerate(spec):
    axes = _deferral.entry_axes(entry)
    if axes:
      x = lax.all_gather(x, axes, axis=dim, tiled=True)
  return x


def _reduce_to_shard(g, spec: P, reduce_axes: tuple[str, ...]):
  """A whole per-device gradient to this device's shard of its sum over
  `reduce_axes` (the batch axes but `axis_name`, which shard the params it
  does shard: `_check_call`): a reduce-scatter along each sharded dim, an
  all-reduce over the rest."""
  for dim, entry in enumerate(spec):
    axes = _deferral.entry_axes(entry)
    if axes:
      g = lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
  left = tuple(a for a in reduce_axes if a not in _deferral.spec_axes(spec))
  return lax.psum(g, left) if left else g


def _check_call(axis_name, names, params, args, batch_argnums, k):
  """Checks a call of `unreduced_value_and_grad`'s function; returns the
  specs of the params and of the arguments, and the batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  missing = [n for n in names if n not in mesh.axis_names]
  if not mesh.empty and missing:
    raise ValueError(
      f'unreduced_value_and_grad(..., axis_name={axis_name!r}): '
      f'{missing} are not axes of the mesh, whose axes are '
      f'{mesh.axis_names}.'
    )
  if mesh.empty or not all(n in mesh.explicit_axes for n in names):
    raise ValueError(
      f'unreduced_value_and_grad(..., axis_name={axis_name!r}) runs under '
      'jax.jit inside `with jax.set_mesh(mesh)`, where the axis is an '
      'Explicit mesh axis (jax.make_mesh\'s default); here the mesh is '
      f'{mesh}. Inside jax.shard_map, differentiate with respect to '
      f"jax.lax.pcast(params, {axis_name!r}, to='varying') instead."
    )
  param_specs = jax.tree.map(_deferral.spec_of, params)
  for path, spec in jax.tree.leaves_with_path(
    param_specs, is_leaf=lambda s: isinstance(s, P)
  ):
    used = _deferral.spec_axes(spec)
    if used & set(names):
      raise ValueError(
        f'The param at {_validate.leaf_name(path)} is sharded {spec}, '
        f'over `axis_name`={axis_name!r}. Its reduction over that axis '
        'runs every call (FSDP) and cannot be deferred: defer the '
        'replica axis of a (replica, fsdp) mesh instead.'
      )
  args = list(args)
  arg_specs = [jax.tree.map(_deferral.spec_of, a) for a in args]
  batch_axes: tuple[str, ...] = ()
  for n in batch_argnums:
    if n > len(args):
      break  # window_sums names the argument
    for path, x in jax.tree.leaves_with_path(args[n - 1]):
      where = _validate.leaf_name(path)
      if jnp.ndim(x) == 0:
        raise ValueError(
          f'Argument {n} (`batch_argnums`) at {where} is a scalar, which '
          'cannot be split among devices: leave it out of batch_argnums '
          '(pass it as another argument).'
        )
      spec = _deferral.spec_of(x)
      lead = _deferral.entry_axes(spec[0]) if len(spec) else ()
      per_device = jnp.shape(x)[0] // max(_deferral.axes_size(lead), 1)
      if set(names) <= set(lead) and per_device % k:
        raise ValueError(
          f'Argument {n} (`batch_argnums`) at {where} has {jnp.shape(x)[0]} '
          f'rows, {per_device} per device (sharded {spec}), which do not '
          f'split into num_microbatches={k}: give each '
          'device a multiple of num_microbatches rows.'
        )
      if not set(names) <= set(lead):
        raise ValueError(
          f'Argument {n} (`batch_argnums`) at '
          f'{where} has sharding {spec}; '
          'unreduced_value_and_grad needs its leading (batch) axis '
          f'sharded over `axis_name`={axis_name!r}, or every device '
          "would count the same items: jax.device_put(x, P('data')) or "
          "jax.reshard(x, P('data'))."
        )
      batch_axes = tuple(dict.fromkeys(batch_axes + lead))

  for path, spec in jax.tree.leaves_with_path(
    param_specs, is_leaf=lambda s: isinstance(s, P)
  ):
    other = _deferral.spec_axes(spec) - set(batch_axes)
    if other:
      raise ValueError(
        f'The param at {_validate.leaf_name(path)} is sharded {spec}, over '
        f'{sorted(other)}, which do not shard the batch: '
        'unreduced_value_and_grad gathers params over the batch axes '
        '(FSDP) only, and does not run tensor-parallel layers. Replicate '
        'it over those axes, or compute the gradient in your own '
        "jax.shard_map and pcast it to='unreduced'."
      )
  return param_specs, arg_specs, batch_axes


def unreduced_value_and_grad(
  loss_fn: Callable[..., Any],
  axis_name: Union[str, tuple[str, ...]],
  num_microbatches: int = 1,
  *,
  has_aux: bool = False,
  reduction: str = 'mean',
  batch_argnums: Union[int, Sequence[int]] = 1,
  key_argnum: Union[int, None] = None,
  unroll: Union[int, bool] = 1,
) -> Callable[..., Any]:
  r"""Like :func:`microbatched_value_and_grad`, with gradients left
  unreduced over ``axis_name`` for the window's one reduction.

  Under ``jax.jit`` with ``jax.set_mesh(mesh)``, where the batch is sharded
  along its leading axis over ``axis_name`` (and possibly other axes of the
  mesh), the returned function runs ``loss_fn`` on each device's own shard
  of the batch inside one ``jax.shard_map`` over all mesh axes. Params
  sharded over other batch axes (FSDP) are all-gathered for the loss (each
  device holds the whole params and its gradient sum during the call), and
  their gradients are reduce-scattered over those axes once per call, after
  the micro-batches (HSDP on a ``(replica, fsdp)`` mesh); the sum over
  ``axis_name`` is not taken: the gradients come out as global arrays typed
  unreduced over it (each device holds its part). ``accumulate(k, opt,
  axis_name=axis_name)`` adds them on each device and reduces once per
  window. The value is the token-weighted
  mean over the whole batch:

  .. math::
    g = \frac{\sum_{d} \sum_i w_{d,i} \nabla L_{d,i}}{\sum_d \sum_i w_{d,i}}

  over devices :math:`d` and their micro-batches :math:`i`, with the same
  conventions as :func:`microbatched_value_and_grad` (``reduction="sum"``:
  :math:`w_{d,i} L_{d,i}` is ``loss_fn``'s loss; with ``"mean"`` the weight
  multiplies the float32 gradient, never the loss). The one communication
  besides the FSDP gathers is a scalar all-reduce of the weights and losses.

  Args:
    loss_fn: ``loss_fn(params, *args) -> (loss, weight)`` or, with
      ``has_aux``, ``(loss, (weight, aux))``, on one device's shard, as for
      :func:`microbatched_value_and_grad`.
    axis_name: an Explicit mesh axis (or a tuple of them) of the current
      mesh, over which the batch is sharded and the reduction deferred.
      Params must not be sharded over it.
    num_microbatches: micro-batches per device and call, run in a
      ``lax.scan`` (1: one pass).
    has_aux, reduction, batch_argnums, key_argnum, unroll: as for
      :func:`microbatched_value_and_grad`. A key is also folded with the
      device's index along the batch axes, so devices draw differently.

  Returns:
    A function of ``loss_fn``'s arguments returning ``(loss, grads,
    weight)`` (``((loss, aux), grads, weight)`` with ``has_aux``): ``loss``
    and ``aux`` (float32, or their own dtype when wider) and ``weight`` (the
    float32 total) replicated, ``grads`` shaped,
    typed and partitioned like the params and unreduced over
    ``axis_name``. Feed ``grads`` and ``weight`` to ``accumulate(...,
    axis_name=axis_name)`` (read ``grads`` directly with
    ``jax.reshard(g, P(...))``, which reduces them).

  Raises:
    ValueError: as :func:`microbatched_value_and_grad`; when called, no
      mesh is set, an axis of ``axis_name`` is not an Explicit axis of it
      (or the call is inside ``shard_map``), a param is sharded over
      ``axis_name``, or a batch leaf's leading axis is not sharded over
      ``axis_name``.
    TypeError: ``axis_name`` is not a str or tuple of str.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> def loss_fn(w, x):
    ...   return jnp.mean((x * w) ** 2), x.shape[0]
    >>> vg = optax_accum.unreduced_value_and_grad(loss_fn, 'data')
    >>> tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name='data')
    >>> with jax.set_mesh(mesh):
    ...   w = jnp.float32(1.0)
    ...   state = tx.init(w)
    ...   @jax.jit
    ...   def step(w, state, x):
    ...     loss, g, n = vg(w, x)
    ...     return optax_accum.apply_gradients(tx, g, state, w, weight=n)
    ...   for x in (jnp.ones(4), 2 * jnp.ones(4)):
    ...     w, state = step(w, state, jax.device_put(x, P('data')))
    >>> float(w)  # 1 - 0.1 * mean(2 x^2 w)
    0.5

  References:
    JAX's ``unreduced`` sharding type (``jax.sharding.PartitionSpec``'s
    ``unreduced``); MaxText PR #5099 (deferred data-parallel reduction);
    PyTorch FSDP2 ``set_requires_all_reduce`` (HSDP).
  """
  names = (
    _deferral.axis_names(axis_name)
    if isinstance(axis_name, (str, tuple))
    else ()
  )
  if not (names and all(isinstance(n, str) and n for n in names)):
    raise TypeError(
      '`axis_name` must be a mesh axis name (str) or a tuple of them, but '
      f'got {axis_name!r}.'
    )
  batch_argnums = _microbatch.check_args(
    num_microbatches, reduction, batch_argnums, key_argnum
  )
  sums = _microbatch.window_sums(
    loss_fn,
    num_microbatches,
    has_aux=has_aux,
    reduction=reduction,
    batch_argnums=batch_argnums,
    key_argnum=key_argnum,
    unroll=unroll,
  )

  def value_and_grad(params, *args):
    args = list(args)
    param_specs, arg_specs, batch_axes = _check_call(
      axis_name, names, params, args, batch_argnums, num_microbatches
    )
    # An axis of size 1 has nothing to defer; JAX (0.10) cannot lower a
    # pcast to unreduced over it, so the gradient is typed unreduced by a
    # reshard outside the shard_map instead.
    single = _deferral.axes_size(names) == 1
    # Reduced every call: the batch axes other than `axis_name` (fsdp).
    now_axes = tuple(a for a in batch_axes if a not in names)

    def local(p_local, *call_args):
      call_args = list(call_args)
      if key_argnum is not None and key_argnum <= len(call_args):
        call_args[key_argnum - 1] = jax.random.fold_in(
          call_args[key_argnum - 1], lax.axis_index(batch_axes)
        )
      # The whole params on every device, differentiated as each device's
      # own (varying) copy: each gradient is one device's own sum, reduced
      # below, once per call, over the batch axes but `axis_name`.
      p_var = jax.tree.map(
        lambda x, spec: _deferral.vary(_gather(x, spec), batch_axes + names),
        p_local,
        param_specs,
        is_leaf=lambda s: isinstance(s, P),
      )
      g_sum, w_sum, l_sum, a_sum = sums(p_var, *call_args)
      total, l_tot, a_tot = lax.psum((w_sum, l_sum, a_sum), batch_axes)
      denom = jnp.where(total == 0, 1.0, total)  # NaN stays NaN

      def finish(g, p, spec):
        g = _reduce_to_shard(g, spec, now_axes)
        g = (g * (1 / denom.astype(g.dtype))).astype(jnp.result_type(p))
        if single:  # typed unreduced outside (jax cannot pcast here)
          return lax.psum(g, names)
        return lax.pcast(g, names, to='unreduced')

      grads = jax.tree.map(
        finish, g_sum, p_local, param_specs, is_leaf=lambda s: isinstance(s, P)
      )
      loss = l_tot / denom
      if has_aux:
        aux = jax.tree.map(lambda a: a / denom, a_tot)
        return (loss, aux), grads, total
      return loss, grads, total

    unreduced = frozenset(names)
    grad_specs = jax.tree.map(
      lambda s: s.update(unreduced=unreduced),
      param_specs,
      is_leaf=lambda s: isinstance(s, P),
    )
    out_specs = (P(), param_specs if single else grad_specs, P())
    value, grads, total = jax.shard_map(
      local,
      in_specs=(param_specs, *arg_specs),
      out_specs=out_specs,
    )(params, *args)
    if single:
      grads = jax.tree.map(
        jax.reshard, grads, grad_specs, is_leaf=lambda s: isinstance(s, P)
      )
    return value, grads, total

  return value_and_grad
