"""``accumulate``: arrive -> add into the sum -> decide whether the window
ends -> one conditional -> next state, for every mini-step. The parallel
layout (``_layout.of``) and what a mini-step returns (:class:`Output`) are
objects decided once, not flags threaded through branches."""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Union

import jax
from jax.core import Tracer
import jax.numpy as jnp
import numpy as np
import optax

from optax_accum import _accumulator
from optax_accum import _call_checks
from optax_accum import _checks
from optax_accum import _layout
from optax_accum import _noise
from optax_accum._errors import fail
from optax_accum._state import ACCUMULATORS
from optax_accum._state import AccumulateState
from optax_accum._state import accumulate_states


class Output(NamedTuple):
  """What a mini-step returns on a gradient step, and when it holds."""

  step: Callable[[Any, Any], Any]
  hold: Callable[[Callable[[], Any], Any], Any]


UPDATE = Output(step=lambda u, p: u, hold=lambda zeros, p: zeros())
APPLY = Output(step=lambda u, p: optax.apply_updates(p, u), hold=lambda z, p: p)


def _strong(tree):
  """Every array leaf with a strong dtype, so branches agree on types."""
  array = lambda x: isinstance(x, (jax.Array, np.ndarray, np.generic))
  strong = lambda x: jnp.asarray(x, jnp.result_type(x)) if array(x) else x
  return jax.tree.map(strong, tree)


class _NoneState(NamedTuple):
  """An exact form's inner state that is None (None marks no inner)."""


def _derived() -> Any:
  return dataclasses.field(init=False, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Accumulator:
  """The configuration of an ``accumulate(...)``, checked at construction;
  its ``init``, ``update`` and ``apply``. All values live in the state."""

  every_k_schedule: Any
  inner: Optional[optax.GradientTransformation] = None
  accumulator_dtype: Any = None
  should_skip_update_fn: Optional[Callable[..., Any]] = None
  axis_name: Any = None
  track_noise_scale: bool = False
  noise_scale_decay: float = 0.95
  schedule: Callable[[jax.Array], jax.Array] = _derived()
  names: Optional[tuple[str, ...]] = _derived()
  inner_tx: Optional[optax.GradientTransformationExtraArgs] = _derived()

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_('schedule', _checks.schedule(self.every_k_schedule))
    _checks.inner(self.inner, lambda t: accumulator_of(t) is not None)
    set_('accumulator_dtype', _checks.accumulator_dtype(self.accumulator_dtype))
    _checks.skip_fn(self.should_skip_update_fn)
    set_('names', _checks.axis_name(self.axis_name))
    track = (self.track_noise_scale, self.noise_scale_decay)
    set_('track_noise_scale', _checks.noise_scale(*track))
    inner = self.inner and optax.with_extra_args_support(self.inner)
    set_('inner_tx', inner)

  def transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(self.init, self.update)  # type: ignore[arg-type]

  def init(self, params: optax.Params) -> AccumulateState:
    """The initial :class:`AccumulateState` for ``params``."""
    names = _layout.init_names(self.names)
    acc_grads, wdtype = _accumulator.init(params, self.accumulator_dtype, names)
    gradient_step = jnp.zeros([], jnp.int32)
    skip_state = None  # None: no should_skip_update_fn
    if self.should_skip_update_fn is not None:
      zeros = optax.tree.zeros_like(params)
      verdict = self.should_skip_update_fn(zeros, gradient_step, params)
      _, skip_state = _checks.skip_result(verdict)
    inner_state = None  # None: the chainable form
    if self.inner_tx is not None:
      inner_state = self._inner_init(params)
      nested = lambda _: bool(accumulate_states(inner_state, ACCUMULATORS))
      _checks.inner(self.inner, nested)  # optax's too: windows miscounted
    value_dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    state = AccumulateState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=gradient_step,
      every_k=self.schedule(gradient_step),
      acc_grads=acc_grads,
      acc_weight=_layout.scalar_zeros(wdtype, names),
      acc_value=_layout.scalar_zeros(value_dtype, names),
      has_updated=jnp.zeros([], jnp.bool_),
      num_rejected=jnp.zeros([], jnp.int32),
      grad_norm=jnp.zeros([], jnp.float32),
      skip_state=_strong(skip_state),
      inner_opt_state=inner_state,
      noise_scale=_noise.init(names) if self.track_noise_scale else None,
      acc_value_weight=_layout.scalar_zeros(wdtype, names),
    )
    leaves = jax.tree.leaves(params)
    axes = frozenset().union(*map(_layout.varying_axes, leaves))
    vary = lambda x: _layout.vary(x, axes)  # a per-device state
    return jax.tree.map(vary, state) if axes else state  # (in shard_map)

  def update(
    self, updates, state, params=None, *, weight=None, flush=None, **extra_args
  ):
    """One mini-step; see :func:`optax_accum.accumulate`."""
    args = (weight, flush, extra_args, UPDATE)
    return self.mini_step(updates, state, params, *args)

  def apply(self, updates, state, params, *, weight=None, flush=None, **kw):
    """One mini-step returning ``(params, state)``, params untouched (and no
    zero updates written) on mid-steps."""
    args = (weight, flush, kw, APPLY)
    return self.mini_step(updates, state, params, *args)

  def mini_step(self, grads, state, params, weight, flush, extra, output):
    """The pipeline: arrive, add, decide, one conditional, next state."""
    given = lambda k, v: v is not None or k not in ('value', 'sq_norms')
    extra = {k: v for k, v in extra.items() if given(k, v)}  # None: not given
    sq_norms = extra.pop('sq_norms', None)
    if sq_norms is not None:
      _call_checks.sq_norms(sq_norms)
    arrived = _call_checks.mini_step(grads, state, params, weight, flush, extra)
    layout = _layout.of(self.names)
    layout.check(state, *arrived)
    if self.inner_tx is not None:  # a state init made for another inner
      like = grads if params is None else params
      made = jax.eval_shape(self._inner_init, like)
      _call_checks.inner_state(state.inner_opt_state, made)
    grads, weight, flush, value = layout.arrive(arrived)
    fresh = state.mini_step == 0
    k = jnp.where(fresh, self.schedule(state.gradient_step), state.every_k)
    sums = _accumulator.add(state, grads, weight, value, fresh, layout)
    noise = state.noise_scale
    if noise is not None:  # handed over (in-step), or this micro-batch's
      if sq_norms is None and not layout.own_weight:  # gradients summed
        fail(ValueError, 'track_noise_scale', 'under plain jit: pass sq_norms')
      own = lambda: _noise.own(_accumulator.sq_norm(grads), weight)
      noise = _noise.add(noise, sq_norms or own(), fresh, layout)
    mini_step = state.mini_step + 1
    end = mini_step >= k if flush is None else (mini_step >= k) | flush
    branch = lambda f: functools.partial(f, layout, output, grads, extra, state)
    ended, held = branch(self._end_window), branch(self._mid_step)
    out, inner_state, stats = layout.cond(end, ended, held, sums, noise, params)
    stepped, rejected, grad_norm, skip_state, noise = stats
    step = state.gradient_step
    gradient_step = jnp.where(stepped, optax.safe_increment(step), step)
    restart = lambda x: jnp.where(end, jnp.zeros_like(x), x)
    _, acc_weight, acc_value, value_weight = sums
    return out, state._replace(
      mini_step=jnp.where(end, 0, mini_step),
      gradient_step=gradient_step,
      every_k=jnp.where(end, self.schedule(gradient_step), k),
      acc_grads=sums[0],
      acc_weight=restart(acc_weight),
      acc_value=restart(acc_value),
      has_updated=stepped,
      num_rejected=state.num_rejected + rejected.astype(jnp.int32),
      grad_norm=grad_norm,
      skip_state=skip_state,
      inner_opt_state=inner_state,
      noise_scale=noise,
      acc_value_weight=restart(value_weight),
    )

  def _inner_init(self, params):
    inner_state = _strong(self.inner_tx.init(params))  # type: ignore
    return _NoneState() if inner_state is None else inner_state

  def _inner_update(self, mean, inner_state, params, extra):
    if self.inner_tx is None:
      return mean, None
    if isinstance(inner_state, _NoneState):  # an inner whose state is None
      return self.inner_tx.update(mean, None, params, **extra)[0], inner_state  # type: ignore
    updates, new = self.inner_tx.update(mean, inner_state, params, **extra)
    like = lambda new, old: jnp.asarray(new, jnp.result_type(old))
    return updates, jax.tree.map(like, new, inner_state)

  def _end_window(
    self, layout, output, grads, extra, state, sums, noise, params
  ):
    """The branch that ends a window: its one reduction, skip, and the
    gradient step unless the window has weight 0 or is rejected."""
    noise_sums = noise and (noise.acc_sq_norm, noise.acc_count)  # or None
    *sums, noise_sums = layout.reduce((*sums, noise_sums))
    acc_sum, weight, value, value_weight = sums
    stepped = weight != 0  # a window of total weight 0 takes no step
    weight = jnp.where(stepped, weight, jnp.ones_like(weight))
    norm = jnp.sqrt(_accumulator.sq_norm(acc_sum, layout.complete))
    grad_norm = norm.astype(jnp.float32) / weight.astype(jnp.float32)
    rejected, skip_state = jnp.zeros([], jnp.bool_), state.skip_state
    if self.should_skip_update_fn is not None:
      mean = _accumulator.mean(acc_sum, weight, grads)
      verdict = self.should_skip_update_fn(mean, state.gradient_step, params)
      skip, skip_state = layout.agree(verdict)
      rejected = jnp.asarray(skip) & stepped
      stepped = stepped & ~rejected
      skip_state = _strong(skip_state)
    if 'value' in extra:  # weighted mean; NaN where one of w > 0 lacked it
      dtype = _accumulator.promote(jnp.result_type(extra['value']), 'f4')
      value = value / weight.astype(value.dtype)
      value = jnp.where(value_weight == weight, value, jnp.nan)
      extra = {**extra, 'value': value.astype(dtype)}

    def step(inner_state, params, acc_sum, weight):
      # The mean is formed here, where XLA fuses its multiply into the
      # inner update; as an operand it would be written to a temporary.
      mean = _accumulator.mean(acc_sum, weight, grads)
      updates, new_inner = self._inner_update(mean, inner_state, params, extra)
      return output.step(updates, params), new_inner

    hold = functools.partial(self._hold, layout, output, grads, extra)
    operands = (state.inner_opt_state, params, acc_sum, weight)
    out, new_inner = layout.cond(stepped, step, hold, *operands)
    if noise is not None:  # the window's estimates, from the reduced sums
      ends = (noise_sums, grad_norm, weight, stepped, self.noise_scale_decay)
      noise = _noise.end_window(noise, *ends)
    return out, new_inner, (stepped, rejected, grad_norm, skip_state, noise)

  def _mid_step(self, layout, output, grads, extra, state, sums, noise, params):
    """The branch of a mid-step: params untouched (or zero updates)."""
    del sums
    no, inner = jnp.zeros([], jnp.bool_), state.inner_opt_state
    out, inner = self._hold(layout, output, grads, extra, inner, params)
    return out, inner, (no, no, state.grad_norm, state.skip_state, noise)

  def _hold(self, layout, output, grads, extra, inner_state, params, *_):
    """No gradient step: ``output.hold`` and the inner state untouched."""

    def zeros():
      if not any(isinstance(g, Tracer) for g in jax.tree.leaves(grads)):
        # Eager: the inner is not run, even abstractly (its Python runs
        # once per window); its zeros are like what updates add to.
        exact = self.inner_tx is not None and params is not None
        return jax.tree.map(jnp.zeros_like, params if exact else grads)
      reduced = lambda g: jax.tree.map(layout.reduced_like, g)  # abstractly
      run = lambda g, s, p: self._inner_update(reduced(g), s, p, extra)
      shapes, _ = jax.eval_shape(run, grads, inner_state, params)
      if jax.tree.structure(shapes) != jax.tree.structure(grads):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return jax.tree.map(layout.zeros, shapes, grads)

    return output.hold(zeros, params), inner_state


def owner_of(tx: Any, cls: type) -> Any:
  """The ``cls`` (:class:`Accumulator`, ``Chain``) behind ``tx``, or None."""
  owner = getattr(getattr(tx, 'update', None), '__self__', None)
  return owner if isinstance(owner, cls) else None


accumulator_of = functools.partial(owner_of, cls=Accumulator)


def accumulate(
  every_k_schedule: _checks.ScheduleLike,
  inner: Optional[optax.GradientTransformation] = None,
  *,
  accumulator_dtype: Optional[jax.typing.DTypeLike] = None,
  should_skip_update_fn: Optional[optax.ShouldSkipUpdateFunction] = None,
  axis_name: Optional[Union[str, tuple[str, ...]]] = None,
  track_noise_scale: bool = False,
  noise_scale_decay: float = 0.95,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates micro-batch gradients and emits their mean every k mini-steps.

  Each ``update`` is one mini-step: it adds the micro-batch gradient
  :math:`g_i`, weighted by :math:`w_i` (default 1), into ``acc_grads``. The
  k-th emits :math:`\bar g = \sum_i w_i g_i / \sum_i w_i`, the large
  batch's gradient of a mean-reduced loss: ``opt.update(g_bar, ...)`` in the
  exact form ``accumulate(k, opt)`` (mid-steps emit zeros and never run
  ``opt``), :math:`\bar g` itself in the chainable form ``accumulate(k)``.

  .. warning::
    ``optax.chain(accumulate(k), opt)`` runs ``opt`` on every mid-step's
    zeros (Adam drifts); :func:`optax_accum.chain` makes it exact.

  Args:
    every_k_schedule: micro-batches per window, an int in [1, 2**31 - 1] or
      a traceable ``gradient_step -> k`` (rounded; below 1 or NaN means 1).
      A window keeps the k it started with (``AccumulateState.every_k``).
    inner: a transformation run once per window, or None (chainable form).
    accumulator_dtype: None (per leaf float32, complex64 for complex params,
      or wider params' dtype), float32, float64, bfloat16 or complex.
    should_skip_update_fn: ``fn(mean, gradient_step, params) -> (skip,
      skip_state)`` (``optax.MultiSteps``'s), on each window's mean.
    axis_name: the data-parallel mesh axes reduced once per window;
      ``init`` under ``jax.set_mesh``. Under plain ``jax.jit``, gradients
      from ``microbatched_value_and_grad(..., axis_name=...)`` and a global
      ``weight``; in ``jax.shard_map``, each device's own gradient (w.r.t.
      ``lax.pcast(params, axis_name, to='varying')``) and weight.
    track_noise_scale: estimate :func:`optax_accum.gradient_noise_scale`:
      one squared norm per mini-step (per device with ``axis_name``; under
      plain jit on a mesh, the in-step form's ``sq_norms``).
    noise_scale_decay: in [0, 1), the per-window decay of its averages.

  Update keyword arguments:
    weight: the items (tokens) the micro-batch's loss averages over, 0 or
      in [2**-64, 2**64]; 0 adds nothing (even NaN), a window of total 0
      takes no step, a bad traced weight makes the update NaN.
    flush: a bool scalar; true ends the window after this micro-batch.
    value: a real scalar, the loss, with every micro-batch: ``inner``
      (``reduce_on_plateau``) gets their weighted mean (NaN if one of
      weight > 0 lacked it). Other keywords reach ``inner`` as given with
      the last micro-batch.
    sq_norms: for ``track_noise_scale``, the micro-batches' squared norms
      from ``microbatched_value_and_grad(..., sq_norms=True)`` (in-step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AccumulateState`; outside ``jax.jit`` it runs op by op (not
    with ``axis_name`` on a mesh: JAX runs no eager op on unreduced sums).

  Raises:
    TypeError: a wrong type (``inner=optax.adamw``, ``flush=1``, integer
      params or updates). ValueError: a value out of range (k, ``weight``),
      a nested accumulator (``optax.MultiSteps`` too), updates unlike the
      params, a state made for another ``inner``, or unfit for
      ``axis_name``. NameError: no such axis. ``.argument`` names each.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(2, optax.adamw(1e-1))
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([1.0, 1.0])}, state, params)
    >>> u['w']  # mid-step: zeros, adamw not run
    Array([0., 0.], dtype=float32)
    >>> u, state = tx.update({'w': jnp.array([3.0, -1.0])}, state, params)
    >>> int(state.gradient_step)
    1

  References:
    ``optax.MultiSteps``; token-weighted mean: transformers PR #34191;
    deferred reduction: PyTorch DDP ``no_sync``, MaxText PR #5099.
  """
  options = (accumulator_dtype, should_skip_update_fn, axis_name)
  noise = (track_noise_scale, noise_scale_decay)
  return Accumulator(every_k_schedule, inner, *options, *noise).transformation()
