"""`apply_gradients`: one mini-step that updates and applies, fused."""

import collections
from typing import Any, Optional

import jax
import optax

from optax_accum import _accumulate
from optax_accum import _chain
from optax_accum import _deferral
from optax_accum import _validate


def apply_gradients(
  tx: optax.GradientTransformation,
  grads: optax.Updates,
  opt_state: optax.OptState,
  params: optax.Params,
  **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
  r"""One mini-step of ``tx`` applied to ``params``: ``(params, opt_state)``.

  The same numbers as

  .. code-block:: python

    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    params = optax.apply_updates(params, updates)

  but for an optimizer built with :func:`optax_accum.accumulate` or
  :func:`optax_accum.chain`, the apply happens inside the accumulator's
  conditional: on mid-steps ``params`` pass through it untouched and no
  zero-update buffer is written or added; on the mini-step that ends a
  window the inner update is computed and applied there. With the jitted
  step's params and optimizer state donated, a mid-step then costs the
  accumulation pass alone. Any other optimizer takes the two lines above.

  Mid-steps are bit for bit those two lines. On the mini-step that ends a
  window, XLA fuses the inner update with the add into one kernel and may
  contract a multiply-add differently: params can differ in the last bit.
  Return ``(params, opt_state)`` from the jitted step in the order they
  were passed in: JAX pairs donated inputs with outputs of the same shape in
  order, and another order turns the in-place updates into copies.

  Args:
    tx: the optimizer, typically ``optax_accum.chain(accumulate(k), opt)``.
    grads: the micro-batch gradient, a pytree shaped like ``params`` (any
      float dtype).
    opt_state: ``tx``'s state.
    params: the params the gradient was taken at.
    **extra_args: ``weight``, ``flush`` (see :func:`optax_accum.accumulate`)
      and whatever ``tx``'s elements take.

  Returns:
    ``(params, opt_state)``: new params (the same arrays on mid-steps) and
    the new state.

  Raises:
    TypeError: ``tx`` is not a transformation (a factory such as
      ``optax.adamw``).
    ValueError: ``weight`` or ``flush`` given to a ``tx`` without an
      accumulator, where they would be ignored; an ``optax.chain`` (or
      ``named_chain``) with elements after an accumulator (the chainable
      form, which runs them on every mini-step: write
      :func:`optax_accum.chain`); and the errors of ``tx.update`` (see
      :func:`optax_accum.accumulate`). A keyword close to ``weight``,
      ``flush`` or ``value`` warns.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.5))
    >>> params = {'w': jnp.array([1.0, 1.0])}
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda g, s, p: optax_accum.apply_gradients(tx, g, s, p),
    ...                donate_argnums=(1, 2))
    >>> params, state = step({'w': jnp.array([1.0, 3.0])}, state, params)
    >>> params['w']  # mid-step: untouched
    Array([1., 1.], dtype=float32)
    >>> params, state = step({'w': jnp.array([3.0, 1.0])}, state, params)
    >>> params['w']  # 1 - 0.5 * mean
    Array([0., 0.], dtype=float32)

  References:
    ``flax.training.train_state.TrainState.apply_gradients``; PyTorch's
    gradient accumulation, which steps the optimizer once per window and
    leaves params alone in between.
  """
  if not isinstance(tx, optax.GradientTransformation):
    hint = 'If it is a factory, call it.'
    if isinstance(tx, optax.MultiSteps):
      hint = (
        'For an optax.MultiSteps(opt, k), write optax_accum.chain('
        'optax_accum.accumulate(k), opt), or pass '
        'tx.gradient_transformation().'
      )
    raise TypeError(
      '`tx` must be an optax.GradientTransformation such as '
      f'optax_accum.chain(optax_accum.accumulate(k), optax.adamw(1e-3)), but '
      f'got {tx!r} of type {type(tx).__name__}. {hint}'
    )
  acc = _accumulate.accumulator_of(tx)
  if acc is not None:
    return acc.apply(grads, opt_state, params, **extra_args)  # type: ignore[arg-type,return-value]
  gated = _chain.chain_of(tx)
  if gated is not None:
    return gated.apply(grads, opt_state, params, **extra_args)
  _accumulate.check_accumulator_args(extra_args, opt_state)
  _validate.check_extra_args(extra_args)  # a misspelt weight, unread
  _check_not_chainable_with_state(opt_state)
  unreduced = set().union(
    *(_deferral.unreduced_axes(g) for g in jax.tree.leaves(grads))
  )
  if unreduced and not _accumulate.accumulate_states(opt_state):
    raise ValueError(
      f'The gradients are typed unreduced over {sorted(unreduced)} (each '
      "device's part of the sum), and `tx` holds no accumulator to reduce "
      'them: use optax_accum.chain(optax_accum.accumulate(k, axis_name='
      f'{_deferral.shown(sorted(unreduced))!r}), opt), or reduce them '
      'first with jax.reshard(g, P(...)).'
    )
  updates, opt_state = optax.with_extra_args_support(tx).update(
    grads, opt_state, params, **extra_args
  )
  return optax.apply_updates(params, updates), opt_state


def _chain_keys(node) -> Optional[list[Any]]:
  """The element keys of ``optax.chain``'s tuple or ``optax.named_chain``'s
  OrderedDict state, or None for any other node."""
  if type(node) is tuple:
    return list(range(len(node)))
  if type(node) is collections.OrderedDict:
    return list(node)
  return None


def _check_not_chainable_with_state(opt_state) -> None:
  """Raises where an accumulator sits in an ``optax.chain`` (or
  ``optax.named_chain``) with elements after it: the chainable form, in
  which those elements run on every mini-step (on zero updates: Adam's
  moments decay, weight decay applies, schedules count micro-batches; a
  second accumulator sums a window of zeros).

  Where the state alone says so: at the top of ``tx`` (which is not an
  ``optax_accum`` optimizer, so its tuple is ``optax.chain``'s), and at any
  depth where a bare :class:`AccumulateState` has elements after it
  (``optax_accum.chain`` folds those into the accumulator, so only
  ``optax.chain`` leaves them there). Deeper, a wrapped accumulator with
  elements after it may be ``optax_accum.chain``'s gated form.
  """
  message = (
    "`tx` holds an optax.chain whose element {here!r} accumulates and whose "
    "element(s) {later} come after it: in this chainable form they run on "
    "every mini-step, on zero updates, so moments decay, weight decay "
    "applies, schedules count micro-batches and a later accumulator sums "
    "zeros. Write the chain with optax_accum.chain(...) (the exact form); "
    "for several accumulators over different params, put them under one "
    "optax.partition; to keep the chainable form, call tx.update and "
    "optax.apply_updates."
  )
  keys = _chain_keys(opt_state)
  if keys is not None:
    holders = [k for k in keys if _accumulate.accumulate_states(opt_state[k])]
    if holders and holders[0] != keys[-1]:
      here = holders[0]
      later = keys[keys.index(here) + 1 :]
      raise ValueError(message.format(here=here, later=later))
  is_acc = lambda x: isinstance(x, _accumulate.AccumulateState)
  for path, leaf in jax.tree.leaves_with_path(opt_state, is_leaf=is_acc):
    if not is_acc(leaf) or not path:
      continue
    node = opt_state
    for entry in path[:-1]:
      node = _chain.child(node, entry)
    keys = _chain_keys(node)
    here = getattr(path[-1], 'idx', getattr(path[-1], 'key', None))
    if keys is not None and here != keys[-1]:
      later = keys[keys.index(here) + 1 :]
      raise ValueError(message.format(here=here, later=later))
