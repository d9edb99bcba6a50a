"""``apply_gradients``: one mini-step that updates and applies."""

from typing import Any

import optax

from optax_accum import _accumulate
from optax_accum import _call_checks
from optax_accum import _chain
from optax_accum import _checks
from optax_accum import _state
from optax_accum._errors import fail


def apply_gradients(
  tx: optax.GradientTransformation,
  grads: optax.Updates,
  opt_state: optax.OptState,
  params: optax.Params,
  **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
  r"""One mini-step of ``tx`` applied to ``params``: ``(params, opt_state)``.

  The numbers of ``tx.update`` then ``optax.apply_updates``; for an
  optimizer built by :func:`optax_accum.accumulate` or
  :func:`optax_accum.chain` the apply happens inside the accumulator's
  conditional (mid-steps leave ``params`` untouched). Any other ``tx``
  holding a chainable-form ``accumulate(k)`` (``optax.chain(accumulate(k),
  opt)``) is refused. Return ``(params, opt_state)`` from a jitted step in
  the order they were donated.

  Args:
    tx: the optimizer, typically ``optax_accum.chain(accumulate(k), opt)``.
    grads: the micro-batch gradient, a pytree shaped like ``params``.
    opt_state: ``tx``'s state.
    params: the params the gradient was taken at.
    **extra_args: ``weight``, ``flush``, ``value`` (see
      :func:`optax_accum.accumulate`) and what ``tx``'s elements take.

  Returns:
    ``(params, opt_state)``, the params unchanged on mid-steps.

  Raises:
    TypeError: ``tx`` not a transformation (a factory, a MultiSteps).
    ValueError: ``params`` None; ``weight``/``flush`` and no accumulator; a
      ``tx`` not built here holding a chainable-form accumulator; those of
      ``tx.update``. Each names its argument (``.argument``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.5))
    >>> params = {'w': jnp.array([1.0, 1.0])}
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p),
    ...                donate_argnums=(0, 1))
    >>> params, state = step(params, state, {'w': jnp.array([1.0, 3.0])})
    >>> params['w']  # mid-step: untouched
    Array([1., 1.], dtype=float32)
    >>> params, state = step(params, state, {'w': jnp.array([3.0, 1.0])})
    >>> params['w']  # 1 - 0.5 * mean
    Array([0., 0.], dtype=float32)

  References:
    ``flax.training.train_state.TrainState.apply_gradients``; PyTorch's
    accumulation loop, which steps the optimizer once per window.
  """
  if params is None:
    fail(ValueError, 'params', 'None; pass those the gradient was taken at')
  runner = _accumulate.accumulator_of(tx) or _chain.chain_of(tx)
  if runner is not None:
    return runner.apply(grads, opt_state, params, **extra_args)
  _checks.transformation(tx, 'tx')
  _call_checks.no_chainable_form(_state.holds_chainable_form(opt_state), 'tx')
  holds = bool(_state.accumulate_states(opt_state))
  _call_checks.keywords_read(extra_args, holds)
  if not holds:  # an accumulator inside warns itself
    _call_checks.misspelt_keywords(extra_args)
  _call_checks.unreduced_without_accumulator(grads, holds)
  try:
    update = optax.with_extra_args_support(tx).update
    updates, opt_state = update(grads, opt_state, params, **extra_args)
  except Exception as e:  # JAX types what touches each device's part
    _call_checks.acted_on_parts(grads, e)
    raise
  return optax.apply_updates(params, updates), opt_state
