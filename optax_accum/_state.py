"""The state of an accumulator, and reading it from any optimizer state."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_accum._errors import fail


class AccumulateState(NamedTuple):
  """State of the transformation returned by :func:`optax_accum.accumulate`.

  Attributes:
    mini_step: int32 scalar, the micro-batches of the window in flight.
    gradient_step: int32 scalar, the gradient steps (the schedule's input).
    every_k: int32 scalar, the k of the window in flight (or of the next).
    acc_grads: like the params, :math:`\\sum_i w_i g_i` of the window in
      flight (the last one's when ``mini_step`` is 0), accumulator dtype.
    acc_weight: scalar :math:`\\sum_i w_i` (widest real accumulator dtype).
    acc_value: scalar :math:`\\sum_i w_i v_i` of the ``value`` arguments.
    has_updated: bool scalar, whether the last mini-step took a step.
    num_rejected: int32 scalar, windows ``should_skip_update_fn`` rejected.
    grad_norm: float32 scalar, the L2 norm of the last window's mean.
    skip_state: ``should_skip_update_fn``'s for the last window, or None.
    inner_opt_state: ``inner``'s state (init's dtypes); None: chainable form.
    noise_scale: with ``track_noise_scale=True``, the sums and averages of
      :func:`optax_accum.gradient_noise_scale`; else None.
    acc_value_weight: ``acc_weight`` over the micro-batches that gave ``value``.

  With ``axis_name`` the sums are typed unreduced (:func:`reduced_state`).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(3, optax.sgd(0.1))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> _, state = tx.update({'w': jnp.ones(2)}, state, weight=4.0)
    >>> int(state.mini_step), float(state.acc_weight), int(state.every_k)
    (1, 4.0, 3)

  References:
    The field names follow ``optax.MultiStepsState``.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  every_k: jax.Array
  acc_grads: optax.Updates
  acc_weight: jax.Array
  acc_value: jax.Array
  has_updated: jax.Array
  num_rejected: jax.Array
  grad_norm: jax.Array
  skip_state: Any
  inner_opt_state: Any
  noise_scale: Any = None
  acc_value_weight: Any = None


ACCUMULATORS = (AccumulateState, optax.MultiStepsState, optax.ApplyEvery)


def accumulate_states(tree, kinds=(AccumulateState,)) -> list[Any]:
  """Every state of ``kinds`` in a pytree, in pytree order, with the values
  of ``nnx.Optimizer``'s variables."""
  nnx = lambda x: hasattr(x, 'get_value')
  value = lambda x: x.get_value() if nnx(x) else x
  tree = jax.tree.map(value, tree, is_leaf=nnx)
  is_acc = lambda x: isinstance(x, kinds)
  return [s for s in jax.tree.leaves(tree, is_leaf=is_acc) if is_acc(s)]


def holds_chainable_form(tree) -> bool:
  """Whether a state holds an accumulator of the chainable form."""
  return any(s.inner_opt_state is None for s in accumulate_states(tree))


def has_updated(opt_state: Any) -> jax.Array:
  """Tells whether the last mini-step took a gradient step.

  Args:
    opt_state: an optimizer state holding an ``AccumulateState`` (read).

  Returns:
    A bool scalar array.

  Raises:
    ValueError: ``opt_state`` holds no ``AccumulateState``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(3))
    >>> _, state = tx.update(jnp.ones(3), state, jnp.zeros(3))
    >>> bool(optax_accum.has_updated(state))
    False

  References:
    ``optax.MultiSteps.has_updated`` (which infers it from its counter).
  """
  states = accumulate_states(opt_state)
  if not states:
    fail(ValueError, 'opt_state', 'holds no AccumulateState')
  return jnp.asarray(states[0].has_updated)
