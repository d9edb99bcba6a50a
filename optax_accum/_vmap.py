"""Ensembles under `jax.vmap`: counters shared by all members."""

from typing import Any

import jax
from jax.core import Tracer
import numpy as np

from optax_accum._errors import fail
from optax_accum._state import AccumulateState
from optax_accum._state import accumulate_states

# The fields that decide when a window ends. Batched, they make the
# accumulator's `lax.cond` a select under vmap (every branch runs).
_SHARED = ('mini_step', 'gradient_step', 'every_k', 'has_updated', 'acc_weight')


def share_counters(opt_state: Any) -> tuple[Any, Any]:
  """Splits an ensemble's optimizer state for ``jax.vmap``: shared counters.

  Stacked counters make ``lax.cond`` a select under ``jax.vmap`` (the
  inner would run every mini-step): keeps member 0's, unbatched by the
  returned axes; pass ``weight`` and ``flush`` unbatched too.

  Args:
    opt_state: a state stacked along axis 0 (``jax.vmap(tx.init)``), with
      :class:`optax_accum.AccumulateState` nodes anywhere (for Flax NNX,
      ``nnx.as_pure(optimizer.opt_state)``).

  Returns:
    ``(opt_state, axes)``: the state, counters unstacked, and a pytree
    prefix of 0 and None for ``jax.vmap``'s ``in_axes`` and ``out_axes``.

  Raises:
    ValueError: a state not stacked, counters that differ between members,
      a ``should_skip_update_fn`` (per member) or no ``AccumulateState``.

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
    praxis ``ShardedStaticAccumulator``; jax-ml/jax #8409.
  """
  is_acc = lambda x: isinstance(x, AccumulateState)
  if not accumulate_states(opt_state):
    fail(ValueError, 'opt_state', 'holds no AccumulateState')

  def unstack(node):
    if not is_acc(node):
      return node
    if node.skip_state is not None:
      fail(ValueError, 'opt_state', 'its should_skip_update_fn is per member')
    if jax.numpy.ndim(node.mini_step) != 1:
      fail(ValueError, 'opt_state', 'not stacked: use jax.vmap(tx.init)')
    shared = {name: getattr(node, name) for name in _SHARED}
    for name, value in shared.items():
      if not isinstance(value, Tracer) and np.any(value != value[0]):
        why = f'members disagree on {name} (weight, flush batched?)'
        fail(ValueError, 'opt_state', why)
    return node._replace(**{n: v[0] for n, v in shared.items()})

  def axes_of(node):
    axes = jax.tree.map(lambda _: 0, node)
    return axes._replace(**dict.fromkeys(_SHARED)) if is_acc(node) else axes

  state = jax.tree.map(unstack, opt_state, is_leaf=is_acc)
  axes = jax.tree.map(axes_of, opt_state, is_leaf=is_acc)
  return state, axes
