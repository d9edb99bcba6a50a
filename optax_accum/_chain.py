"""``chain``: ``optax.chain`` whose elements after an accumulator run once
per gradient step, by construction."""

import dataclasses
import functools
from typing import Optional

import optax

from optax_accum import _accumulate
from optax_accum import _call_checks
from optax_accum import _checks
from optax_accum import _state
from optax_accum._errors import fail


@dataclasses.dataclass(frozen=True)
class Chain:
  """Elements run on every micro-batch (``head``), then an accumulator
  (None: ``optax.chain`` of the head). The state is ``optax.chain``'s
  tuple of the elements' states."""

  head: tuple[optax.GradientTransformationExtraArgs, ...]
  acc: Optional[_accumulate.Accumulator]

  def transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(self.init, self.update)  # type: ignore

  def init(self, params):
    """The elements' states, as a tuple; refuses a hidden chainable form."""
    states = tuple(t.init(params) for t in self.head)
    for i, s in enumerate(states):
      chainable = _state.holds_chainable_form(s)
      _call_checks.no_chainable_form(chainable, f'transforms[{i}]')
      if self.acc and _state.accumulate_states(s, _state.ACCUMULATORS):
        fail(ValueError, f'transforms[{i}]', 'an accumulator before one')
    if self.acc is None:
      return states
    return (*states, self.acc.init(params))

  def update(self, updates, state, params=None, **extra_args):
    """One mini-step through every element; see :func:`optax_accum.chain`."""
    return self._run(updates, state, params, extra_args, _accumulate.UPDATE)

  def apply(self, updates, state, params, **extra_args):
    """One mini-step that also applies: ``(params, state)``."""
    return self._run(updates, state, params, extra_args, _accumulate.APPLY)

  def _run(self, updates, state, params, extra_args, output):
    size = len(self.head) + (self.acc is not None)
    if not (type(state) is tuple and len(state) == size):  # pylint: disable=unidiomatic-typecheck
      fail(TypeError, 'state', f'a {type(state).__name__}; use tx.init(params)')
    holds = self.acc is not None or bool(_state.accumulate_states(state))
    _call_checks.keywords_read(extra_args, holds)
    if self.head and extra_args.get('sq_norms') is not None:  # of raw grads
      fail(ValueError, 'sq_norms', 'with elements before the accumulator')
    new_state = list(state)
    for i, t in enumerate(self.head):
      updates, new_state[i] = t.update(updates, state[i], params, **extra_args)
    if self.acc is None:
      return output.step(updates, params), tuple(new_state)
    weight = extra_args.pop('weight', None)
    flush = extra_args.pop('flush', None)
    args = (weight, flush, extra_args, output)
    out, new_state[-1] = self.acc.mini_step(updates, state[-1], params, *args)
    return out, tuple(new_state)


chain_of = functools.partial(_accumulate.owner_of, cls=Chain)


def chain(
  *transforms: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Chains transformations like ``optax.chain``; those after an
  accumulator run once per gradient step, on the window's mean.

  ``chain(a, accumulate(k), b, c)`` is ``optax.chain(a, accumulate(k,
  optax.chain(b, c)))``: ``a`` runs on every micro-batch gradient, ``b``
  and ``c`` once per gradient step. Only an accumulator that is an element
  itself is folded; an element hiding a chainable-form one
  (``optax.masked(accumulate(k), ...)``) is refused at ``init``.

  Args:
    *transforms: ``optax.GradientTransformation`` instances, at most one
      of them an ``accumulate(...)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state an
    :class:`optax_accum.AccumulateState` with the accumulator first (the
    later elements' in ``inner_opt_state``), else ``optax.chain``'s tuple.

  Raises:
    TypeError: an element is not a ``GradientTransformation``.
    ValueError: two accumulators; elements before one with ``axis_name``
      (they would see each device's part of a gradient); at ``init``, an
      element hiding a chainable-form one. ``.argument`` names it.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.chain(  # clip and adamw: once per gradient step
    ...     optax_accum.accumulate(4), optax.clip_by_global_norm(1.0),
    ...     optax.adamw(1e-3))
    >>> params = {'w': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)

  References:
    ``optax.apply_every``'s documented trap (other states update each step).
  """
  for i, t in enumerate(transforms):
    _checks.transformation(t, f'transforms[{i}]')
  accumulators = [_accumulate.accumulator_of(t) for t in transforms]
  positions = [i for i, a in enumerate(accumulators) if a is not None]
  if len(positions) > 1:
    second = f'transforms[{positions[1]}]'
    fail(ValueError, second, 'a second accumulator; use accumulate(k1 * k2)')
  if not positions:
    head = tuple(optax.with_extra_args_support(t) for t in transforms)
    return Chain(head, None).transformation()
  (i,) = positions
  acc = _accumulate.accumulator_of(transforms[i])
  assert acc is not None
  after = ([] if acc.inner is None else [acc.inner]) + list(transforms[i + 1 :])
  if i == 0 and len(transforms) == 1:
    return transforms[0]  # type: ignore
  if after:
    inner = after[0] if len(after) == 1 else optax.chain(*after)
    acc = dataclasses.replace(acc, inner=inner)
  if i == 0:
    return acc.transformation()
  if acc.names is not None:
    fail(ValueError, 'transforms[0]', 'before an accumulator with axis_name')
  head = tuple(optax.with_extra_args_support(t) for t in transforms[:i])
  return Chain(head, acc).transformation()
