"""`chain`: optax.chain, with everything after the accumulator gated."""

import optax

from optax_accum import _accumulate


def chain(
    *transforms: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Chains transformations like ``optax.chain``, running those after the
  accumulator only on the emitting mini-step.

  ``chain(a, accumulate(k), b, c)`` is ``optax.chain(a, accumulate(k,
  optax.chain(b, c)))``: ``a`` runs on every micro-batch gradient, ``b`` and
  ``c`` run once per gradient step on the accumulated mean, exactly as they
  would on the large batch. So ``chain(accumulate(5), optax.adamw(1e-3))`` is
  exact where ``optax.chain(accumulate(5), optax.adamw(1e-3))`` lets AdamW
  drift on the mid-step zeros (see :func:`optax_accum.accumulate`). An
  ``accumulate(k, inner)`` element keeps its inner optimizer first:
  ``chain(accumulate(k, b), c)`` is ``accumulate(k, optax.chain(b, c))``.
  Without an accumulate element it is ``optax.chain(*transforms)``.

  Args:
    *transforms: ``optax.GradientTransformation`` or
      ``GradientTransformationExtraArgs`` objects, at most one of them made by
      :func:`optax_accum.accumulate`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. When the accumulator comes
    first its state is an :class:`optax_accum.AccumulateState`; otherwise it
    is a tuple of the states of the elements before the accumulator, then the
    ``AccumulateState``. The ``inner_opt_state`` of that holds the states of
    the elements after it (one state for one element, an ``optax.chain``
    tuple for several). Extra args (``weight``, ``flush``, and
    any the elements take) reach every element, as in ``optax.chain``.

  Raises:
    ValueError: more than one element is an ``accumulate(...)``.
    TypeError: an element is not a ``GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_accum
    >>> tx = optax_accum.chain(
    ...     optax.clip_by_global_norm(1.0),  # every micro-batch
    ...     optax_accum.accumulate(4),
    ...     optax.adamw(1e-3),  # once per gradient step
    ... )
    >>> params = {'w': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)

  References:
    The trap it closes is documented under ``optax.apply_every`` ("the states
    of the other transformations will still be updated at every step").
  """
  for i, t in enumerate(transforms):
    if not isinstance(t, optax.GradientTransformation):
      raise TypeError(
          f'chain element {i} must be an optax.GradientTransformation, but '
          f'got {t!r} of type {type(t).__name__}.'
      )
  positions = [
      i for i, t in enumerate(transforms) if isinstance(t, _accumulate._Accumulate)
  ]
  if not positions:
    return optax.chain(*transforms)
  if len(positions) > 1:
    raise ValueError(
        'chain takes at most one optax_accum.accumulate(...) element, but got '
        f'{len(positions)} at positions {positions}. This is because each '
        'element after an accumulator already runs once per gradient step.'
    )
  (i,) = positions
  acc = transforms[i]
  after = list(transforms[i + 1:])
  if acc.inner is not None:
    after.insert(0, acc.inner)
  if not after:
    gated = acc
  else:
    gated = acc.with_inner(after[0] if len(after) == 1 else optax.chain(*after))
  if i == 0:
    return gated
  return optax.chain(*transforms[:i], gated)
