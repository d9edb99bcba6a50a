"""`chain`: optax.chain, with everything after the accumulator gated."""

import dataclasses
from typing import Any, Optional

import jax
from jax import lax
import optax

from optax_accum import _accumulate
from optax_accum import _deferral
from optax_accum import _validate

# Wrapper states through which an accumulator's `has_updated` flag tells
# when its whole element emitted: optax.chain's tuple, and the hyperparameter
# injection of optax.inject_hyperparams (all of its updates come from the
# accumulator). Any other wrapper (optax.partition, optax.masked,
# optax.MultiSteps, ...) lets updates through that did not pass the
# accumulator, so gating the elements after it on the flag would drop them.
_GATEABLE_WRAPPERS = (
  optax.InjectHyperparamsState,
  optax.InjectStatefulHyperparamsState,
)


def _path_to_accumulator(state) -> list[Any]:
  """The wrapper nodes from `state` down to its AccumulateState."""
  if isinstance(state, _accumulate.AccumulateState):
    return []
  is_acc = lambda x: isinstance(x, _accumulate.AccumulateState)
  ((path, _),) = [
    (p, x)
    for p, x in jax.tree.leaves_with_path(state, is_leaf=is_acc)
    if is_acc(x)
  ]
  nodes, node = [], state
  for entry in path:
    nodes.append(node)
    node = child(node, entry)
  return nodes


def child(node, entry):
  """The child of a pytree node at one entry of a `jax.tree` key path."""
  for attr in ('idx', 'key'):
    if hasattr(entry, attr):
      return node[getattr(entry, attr)]
  return getattr(node, entry.name)


def _is_chain_state(node) -> bool:
  """optax.chain's tuple or optax.named_chain's dict of states."""
  return type(node) is tuple or isinstance(node, dict)  # pylint: disable=unidiomatic-typecheck


def _is_gateable(nodes) -> bool:
  return all(
    _is_chain_state(n) or isinstance(n, _GATEABLE_WRAPPERS) for n in nodes
  )


def _elements_after_in_a_nested_chain(state) -> bool:
  """Whether a chain state around the accumulator has elements after it."""
  if isinstance(state, _accumulate.AccumulateState):
    return False
  is_acc = lambda x: isinstance(x, _accumulate.AccumulateState)
  ((path, _),) = [
    (p, x)
    for p, x in jax.tree.leaves_with_path(state, is_leaf=is_acc)
    if is_acc(x)
  ]
  node: Any = state
  for entry in path:
    if not (_is_chain_state(node) or isinstance(node, _GATEABLE_WRAPPERS)):
      return False  # inside partition, masked, ...: not a chain's order
    if _is_chain_state(node):
      keys = list(range(len(node))) if type(node) is tuple else list(node)
      here: Any = getattr(entry, 'idx', getattr(entry, 'key', None))
      if keys.index(here) < len(keys) - 1:
        return True
    node = child(node, entry)
  return False


def _hidden_accumulator_index(transforms, states) -> int:
  """Index of the one element whose state holds an AccumulateState, or -1.

  Raises:
    ValueError: several accumulators, or one that cannot gate the elements
      after it.
  """
  holders = [
    i for i, s in enumerate(states) if _accumulate.accumulate_states(s)
  ]
  if len(holders) > 1:
    raise ValueError(
      'optax_accum.chain takes at most one accumulate(...), but its '
      f'elements at positions {holders} hold one each. This is because the '
      'elements after an accumulator run once per gradient step, which '
      'two windows would not agree on. Use one accumulate(k1 * k2, ...).'
    )
  if not holders:
    return -1
  (i,) = holders
  count = len(_accumulate.accumulate_states(states[i]))
  if count == 1 and _elements_after_in_a_nested_chain(states[i]):
    raise ValueError(
      f'optax_accum.chain element {i} is an optax.chain (or named_chain) '
      'with elements after its accumulate(...): optax.chain runs them on '
      "every mini-step's zeros, so a stateful one drifts. Flatten it: "
      'optax_accum.chain(..., optax_accum.accumulate(k), opt), or write '
      'optax_accum.accumulate(k, opt).'
    )
  if i == len(transforms) - 1:
    return i  # nothing after it to gate
  if count > 1:
    raise ValueError(
      f'optax_accum.chain element {i} holds {count} accumulate(...) '
      'transformations, so the elements after it cannot be gated on one '
      'window. Move the later elements into each accumulator, e.g. '
      'optax.partition({"a": optax_accum.chain(accumulate(k), '
      'optax.adam(lr)), ...}).'
    )
  nodes = _path_to_accumulator(states[i])
  if not _is_gateable(nodes):
    wrapper = next(
      type(n).__name__
      for n in nodes
      if not (_is_chain_state(n) or isinstance(n, _GATEABLE_WRAPPERS))
    )
    raise ValueError(
      f'optax_accum.chain element {i} holds an accumulate(...) inside a '
      f'{wrapper}, so the elements after it cannot be gated on its '
      'window: part of the updates bypasses the accumulator, and running '
      'the later elements on every mini-step would drift. Put the '
      'accumulator at the top level, e.g. optax_accum.chain(accumulate(k), '
      'optax.partition(...)), or move the later elements inside the '
      'wrapper, e.g. optax.partition({"a": optax_accum.chain(accumulate(k),'
      ' optax.adam(lr)), ...}).'
    )
  return i


@dataclasses.dataclass(frozen=True)
class Chain:
  """``optax.chain`` that gates the elements after an accumulator.

  :func:`optax_accum.chain` returns ``GradientTransformationExtraArgs(c.init,
  c.update)`` for an instance ``c`` when the accumulator is not first (or is
  wrapped in an element); :func:`optax_accum.apply_gradients` finds it from
  ``tx.update.__self__``. The elements after the element holding the
  accumulator run under a ``lax.cond`` on its ``has_updated`` flag.
  """

  transforms: tuple[optax.GradientTransformation, ...]

  def transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  def _txs(self):
    return [optax.with_extra_args_support(t) for t in self.transforms]

  def init(self, params):
    """The states of the elements, as ``optax.chain``'s tuple."""
    states = tuple(t.init(params) for t in self._txs())
    _hidden_accumulator_index(self.transforms, states)
    return states

  def update(self, updates, state, params=None, **extra_args):
    """One mini-step through every element; see :func:`optax_accum.chain`."""
    return self._dispatch(updates, state, params, extra_args, apply=False)

  def apply(self, updates, state, params, **extra_args):
    """One mini-step that also applies the update: ``(params, state)``."""
    return self._dispatch(updates, state, params, extra_args, apply=True)

  def _dispatch(self, updates, state, params, extra_args, apply):
    if not (
      isinstance(state, (tuple, list))
      and not hasattr(state, '_fields')  # a NamedTuple: one element's state
      and len(state) == len(self.transforms)
    ):
      raise TypeError(
        'optax_accum.chain(...).update takes the state made by its init, a '
        f'tuple of the {len(self.transforms)} elements\' states, but got '
        f'{_shown_state(state)}: the state of another optimizer? Make it '
        'with tx.init(params), or restore a checkpoint into '
        'jax.eval_shape(tx.init, params).'
      )
    # Concrete weights and flushes are checked here, where they can raise.
    extra_args = dict(extra_args)
    _accumulate.check_accumulator_args(extra_args, state)
    if _accumulate.accumulate_states(state):  # warned on every call
      _validate.check_extra_args(extra_args)
    if extra_args.get('weight') is not None:
      extra_args['weight'] = _validate.check_weight(extra_args['weight'])
    if extra_args.get('flush') is not None:
      extra_args['flush'] = _validate.check_flush(extra_args['flush'])
    if _accumulate.is_eager(self, (updates, state, params, extra_args)):
      # One compilation per input signature, shared by all calls.
      return _accumulate.jitted(self, '_run', apply)(
        updates, state, params, extra_args
      )
    return self._run(updates, state, params, extra_args, apply)

  def _run(self, updates, state, params, extra_args, apply):
    txs = self._txs()
    last = len(txs) - 1
    j = _hidden_accumulator_index(self.transforms, state)
    new_state = list(state)
    head = txs if j < 0 else txs[:j]
    if head and j >= 0:
      _check_nothing_before_a_deferral(updates, state[j], len(head))
    for i, t in enumerate(head):
      updates, new_state[i] = t.update(updates, state[i], params, **extra_args)
    if j < 0:
      if apply:
        return optax.apply_updates(params, updates), tuple(new_state)
      return updates, tuple(new_state)
    acc = _accumulate.accumulator_of(txs[j])
    if j == last and acc is not None:
      run = acc.apply if apply else acc.update
      out, new_state[j] = run(updates, state[j], params, **extra_args)
      return out, tuple(new_state)
    updates, new_state[j] = txs[j].update(
      updates, state[j], params, **extra_args
    )
    if j == last:
      if apply:
        return optax.apply_updates(params, updates), tuple(new_state)
      return updates, tuple(new_state)
    (acc_state,) = _accumulate.accumulate_states(new_state[j])
    rest = txs[j + 1 :]
    rest_extra = dict(extra_args)
    if 'value' in extra_args:  # the window's weighted mean, as for inner
      value = acc_state.acc_value
      names = tuple(sorted(_deferral.unreduced_axes(value)))
      if names:  # an unreduced accumulator's slot: one scalar reduction
        value = _deferral.Deferral(names, _deferral.mode_of(names)).reduce(
          value
        )
      rest_extra['value'] = value.astype(
        _accumulate.value_dtype(extra_args['value'])
      )

    def run_rest(updates, rest_states, params):
      rest_states = list(rest_states)
      for i, t in enumerate(rest):
        updates, rest_states[i] = t.update(
          updates, rest_states[i], params, **rest_extra
        )
      if apply:
        return optax.apply_updates(params, updates), tuple(rest_states)
      return updates, tuple(rest_states)

    if not apply:
      out_shape, _ = jax.eval_shape(run_rest, updates, state[j + 1 :], params)

    def skip_rest(updates, rest_states, params):
      if apply:
        return params, rest_states
      return _accumulate._zeros_like_output(out_shape, updates), rest_states  # pylint: disable=protected-access

    out, rest_states = lax.cond(
      acc_state.has_updated,
      run_rest,
      skip_rest,
      updates,
      tuple(state[j + 1 :]),
      params,
    )
    return out, tuple(new_state[: j + 1]) + tuple(rest_states)


def _shown_state(state) -> str:
  if type(state) in (tuple, list):
    return f'a {type(state).__name__} of {len(state)}'
  name = type(state).__name__
  return f'{"an" if name[:1] in "AEIOU" else "a"} {name}'


def _check_nothing_before_a_deferral(updates, acc_element_state, n) -> None:
  """Raises where elements before an accumulator that defers the reduction
  would see each device's part of a gradient."""
  acc_states = _accumulate.accumulate_states(acc_element_state)
  acc = jax.tree.leaves(acc_states[0].acc_grads) if acc_states else []
  deferred = set().union(*(_deferral.unreduced_axes(a) for a in acc))
  parts = set().union(
    *(
      _deferral.unreduced_axes(g) | _deferral.varying_axes(g)
      for g in jax.tree.leaves(updates)
    )
  )
  if deferred & parts:
    raise ValueError(
      f'The accumulator defers the reduction over {sorted(deferred)}, so '
      "each device's gradient is only its part of the sum, but "
      f'{n} chain element(s) run before the accumulator, on every '
      'micro-batch, and would act on that part (a norm, a clip, a decay). '
      "Put them after the accumulator, where they act on the window's "
      'reduced mean: chain(accumulate(k, axis_name=...), clip, opt).'
    )


def chain_of(tx: Any) -> Optional[Chain]:
  """The :class:`Chain` behind ``tx``, or None."""
  owner = getattr(getattr(tx, 'update', None), '__self__', None)
  return owner if isinstance(owner, Chain) else None


def chain(
  *transforms: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Chains transformations like ``optax.chain``, running those after the
  accumulator only on the mini-steps that take a gradient step.

  ``chain(a, accumulate(k), b, c)`` is ``optax.chain(a, accumulate(k,
  optax.chain(b, c)))``: ``a`` runs on every micro-batch gradient, ``b`` and
  ``c`` once per gradient step on the window's mean, as on the large batch.
  ``chain(accumulate(k, b), c)`` is ``accumulate(k, optax.chain(b, c))``.

  An accumulator wrapped in an element (``optax.chain(clip,
  accumulate(k))``, ``optax.inject_hyperparams(accumulate)(k)``) is found
  at ``init`` from its state; the elements after it run under a
  ``lax.cond`` on its ``has_updated`` flag (zeros otherwise), which is
  exact too. Without an accumulator it is ``optax.chain(*transforms)``.

  Schedules injected with ``optax.inject_hyperparams`` count the calls of
  what they wrap: wrap the optimizer after the accumulator
  (``chain(accumulate(k), optax.inject_hyperparams(optax.adamw)(...))``),
  whose calls are gradient steps, not the whole chain, whose calls are
  micro-batches.

  Args:
    *transforms: ``optax.GradientTransformation`` instances, at most one
      accumulator among them.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. With the accumulator first
    its state is an :class:`optax_accum.AccumulateState` whose
    ``inner_opt_state`` holds the states of the elements after it (one
    state, or an ``optax.chain`` tuple); otherwise a tuple of the elements'
    states, as ``optax.chain``. Extra args (``weight``, ``flush``, ...)
    reach every element.

  Raises:
    TypeError: an element is not a ``GradientTransformation`` instance.
    ValueError: more than one accumulator (at construction, or at ``init``
      for wrapped ones); at ``init``, an accumulator inside a wrapper that
      lets updates bypass it (``optax.partition``, ``optax.masked``,
      ``optax.MultiSteps``) with elements after it. The message says what
      to write instead.

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
      hint = ''
      if hasattr(t, 'gradient_transformation'):
        hint = ' Pass its .gradient_transformation().'
      elif callable(t):
        hint = ' If it is a factory such as optax.adam, call it.'
      raise TypeError(
        f'chain element {i} must be an optax.GradientTransformation, but '
        f'got {t!r} of type {type(t).__name__}.{hint}'
      )
  positions = [
    i
    for i, t in enumerate(transforms)
    if _accumulate.accumulator_of(t) is not None
  ]
  if len(positions) > 1:
    raise ValueError(
      'chain takes at most one optax_accum.accumulate(...) element, but got '
      f'{len(positions)} at positions {positions}. This is because each '
      'element after an accumulator already runs once per gradient step.'
    )
  if not positions:
    return Chain(tuple(transforms)).transformation()
  (i,) = positions
  acc = _accumulate.accumulator_of(transforms[i])
  assert acc is not None
  after = list(transforms[i + 1 :])
  if acc.inner is not None:
    after.insert(0, acc.inner)
  if not after:
    gated = transforms[i]
  else:
    gated = acc.with_inner(after[0] if len(after) == 1 else optax.chain(*after))
  if i == 0:
    return optax.with_extra_args_support(gated)
  return Chain((*transforms[:i], gated)).transformation()
