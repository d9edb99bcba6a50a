"""Gradient accumulation over micro-batches: `accumulate` and its state."""

from collections.abc import Callable
import numbers
from typing import Any, NamedTuple, Optional, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from optax_accum import _accumulator
from optax_accum import _checkpoint_registry

ScheduleLike = Union[int, Callable[[jax.Array], jax.typing.ArrayLike]]


class AccumulateState(NamedTuple):
  """State of the transformation returned by :func:`optax_accum.accumulate`.

  Attributes:
    mini_step: int32 scalar, the number of micro-batches accepted into the
      current window (0 after an emitting mini-step); with ``axis_name``,
      every micro-batch, accepted or not.
    gradient_step: int32 scalar, the number of updates emitted so far. The
      ``every_k_schedule`` is evaluated on it.
    every_k: int32 scalar, the k of the current window,
      ``every_k_schedule(gradient_step)``; a restore checks it
      (:func:`optax_accum.restore_checkpoint`).
    acc_grads: pytree shaped like the params, ``sum_i w_i g_i`` over the
      accepted micro-batches of the current window, in the accumulator dtype
      (bfloat16 in the ``"kahan_bfloat16"`` mode).
      When ``mini_step`` is 0 the window is empty and ``acc_grads`` still
      holds the sum of the window emitted last (zeros after ``init``); the
      next micro-batch overwrites it in the same pass that would add to it,
      so the reset costs no memory pass of its own.
    acc_compensation: ``None``, or in the ``"kahan_bfloat16"`` mode a
      bfloat16 pytree shaped like ``acc_grads`` holding Kahan's running
      error term; the window's sum is ``acc_grads - acc_compensation``.
    acc_weight: float32 scalar, ``sum_i w_i`` over the accepted micro-batches
      of the current window (the number of micro-batches when no ``weight``
      is passed).
    has_updated: bool scalar, true when the last mini-step emitted an update.
    num_rejected: int32 scalar, micro-batches rejected by
      ``should_skip_update_fn`` since ``init``.
    grad_norm: float32 scalar, the global L2 norm of the last emitted mean
      gradient (before the inner optimizer); 0 before the first emission.
    skip_state: the pytree returned by ``should_skip_update_fn`` for the last
      micro-batch (``()`` without one), as in :class:`optax.MultiStepsState`.
    inner_opt_state: the state of the inner optimizer (``optax.EmptyState()``
      in the chainable form, ``inner=None``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_accum
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
  acc_compensation: Optional[optax.Updates]
  acc_weight: jax.Array
  has_updated: jax.Array
  num_rejected: jax.Array
  grad_norm: jax.Array
  skip_state: Any
  inner_opt_state: Any


class _Accumulate(optax.GradientTransformationExtraArgs):
  """An `accumulate(...)` transformation; `optax_accum.chain` recognises it.

  It is a plain `(init, update)` pair like any optax transformation; the
  instance also carries `with_inner`, which rebuilds the same accumulator
  around another inner optimizer.
  """


def _check_every_k_schedule(every_k_schedule: ScheduleLike):
  """Returns a `gradient_step -> int32 k` function; raises on bad input."""
  if callable(every_k_schedule):
    k0 = every_k_schedule(jnp.zeros([], jnp.int32))
    if jnp.shape(k0) != ():
      raise ValueError(
          '`every_k_schedule` must return a scalar, but every_k_schedule(0) '
          f'returned shape {jnp.shape(k0)}.'
      )
    if not isinstance(k0, jax.core.Tracer) and not bool(np.asarray(k0) >= 1):
      raise ValueError(
          '`every_k_schedule` must return a number of mini-steps >= 1, but '
          f'every_k_schedule(0) returned {k0!r}.'
      )

    def schedule(gradient_step):
      k = jnp.asarray(every_k_schedule(gradient_step))
      if not jnp.issubdtype(k.dtype, jnp.integer):
        k = jnp.round(k)
      return k.astype(jnp.int32)

    return schedule
  if isinstance(every_k_schedule, bool) or not isinstance(
      every_k_schedule, numbers.Integral
  ):
    raise TypeError(
        '`every_k_schedule` must be a positive int or a callable '
        f'`gradient_step -> k`, but got {every_k_schedule!r} of type '
        f'{type(every_k_schedule).__name__}.'
    )
  if every_k_schedule < 1:
    raise ValueError(
        '`every_k_schedule` must be >= 1 (the number of micro-batches per '
        f'gradient step), but got {every_k_schedule!r}.'
    )
  k = int(every_k_schedule)
  return lambda gradient_step: jnp.asarray(k, jnp.int32)


def _check_updates(updates, acc_grads):
  """Raises a ValueError naming the mismatch between updates and state."""
  got, want = jax.tree.structure(updates), jax.tree.structure(acc_grads)
  if got != want:
    raise ValueError(
        'The updates passed to accumulate(...).update do not have the '
        'structure of the params given to init. This is because the '
        'accumulator holds one array per parameter.\n'
        f'updates structure: {got}\nstate structure:   {want}'
    )
  for (path, u), a in zip(
      jax.tree.leaves_with_path(updates), jax.tree.leaves(acc_grads)
  ):
    if jnp.shape(u) != jnp.shape(a):
      raise ValueError(
          f'The update at {jax.tree_util.keystr(path)} has shape '
          f'{jnp.shape(u)}, but the accumulator (built from the params given '
          f'to init) has shape {jnp.shape(a)}.'
      )


def _check_weight(weight):
  """Returns the weight as a float32 scalar; raises on bad concrete input."""
  if weight is None:
    return None
  if jnp.shape(weight) != ():
    raise ValueError(
        '`weight` must be a scalar (the number of items the micro-batch '
        f'gradient averages over), but got shape {jnp.shape(weight)}.'
    )
  if not isinstance(weight, jax.core.Tracer):
    value = np.asarray(weight)
    if not np.isfinite(value) or value < 0:
      raise ValueError(
          f'`weight` must be a finite number >= 0, but got {weight!r}.'
      )
    return jnp.asarray(weight, jnp.float32)
  # A traced weight cannot raise; a bad one makes the window's update NaN
  # rather than a silently wrong mean.
  weight = jnp.asarray(weight, jnp.float32)
  return jnp.where((weight >= 0) & jnp.isfinite(weight), weight, jnp.nan)


def _no_skip(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.zeros([], jnp.bool_), ()


def _zeros_like_output(out_shape, updates):
  """Zeros with the structure and dtypes of `out_shape`.

  Made with `zeros_like` of the same-shaped incoming update where there is
  one, so the zeros carry its sharding (explicit-sharding meshes type the
  branches of `lax.cond` by sharding too).
  """
  if jax.tree.structure(out_shape) != jax.tree.structure(updates):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

  def zeros(s, g):
    if jnp.shape(g) == s.shape:
      return jnp.zeros_like(g, dtype=s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree.map(zeros, out_shape, updates)


def _strong_types(tree):
  """Gives every array leaf a strong dtype, so jit sees one signature."""

  def strong(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return jnp.asarray(x, dtype=jnp.asarray(x).dtype)
    return x

  return jax.tree.map(strong, tree)


def accumulate(
    every_k_schedule: ScheduleLike,
    inner: Optional[optax.GradientTransformation] = None,
    *,
    accumulator_dtype: Optional[jax.typing.DTypeLike] = None,
    should_skip_update_fn: Optional[optax.ShouldSkipUpdateFunction] = None,
    axis_name: Optional[Union[str, tuple[str, ...]]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates micro-batch gradients and emits their mean every k mini-steps.

  Each call of ``update`` is one mini-step: it adds the micro-batch gradient
  :math:`g_i` (weighted by :math:`w_i`, default 1) into ``acc_grads``. On the
  k-th mini-step of a window it emits

  .. math::
    \bar g = \frac{\sum_{i=1}^{k} w_i g_i}{\sum_{i=1}^{k} w_i}

  and starts a new window. With equal micro-batches of B/k samples and a
  mean-reduced loss, :math:`\bar g` is the gradient of the batch of B, so the
  parameters follow large-batch training.

  Two forms:

  * ``inner=None`` (the chainable form): mid-steps emit exact zeros with the
    structure and dtype of the incoming updates; the k-th mini-step emits
    :math:`\bar g`. Use it in ``optax.chain(accumulate(k), optax.sgd(lr))``.
  * ``inner=opt`` (the exact form): the k-th mini-step emits
    ``opt.update(g_bar, inner_opt_state, params, **extra_args)``; on mid-steps
    the inner update is not computed (a ``lax.cond``) and ``inner_opt_state``
    does not change, so the inner optimizer sees exactly the large-batch
    sequence of gradients. :func:`optax_accum.chain` builds this form from a
    chain.

  .. warning::
    In ``optax.chain(accumulate(k), opt)`` the optimizer after the
    accumulator still runs on every mini-step. Stateless, linear optimizers
    (``optax.sgd`` without momentum) turn the zeros into zero updates and the
    result is exact. A stateful one is not: AdamW decays its moments, advances
    its count and applies weight decay on each mid-step's zeros, so the
    parameters move on mid-steps. Measured here (tests/conftest.py's
    40-sample linear regression, k=5, 10 gradient steps, lr 1e-2), max
    |param - large-batch param| is 0.12 with adam and 0.19 with adamw
    (weight decay 0.1), against 3e-8 for ``accumulate(5, opt)``; on the
    digits CNN of ``benchmarks/train_digits.py`` it is 0.27 after 120 steps.
    Use ``accumulate(k, opt)`` or ``optax_accum.chain(accumulate(k), opt)``
    instead; optax's note on ``optax.apply_every`` describes the same trap.

  Args:
    every_k_schedule: the number of mini-steps (micro-batches) per gradient
      step. A positive Python int, or a callable ``gradient_step -> k`` that
      takes an int32 scalar array (possibly traced) and returns a scalar;
      a float result is rounded to the nearest integer and a result below 1
      acts as 1. Changing k through the schedule never recompiles.
    inner: optional ``optax.GradientTransformation`` applied to the mean on
      the emitting mini-step only. Plain transformations and
      ``GradientTransformationExtraArgs`` are both accepted.
    accumulator_dtype: dtype of ``acc_grads``. ``None`` (default) means, per
      leaf, float32 or the param dtype when it is wider (float64 under
      ``jax_enable_x64``), so bfloat16 and float16 gradients accumulate in
      float32. An explicit floating dtype (float32, float64, bfloat16) is
      used for every leaf. ``"kahan_bfloat16"`` keeps a bfloat16 sum and a
      bfloat16 Kahan error term (4 bytes per param, as float32; see
      ``benchmarks/precision.py`` for its error).
    should_skip_update_fn: optional function with the protocol of
      ``optax.MultiSteps``' (``optax.skip_not_finite``,
      ``optax.skip_large_updates``): ``fn(updates, gradient_step, params) ->
      (bool scalar, skip_state)``. A micro-batch for which it returns true adds
      no gradient, no weight and no mini-step; ``num_rejected`` counts it.
    axis_name: for code inside ``jax.shard_map`` or ``jax.pmap``: the mapped
      axis (or axes) over which data-parallel gradients are reduced, as in
      ``jax.lax.psum``. Callers pass each device's local, unreduced
      micro-batch gradient; the accumulator sums locally and reduces the sum
      and the weight across ``axis_name`` once per gradient step, inside the
      emitting branch (PyTorch's ``no_sync``), so mid-steps run no
      collective. Each device keeps its own ``acc_grads``, so the state is
      per-device (stack it along the mapped axis). With ``axis_name`` a
      rejected micro-batch still counts as a mini-step, so every device
      emits on the same mini-step without communicating; it adds no
      gradient and no weight, and the mean renormalizes over the weight
      accepted on all devices.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``init(params)`` returns
    an :class:`AccumulateState`; its ``update(updates, state, params=None, *,
    weight=None, flush=None, **extra_args)`` takes updates shaped like the
    params (any float dtype) and returns ``(updates, state)``. ``weight`` is a
    non-negative scalar, the number of items (tokens, samples) the micro-batch
    gradient averages over (a traced negative or non-finite weight makes
    that window's update NaN, since it cannot raise); ``flush`` is a bool
    scalar that, when true, emits
    what the window holds now (normalised by its actual weight) and starts a
    new window. A flush of an empty window emits nothing. A window of total
    weight 0 emits a zero mean. Other ``extra_args`` reach ``inner``.

  Raises:
    TypeError: ``every_k_schedule`` is not an int or a callable (a float, a
      bool, ``None``, a string), ``accumulator_dtype`` is not a floating
      dtype nor ``"kahan_bfloat16"``, or a param leaf is not a float array.
    ValueError: ``every_k_schedule`` is below 1; at ``update``, the updates do
      not have the structure and shapes of the params given to ``init``, or a
      concrete ``weight`` is negative, not finite or not a scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_accum
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = optax_accum.accumulate(2, optax.adamw(1e-1))
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([1.0, 1.0])}, state, params)
    >>> u['w']  # mid-step: zeros, adamw not run
    Array([0., 0.], dtype=float32)
    >>> u, state = tx.update({'w': jnp.array([3.0, -1.0])}, state, params)
    >>> bool(optax_accum.has_updated(state)), int(state.gradient_step)
    (True, 1)

  References:
    optax.MultiSteps and optax.apply_every
    (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html);
    token-weighted mean: Hugging Face transformers PR #34191.
  """
  schedule = _check_every_k_schedule(every_k_schedule)
  inner_tx = optax.with_extra_args_support(
      optax.identity() if inner is None else inner
  )
  acc_dtype = _accumulator.canonical_accumulator_dtype(accumulator_dtype)
  skip_fn = _no_skip if should_skip_update_fn is None else should_skip_update_fn

  def init_fn(params):
    acc_grads, acc_compensation = _accumulator.init(params, acc_dtype)
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = skip_fn(
        optax.tree.zeros_like(params), gradient_step, params
    )
    _checkpoint_registry.record(schedule)
    return AccumulateState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=gradient_step,
        every_k=schedule(gradient_step),
        acc_grads=acc_grads,
        acc_compensation=acc_compensation,
        acc_weight=jnp.zeros([], jnp.float32),
        has_updated=jnp.zeros([], jnp.bool_),
        num_rejected=jnp.zeros([], jnp.int32),
        grad_norm=jnp.zeros([], jnp.float32),
        skip_state=_strong_types(skip_state),
        inner_opt_state=_strong_types(inner_tx.init(params)),
    )

  def update_fn(
      updates, state, params=None, *, weight=None, flush=None, **extra_args
  ):
    _check_updates(updates, state.acc_grads)
    weight = _check_weight(weight)
    k = schedule(state.gradient_step)

    skip, skip_state = skip_fn(updates, state.gradient_step, params)
    skip = jnp.asarray(skip)
    if skip.shape != () or skip.dtype != jnp.bool_:
      raise ValueError(
          '`should_skip_update_fn` must return a bool scalar first, but it '
          f'returned dtype {skip.dtype} and shape {skip.shape}.'
      )
    accept = jnp.logical_not(skip)
    step_weight = jnp.ones([], jnp.float32) if weight is None else weight
    acc_weight = state.acc_weight + jnp.where(accept, step_weight, 0.0)
    if axis_name is None:
      mini_step = state.mini_step + accept.astype(jnp.int32)
    else:
      mini_step = state.mini_step + 1
    emit = mini_step >= k
    if flush is not None:
      emit = emit | (jnp.asarray(flush, jnp.bool_) & (mini_step > 0))

    def mean_of(acc_grads, acc_compensation):
      acc_sum = _accumulator.total(acc_grads, acc_compensation)
      total_weight = acc_weight
      if axis_name is not None:  # the one reduction of the gradient step
        acc_sum, total_weight = lax.psum((acc_sum, acc_weight), axis_name)
      scale = jnp.where(total_weight > 0, total_weight, 1.0)
      mean = jax.tree.map(lambda a: a / scale.astype(a.dtype), acc_sum)
      return optax.tree.cast_like(mean, updates)

    def inner_update(mean, inner_state, params):
      return inner_tx.update(mean, inner_state, params, **extra_args)

    out_shape, _ = jax.eval_shape(
        inner_update, updates, state.inner_opt_state, params
    )

    # The sum is formed outside the conditional, in one fused pass that XLA
    # writes in place into the donated accumulator, and the conditional does
    # not return it: a conditional that returns a buffer it also reads gets
    # a full-size copy. The inner state passes through the mid-step branch
    # untouched, which XLA aliases without a copy (benchmarks/step_cost.py).
    # A new window starts from its first accepted micro-batch: the previous
    # window's sum is overwritten in that same pass (`fresh`) rather than
    # zeroed on emission, so the reset costs no pass of its own.
    acc_grads, acc_compensation = _accumulator.add(
        state.acc_grads,
        state.acc_compensation,
        updates,
        weight,
        accept,
        fresh=state.mini_step == 0,
    )

    def emit_branch(acc, inner_state, params, grad_norm):
      del grad_norm
      mean = mean_of(*acc)
      new_updates, new_inner = inner_update(mean, inner_state, params)
      new_inner = jax.tree.map(
          lambda new, old: jnp.asarray(new, dtype=jnp.asarray(old).dtype),
          new_inner,
          inner_state,
      )
      grad_norm = optax.tree.norm(mean).astype(jnp.float32)
      return new_updates, new_inner, grad_norm

    def mid_branch(acc, inner_state, params, grad_norm):
      del acc, params
      return _zeros_like_output(out_shape, updates), inner_state, grad_norm

    new_updates, inner_state, grad_norm = lax.cond(
        emit,
        emit_branch,
        mid_branch,
        (acc_grads, acc_compensation),
        state.inner_opt_state,
        params,
        state.grad_norm,
    )
    gradient_step = jnp.where(
        emit, optax.safe_increment(state.gradient_step), state.gradient_step
    )
    new_state = AccumulateState(
        mini_step=jnp.where(emit, 0, mini_step),
        gradient_step=gradient_step,
        every_k=jnp.where(emit, schedule(gradient_step), k),
        acc_grads=acc_grads,
        acc_compensation=acc_compensation,
        acc_weight=jnp.where(emit, 0.0, acc_weight),
        has_updated=emit,
        num_rejected=state.num_rejected + skip.astype(jnp.int32),
        grad_norm=grad_norm,
        skip_state=_strong_types(skip_state),
        inner_opt_state=inner_state,
    )
    return new_updates, new_state

  tx = _Accumulate(init_fn, update_fn)
  tx.with_inner = lambda new_inner: accumulate(
      every_k_schedule,
      new_inner,
      accumulator_dtype=accumulator_dtype,
      should_skip_update_fn=should_skip_update_fn,
      axis_name=axis_name,
  )
  tx.inner = inner
  return tx


def has_updated(opt_state: Any) -> jax.Array:
  """Tells whether the last mini-step emitted an update.

  Finds the :class:`AccumulateState` anywhere inside ``opt_state`` (a bare
  state, an ``optax.chain`` or :func:`optax_accum.chain` state, a Flax
  ``nnx.Optimizer.opt_state``) and returns its ``has_updated`` flag. Unlike
  ``optax.MultiSteps.has_updated``, which infers it from the counters, the flag
  is stored, so it stays truthful after a rejected micro-batch or a flush.

  Args:
    opt_state: an optimizer state pytree holding at least one
      ``AccumulateState``. With several (nested accumulators), the outermost,
      first in pytree order, is read.

  Returns:
    A bool scalar array, true after a mini-step that emitted an update.

  Raises:
    ValueError: ``opt_state`` holds no ``AccumulateState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_accum
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.1))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> _, state = tx.update(jnp.ones(3), state, params)
    >>> bool(optax_accum.has_updated(state))
    False

  References:
    optax.MultiSteps.has_updated, whose inferred flag misreports after a
    skipped mini-step.
  """
  is_acc = lambda x: isinstance(x, AccumulateState)
  for node in jax.tree.leaves(opt_state, is_leaf=is_acc):
    if is_acc(node):
      flag = node.has_updated
      if hasattr(flag, 'get_value'):  # a Flax nnx.Variable
        flag = flag.get_value()
      return jnp.asarray(flag)
  raise ValueError(
      'has_updated found no AccumulateState in `opt_state` (a '
      f'{type(opt_state).__name__}). Pass the state of an optimizer built '
      'with optax_accum.accumulate or optax_accum.chain.'
  )
