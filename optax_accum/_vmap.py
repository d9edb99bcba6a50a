"""Ensembles under `jax.vmap`: counters shared by all members."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_accum import _accumulate
from optax_accum import _validate

# The fields that decide when a window ends. Batched, they make the
# accumulator's `lax.cond` a select under vmap (every branch runs).
_SHARED = (
  'mini_step',
  'gradient_step',
  'every_k',
  'has_updated',
  'acc_weight',
  'acc_value',
)


def share_counters(opt_state: Any, axis: int = 0) -> tuple[Any, Any]:
  """Splits an ensemble's optimizer state for ``jax.vmap``: shared counters.

  ``jax.vmap(tx.init)(members)`` stacks every field of the
  :class:`optax_accum.AccumulateState` along ``axis``, so under
  ``jax.vmap`` the window's end is a batched predicate and ``lax.cond``
  becomes a select: the inner optimizer runs on every mini-step. When all
  members see the same micro-batch schedule (no per-member ``weight``,
  ``flush`` or skipped micro-batches), the counters are equal; this takes
  them from member 0 and returns the ``in_axes``/``out_axes`` that keep
  them unbatched, so the conditional stays a conditional.

  Args:
    opt_state: a state stacked along ``axis`` (``jax.vmap(tx.init)``),
      holding :class:`optax_accum.AccumulateState` nodes anywhere.
    axis: the members' axis.

  Returns:
    ``(opt_state, axes)``: the state with the counters of every
    ``AccumulateState`` unstacked, and a pytree prefix of ``axis`` and
    ``None`` for ``jax.vmap``'s ``in_axes`` and ``out_axes``.

  Raises:
    ValueError: concrete counters that differ between members (they would
      not stay shared), or a state with no ``AccumulateState``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.adam(0.1))
    >>> members = jnp.zeros((3, 4))  # 3 members of 4 params
    >>> state, axes = optax_accum.share_counters(jax.vmap(tx.init)(members))
    >>> step = jax.vmap(
    ...     lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p),
    ...     in_axes=(0, axes, 0), out_axes=(0, axes))
    >>> params, state = step(members, state, jnp.ones((3, 4)))
    >>> int(state.mini_step)  # one counter for the ensemble
    1

  References:
    praxis ``ShardedStaticAccumulator`` (which keeps a conditional alive
    under vmap); jax-ml/jax #8409.
  """
  is_acc = lambda x: isinstance(x, _accumulate.AccumulateState)
  if not _accumulate.accumulate_states(opt_state):
    raise ValueError(
      'share_counters found no AccumulateState in `opt_state`: pass the '
      'state of an optimizer built with optax_accum.accumulate.'
    )

  def unstack(node):
    if not is_acc(node):
      return node
    shared = {}
    for name in _SHARED:
      value = getattr(node, name)
      first = jnp.take(value, 0, axis=axis)
      if not isinstance(value, _validate.Tracer) and not np.all(
        np.asarray(value) == np.asarray(first)[None]
      ):
        raise ValueError(
          f'share_counters: the members disagree on `{name}` '
          f'({np.asarray(value).tolist()}), so their windows do not end '
          'together. Give every member the same weight, flush and skips.'
        )
      shared[name] = first
    return node._replace(**shared)

  def axes_of(node):
    if not is_acc(node):
      return jax.tree.map(lambda _: axis, node)
    axes = jax.tree.map(lambda _: axis, node)
    return axes._replace(**{name: None for name in _SHARED})

  state = jax.tree.map(unstack, opt_state, is_leaf=is_acc)
  axes = jax.tree.map(axes_of, opt_state, is_leaf=is_acc)
  return state, axes
