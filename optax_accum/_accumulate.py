"""Gradient accumulation over micro-batches: `accumulate` and its state."""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Union

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from optax_accum import _accumulator
from optax_accum import _deferral
from optax_accum import _validate
from optax_accum._validate import ScheduleLike
from optax_accum._validate import Tracer


class AccumulateState(NamedTuple):
  """State of the transformation returned by :func:`optax_accum.accumulate`.

  Attributes:
    mini_step: int32 scalar, the number of micro-batches accepted into the
      current window (0 when no window is in flight); with ``axis_name``,
      every micro-batch, accepted or not.
    gradient_step: int32 scalar, the number of gradient steps taken (windows
      that ran the inner optimizer). The ``every_k_schedule`` is evaluated
      on it.
    every_k: int32 scalar, the k of the window in flight, fixed when its
      first micro-batch arrives, so a window always ends with the k it
      started with, also after a restore into an optimizer with another
      schedule. With no window in flight, the k that the schedule of the
      optimizer that wrote the state gives for the next one (a window takes
      the k of the optimizer that runs it when it starts).
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
    acc_value: float32 scalar (float64 under x64), ``sum_i w_i value_i``
      over the accepted micro-batches of the window in flight when
      ``update`` is passed a ``value`` (the loss, read by
      ``optax.contrib.reduce_on_plateau``);
      after a mini-step that ends a window, that window's weighted mean
      value (what the elements after the accumulator get); 0 without
      ``value``.
    has_updated: bool scalar, true when the last mini-step took a gradient
      step (ran the inner optimizer on a window's mean).
    num_rejected: int32 scalar, micro-batches rejected by
      ``should_skip_update_fn`` since ``init`` (with an unreduced
      accumulator, all the micro-batches of each rejected window).
    grad_norm: float32 scalar, the global L2 norm (computed in float32) of
      the mean of the last window that ended, before the inner optimizer; 0
      before the first.
    skip_state: the pytree returned by ``should_skip_update_fn`` for the last
      micro-batch (``()`` without one), as in :class:`optax.MultiStepsState`;
      with an unreduced accumulator, for the last window's mean.
    inner_opt_state: the state of the inner optimizer (``optax.EmptyState()``
      in the chainable form, ``inner=None``), kept in the dtypes its init
      gave it (``optax.adam``'s ``mu_dtype`` sets its first moment's).

  With ``axis_name`` and ``init`` under ``jax.set_mesh`` (see
  :func:`optax_accum.accumulate`), ``acc_grads``, ``acc_weight`` and
  ``acc_value`` are typed unreduced over the axis: each device holds its own
  part of the sum. Read them with :func:`optax_accum.reduced_state` (or
  ``jax.reshard(x, P())`` inside ``jax.jit``), which reduces them; the other
  fields are the same on every device.

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
  acc_value: jax.Array
  has_updated: jax.Array
  num_rejected: jax.Array
  grad_norm: jax.Array
  skip_state: Any
  inner_opt_state: Any


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


def _float32_norm(tree, complete=lambda x: x) -> jax.Array:
  """The global L2 norm, computed in float32 or wider (never in float16).

  `complete` sums a leaf's squares over the devices holding its shards (see
  `_deferral.Deferral.complete`).
  """
  squares = [
    complete(
      jnp.sum(
        jnp.square(
          jnp.abs(x).astype(jnp.promote_types(jnp.abs(x).dtype, jnp.float32))
        )
      )
    )
    for x in jax.tree.leaves(tree)
  ]
  if not squares:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(squares)).astype(jnp.float32)


def _all_finite(tree, complete=lambda x: x) -> jax.Array:
  bad = [
    complete(jnp.sum(~jnp.isfinite(x), dtype=jnp.int32))
    for x in jax.tree.leaves(tree)
  ]
  return jnp.asarray(sum(bad) == 0) if bad else jnp.ones([], jnp.bool_)


def accumulate_states(tree) -> list[AccumulateState]:
  """Every `AccumulateState` in a pytree, in pytree order."""
  is_acc = lambda x: isinstance(x, AccumulateState)
  return [s for s in jax.tree.leaves(tree, is_leaf=is_acc) if is_acc(s)]


def value_dtype(value) -> jnp.dtype:
  """The dtype a window's mean `value` reaches inner in: the value's, or
  float32 when that is narrower or an integer (a mean is not truncated)."""
  return jnp.promote_types(jnp.result_type(value), jnp.float32)


def check_accumulator_args(extra_args, opt_state) -> None:
  """Raises where ``weight``/``flush`` would be ignored: no accumulator.

  Raises:
    ValueError: ``weight`` or ``flush`` given (not None) while ``opt_state``
      holds no :class:`AccumulateState`.
  """
  given = sorted(
    k for k in ('weight', 'flush') if extra_args.get(k) is not None
  )
  if given and not accumulate_states(opt_state):
    raise ValueError(
      f'{", ".join(f"`{k}`" for k in given)} is read by '
      'optax_accum.accumulate, but the optimizer holds no accumulator, so '
      'it would be ignored. Build it as optax_accum.chain('
      'optax_accum.accumulate(k), opt), or drop the argument.'
    )


def _is_plain_leaf(x) -> bool:
  return x is None or isinstance(
    x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)
  )


def is_eager(config, args) -> bool:
  """Whether a call runs outside any trace, on arrays that jit can take,
  with a hashable configuration (so a jitted call can be cached)."""
  if any(
    not _is_plain_leaf(x) or isinstance(x, Tracer)
    for x in jax.tree.leaves(args)
  ):
    return False
  try:
    hash(config)
  except TypeError:  # e.g. an unhashable schedule: run op by op
    return False
  return True


@dataclasses.dataclass(frozen=True)
class Accumulator:
  """The configuration of an ``accumulate(...)``, and its init and update.

  :func:`optax_accum.accumulate` returns
  ``optax.GradientTransformationExtraArgs(acc.init, acc.update)`` for an
  instance ``acc``; :func:`optax_accum.chain` recognises it from
  ``tx.update.__self__`` (see :func:`accumulator_of`) and folds the elements
  after it into ``inner``. All mutable values live in the
  :class:`AccumulateState`, which holds everything a restore needs.
  """

  every_k_schedule: Any
  inner: Optional[optax.GradientTransformation] = None
  accumulator_dtype: Any = None
  should_skip_update_fn: Optional[Callable[..., Any]] = None
  axis_name: Optional[Union[str, tuple[str, ...]]] = None
  _schedule: Callable[[jax.Array], jax.Array] = dataclasses.field(
    init=False, repr=False, compare=False
  )
  _inner_tx: optax.GradientTransformationExtraArgs = dataclasses.field(
    init=False, repr=False, compare=False
  )

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    k = self.every_k_schedule
    if (
      isinstance(k, (jax.Array, np.ndarray, np.generic))
      and not isinstance(k, Tracer)
      and jnp.shape(k) == ()
      and jnp.issubdtype(jnp.result_type(k), jnp.integer)
    ):
      # optax.inject_hyperparams passes an int as a concrete array outside
      # jit: an int keeps the configuration hashable (one compilation).
      set_('every_k_schedule', int(np.asarray(k)))
    set_('_schedule', _validate.schedule_fn(self.every_k_schedule))
    _validate.check_inner(self.inner, Accumulator)
    set_(
      'accumulator_dtype',
      _accumulator.canonical_accumulator_dtype(self.accumulator_dtype),
    )
    if self.should_skip_update_fn is not None and not callable(
      self.should_skip_update_fn
    ):
      raise TypeError(
        '`should_skip_update_fn` must be None or a callable such as '
        f'optax.skip_not_finite, but got {self.should_skip_update_fn!r}.'
      )
    names = (
      (self.axis_name,) if isinstance(self.axis_name, str) else (self.axis_name)
    )
    if self.axis_name is not None and not (
      isinstance(names, tuple)
      and names
      and all(isinstance(n, str) and n for n in names)
    ):
      raise TypeError(
        '`axis_name` must be None, a mapped axis name (str) or a tuple of '
        f'them, as in jax.lax.psum, but got {self.axis_name!r}.'
      )
    set_(
      '_inner_tx',
      optax.with_extra_args_support(
        optax.identity() if self.inner is None else self.inner
      ),
    )

  def transformation(self) -> optax.GradientTransformationExtraArgs:
    """This accumulator as an optax transformation."""
    return optax.GradientTransformationExtraArgs(
      self.init,  # type: ignore[arg-type]  # returns an AccumulateState
      self.update,  # type: ignore[arg-type]
    )

  def with_inner(self, inner) -> optax.GradientTransformationExtraArgs:
    """The same accumulator around another inner optimizer."""
    return dataclasses.replace(self, inner=inner).transformation()

  def _skip(self, updates, gradient_step, params):
    """`should_skip_update_fn`'s `(skip, skip_state)`, checked."""
    fn = self.should_skip_update_fn or _no_skip
    result = fn(updates, gradient_step, params)
    if not (isinstance(result, tuple) and len(result) == 2):
      raise ValueError(
        '`should_skip_update_fn` must return a pair `(skip, skip_state)` '
        f'as optax.skip_not_finite does, but it returned {result!r}.'
      )
    return result

  def init(self, params: optax.Params) -> AccumulateState:
    """Returns the initial :class:`AccumulateState` for ``params``."""
    acc_grads, acc_compensation = _accumulator.init(
      params, self.accumulator_dtype
    )
    scalar_sharding = None
    names = _deferral.layout_names(self.axis_name)
    if names is not None:  # per-device sums, typed unreduced over the axis
      if acc_compensation is not None:
        raise ValueError(
          f'accumulator_dtype={self.accumulator_dtype!r} with '
          f'axis_name={self.axis_name!r} on a mesh is not supported: the '
          'compensated sum needs operations an unreduced (per-device) sum '
          'does not allow. Use jnp.bfloat16 or None (float32).'
        )
      acc_grads = jax.tree.map_with_path(
        lambda path, p, a: _deferral.unreduced_zeros(
          p, a.dtype, names, _validate.leaf_name(path)
        ),
        params,
        acc_grads,
      )
      scalar_sharding = P(unreduced=frozenset(names))
    sum_scalar = lambda dtype=jnp.float32: jnp.zeros(
      [], dtype, out_sharding=scalar_sharding
    )
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = self._skip(
      optax.tree.zeros_like(params), gradient_step, params
    )
    inner_state = self._inner_tx.init(params)
    if accumulate_states(inner_state):
      raise ValueError(
        "accumulate's `inner` holds another accumulate(...) (for example "
        'in an optax.chain or optax.partition). Nested windows are one '
        'window of the product: write accumulate(k1 * k2, opt) instead.'
      )
    return AccumulateState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=gradient_step,
      every_k=self._schedule(gradient_step),
      acc_grads=acc_grads,
      acc_compensation=acc_compensation,
      acc_weight=sum_scalar(),
      # The default float: float64 under x64, where values may be float64.
      acc_value=sum_scalar(jax.dtypes.canonicalize_dtype(jnp.float64)),
      has_updated=jnp.zeros([], jnp.bool_),
      num_rejected=jnp.zeros([], jnp.int32),
      grad_norm=jnp.zeros([], jnp.float32),
      skip_state=_strong_types(skip_state),
      inner_opt_state=_strong_types(inner_state),
    )

  def update(
    self,
    updates: optax.Updates,
    state: AccumulateState,
    params: Optional[optax.Params] = None,
    *,
    weight: Optional[jax.typing.ArrayLike] = None,
    flush: Optional[jax.typing.ArrayLike] = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, AccumulateState]:
    """One mini-step; see :func:`optax_accum.accumulate`."""
    return self._dispatch(
      updates, state, params, weight, flush, extra_args, apply=False
    )

  def apply(
    self,
    updates: optax.Updates,
    state: AccumulateState,
    params: optax.Params,
    *,
    weight: Optional[jax.typing.ArrayLike] = None,
    flush: Optional[jax.typing.ArrayLike] = None,
    **extra_args: Any,
  ) -> tuple[optax.Params, AccumulateState]:
    """One mini-step that also applies the update: ``(params, state)``.

    The same numbers as ``update`` followed by ``optax.apply_updates``; on
    mid-steps ``params`` pass through the conditional untouched.
    """
    return self._dispatch(
      updates, state, params, weight, flush, extra_args, apply=True
    )

  def _dispatch(self, updates, state, params, weight, flush, extra_args, apply):
    if not isinstance(state, AccumulateState):
      raise TypeError(
        'accumulate(...).update takes the AccumulateState made by its '
        f'init, but got a {type(state).__name__}: the state of another '
        'optimizer (optax_accum.chain makes a tuple)? Make it with '
        'tx.init(params). A checkpoint restored without a target comes back '
        'as dicts: restore it with `jax.eval_shape(tx.init, params)` as the '
        'target, or with optax_accum.restore_checkpoint.'
      )
    _validate.check_updates(updates, state.acc_grads)
    _validate.check_params(params, updates)
    _validate.check_extra_args(extra_args)
    weight = _validate.check_weight(weight)
    flush = _validate.check_flush(flush)
    args = (updates, state, params, weight, flush, extra_args)
    if is_eager(self, args):
      # One compilation per input signature, shared by all calls.
      return jitted(self, '_update', apply)(*args)
    return self._update(*args, apply)

  def _check_state(self, state, params, updates) -> None:
    """Raises where ``state`` was made by another configuration: another
    ``inner``, ``accumulator_dtype`` or ``should_skip_update_fn``. Compares
    what ``init`` would make (abstractly, at trace time) with the state."""
    like = updates if params is None else params
    try:
      want = jax.eval_shape(
        lambda p: (
          self._inner_tx.init(p),
          self._skip(optax.tree.zeros_like(p), jnp.zeros([], jnp.int32), p)[1],
          _accumulator.init(p, self.accumulator_dtype),
        ),
        like,
      )
    except Exception:  # pylint: disable=broad-except
      return  # an init that cannot run abstractly: nothing to compare with
    inner, skip, (acc, compensation) = want
    differs = []
    if jax.tree.structure(state.inner_opt_state) != jax.tree.structure(inner):
      differs.append('`inner_opt_state` (another inner optimizer)')
    if jax.tree.structure(
      _strong_types(state.skip_state)
    ) != jax.tree.structure(skip):
      differs.append('`skip_state` (another should_skip_update_fn)')
    dtypes = lambda t: [jnp.result_type(x) for x in jax.tree.leaves(t)]
    # The accumulator's dtypes follow the params'; gradients may be narrower
    # and some params (optax.lookahead's) hold more than the gradients.
    same_tree = params is not None and (
      jax.tree.structure(params) == jax.tree.structure(updates)
    )
    if (state.acc_compensation is None) != (compensation is None) or (
      same_tree and dtypes(state.acc_grads) != dtypes(acc)
    ):
      differs.append('`acc_grads` (another accumulator_dtype)')
    if differs:
      raise ValueError(
        'The state was made by another optimizer or another configuration '
        f'of accumulate: its {" and ".join(differs)} differ from what this '
        "tx's init makes. Make the state with this tx.init(params), or "
        'restore a checkpoint into jax.eval_shape(tx.init, params).'
      )

  def _update(self, updates, state, params, weight, flush, extra_args, apply):
    self._check_state(state, params, updates)
    inner_tx = self._inner_tx
    deferral = _deferral.of(self.axis_name)
    updates, weight, flush, extra_args = deferral.arrive(
      updates, state, weight, flush, extra_args
    )
    # With a typed (unreduced) accumulator a micro-batch's gradient is known
    # only as a per-device part until the window's one reduction, so
    # should_skip_update_fn judges the window's mean, once, at its end.
    typed = deferral.typed
    gradient_step = state.gradient_step
    # The k of the window in flight is held in the state; a window that has
    # not started takes the schedule's k now.
    k = jnp.where(
      state.mini_step == 0, self._schedule(gradient_step), state.every_k
    )

    if typed:
      skip, skip_state = jnp.zeros([], jnp.bool_), state.skip_state
    else:
      skip, skip_state = self._skip(updates, gradient_step, params)
    skip = jnp.asarray(skip)
    if skip.shape != () or skip.dtype != jnp.bool_:
      raise ValueError(
        '`should_skip_update_fn` must return a bool scalar first, but it '
        f'returned dtype {skip.dtype} and shape {skip.shape}.'
      )
    accept = jnp.logical_not(skip)
    step_weight = jnp.ones([], jnp.float32) if weight is None else weight
    # A scalar term added to the running sums: masked where rejected, and
    # in a typed accumulator this device's part of the total.
    term = lambda x: (
      deferral.scalar_term(x) if typed else jnp.where(accept, x, 0.0)
    )
    acc_weight = state.acc_weight + term(step_weight)
    # Holds the last window's mean value until the next window starts.
    acc_value = jnp.where(
      state.mini_step == 0, jnp.zeros_like(state.acc_value), state.acc_value
    )
    if 'value' in extra_args:  # the window's weighted mean reaches inner
      value = jnp.asarray(extra_args['value'], state.acc_value.dtype)
      acc_value = acc_value + term(
        jnp.where(step_weight > 0, step_weight * value, 0.0)
      )
    if self.axis_name is None:
      mini_step = state.mini_step + accept.astype(jnp.int32)
    else:
      mini_step = state.mini_step + 1
    end = mini_step >= k
    if flush is not None:
      end = end | (flush & (mini_step > 0))

    def inner_update(mean, inner_state, params, window_extra):
      return inner_tx.update(mean, inner_state, params, **window_extra)

    if apply:
      out_shape = None
    else:
      out_shape, _ = jax.eval_shape(
        lambda u, s, p: inner_update(
          jax.tree.map(deferral.reduce_like, u),
          s,
          p,
          extra_args,
        ),
        updates,
        state.inner_opt_state,
        params,
      )

    def zeros_out():
      if typed:
        return jax.tree.map(
          lambda o, g: deferral.zeros_like_reduced(o.shape, o.dtype, g),
          out_shape,
          updates,
        )
      return _zeros_like_output(out_shape, updates)

    # The sum is formed outside the conditional, in one fused pass that XLA
    # writes in place into the donated accumulator, and the conditional does
    # not return it: a conditional that returns a buffer it also reads gets
    # a full-size copy. A new window starts from its first accepted
    # micro-batch: the previous window's sum is overwritten in that same pass
    # (`fresh`) rather than zeroed on emission.
    fresh = state.mini_step == 0
    if typed:
      acc_grads = _accumulator.add_unreduced(
        state.acc_grads, updates, weight, fresh, deferral
      )
      acc_compensation = None
    else:
      acc_grads, acc_compensation = _accumulator.add(
        state.acc_grads,
        state.acc_compensation,
        updates,
        weight,
        accept,
        fresh=fresh,
      )

    # With `apply`, the branches return the params instead of the updates:
    # updated in the stepping branch, passed through untouched otherwise, so
    # mid-steps neither write a zeros buffer nor add it to the params.
    # The mean is formed inside the stepping branch, where XLA fuses the
    # division into the inner update's kernels: passed as an operand to a
    # conditional, it would be written to a full-size temporary first.
    def no_step(acc_sum, scale, inner_state, params, window_extra):
      del acc_sum, scale, window_extra
      if apply:
        return params, inner_state
      return zeros_out(), inner_state

    def mean_of(acc_sum, scale):
      # A multiply, which XLA duplicates into each consumer fusion; a divide
      # it would compute once into a full-size temporary.
      # The inverse in each sum's dtype (float64 under x64), not float32's.
      mean = jax.tree.map(lambda a: a * (1 / scale.astype(a.dtype)), acc_sum)
      return optax.tree.cast_like(mean, updates)

    def step(acc_sum, scale, inner_state, params, window_extra):
      new_updates, new_inner = inner_update(
        mean_of(acc_sum, scale), inner_state, params, window_extra
      )
      new_inner = jax.tree.map(
        lambda new, old: jnp.asarray(new, dtype=jnp.asarray(old).dtype),
        new_inner,
        inner_state,
      )
      if apply:
        return optax.apply_updates(params, new_updates), new_inner
      return new_updates, new_inner

    def end_branch(acc, inner_state, params, grad_norm, skip_state):
      del grad_norm
      acc_sum = _accumulator.total(*acc)
      # With axis_name, the one reduction of the window.
      acc_sum, total_weight, total_value = deferral.reduce(
        (acc_sum, acc_weight, acc_value)
      )
      # A window of total weight 0 (every micro-batch weighted 0, or with
      # axis_name, rejected everywhere) takes no gradient step.
      stepped = total_weight != 0
      scale = jnp.where(stepped, total_weight, 1.0)
      # |mean| = |sum| / weight: one read of the sum, no temporary.
      grad_norm = _float32_norm(acc_sum, deferral.complete) / scale
      rejected = jnp.zeros([], jnp.bool_)
      if typed and self.should_skip_update_fn is not None:
        # Judged on each device's shards; every device takes the verdict
        # of any (and the largest skip state).
        rejected, skip_state = deferral.agree(
          self._skip(mean_of(acc_sum, scale), gradient_step, params)
        )
        rejected = jnp.asarray(rejected) & stepped
        skip_state = _strong_types(skip_state)
        stepped = stepped & ~rejected
      elif self.should_skip_update_fn is not None:
        stepped = stepped & _all_finite(acc_sum, deferral.complete)
      window_extra = dict(extra_args)
      if 'value' in extra_args:
        window_extra['value'] = (total_value / scale).astype(
          value_dtype(extra_args['value'])
        )
      out, new_inner = lax.cond(
        stepped,
        functools.partial(step, window_extra=window_extra),
        functools.partial(no_step, window_extra=None),
        acc_sum,
        scale,
        inner_state,
        params,
      )
      mean_value = total_value / scale
      if typed:  # stored in the unreduced slot, logical value kept
        mean_value = deferral.global_scalar(mean_value)
      return (
        out,
        new_inner,
        grad_norm,
        stepped,
        mean_value,
        skip_state,
        rejected,
      )

    def mid_branch(acc, inner_state, params, grad_norm, skip_state):
      del acc
      out = params if apply else zeros_out()
      return (
        out,
        inner_state,
        grad_norm,
        jnp.zeros([], jnp.bool_),
        acc_value,
        skip_state,
        jnp.zeros([], jnp.bool_),
      )

    out, inner_state, grad_norm, stepped, acc_value, skip_state, rejected = (
      lax.cond(
        end,
        end_branch,
        mid_branch,
        (acc_grads, acc_compensation),
        state.inner_opt_state,
        params,
        state.grad_norm,
        _strong_types(skip_state),
      )
    )
    gradient_step = jnp.where(
      stepped, optax.safe_increment(gradient_step), gradient_step
    )
    num_rejected = state.num_rejected + skip.astype(jnp.int32)
    if typed:  # a rejected window rejects all its micro-batches
      num_rejected = num_rejected + jnp.where(rejected, mini_step, 0)
    new_state = AccumulateState(
      mini_step=jnp.where(end, 0, mini_step),
      gradient_step=gradient_step,
      every_k=jnp.where(end, self._schedule(gradient_step), k),
      acc_grads=acc_grads,
      acc_compensation=acc_compensation,
      acc_weight=jnp.where(end, jnp.zeros_like(acc_weight), acc_weight),
      acc_value=acc_value,
      has_updated=stepped,
      num_rejected=num_rejected,
      grad_norm=grad_norm,
      skip_state=skip_state,
      inner_opt_state=inner_state,
    )
    return out, new_state


@functools.lru_cache(maxsize=64)
def jitted(config, method: str, apply: bool):
  """``jax.jit`` of ``config.<method>`` with ``apply`` bound, cached per
  configuration. The cache is bounded: code that builds a new configuration
  on every eager call (``optax.inject_hyperparams`` around the exact form)
  compiles each time but does not grow memory; jit the step instead."""
  return jax.jit(functools.partial(getattr(config, method), apply=apply))


def accumulator_of(tx: Any) -> Optional[Accumulator]:
  """The :class:`Accumulator` behind ``tx``, or None if ``tx`` is not one."""
  owner = getattr(getattr(tx, 'update', None), '__self__', None)
  return owner if isinstance(owner, Accumulator) else None


def accumulate(
  every_k_schedule: ScheduleLike,
  inner: Optional[optax.GradientTransformation] = None,
  *,
  accumulator_dtype: Optional[jax.typing.DTypeLike] = None,
  should_skip_update_fn: Optional[optax.ShouldSkipUpdateFunction] = None,
  axis_name: Optional[Union[str, tuple[str, ...]]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates micro-batch gradients and emits their mean every k mini-steps.

  Each ``update`` is one mini-step: it adds the micro-batch gradient
  :math:`g_i`, weighted by :math:`w_i` (default 1), into ``acc_grads``. The
  k-th mini-step of a window emits
  :math:`\bar g = \sum_{i=1}^{k} w_i g_i / \sum_{i=1}^{k} w_i`, the gradient
  of the large batch for a mean-reduced loss.

  * Exact form, ``accumulate(k, opt)``: the k-th mini-step emits
    ``opt.update(g_bar, ...)``; mid-steps emit zeros and never run ``opt``.
  * Chainable form, ``accumulate(k)``: emits zeros, then :math:`\bar g`.

  .. warning::
    ``optax.chain(accumulate(k), opt)`` runs ``opt`` on every mid-step's
    zeros, so a stateful ``opt`` (Adam, weight decay) drifts from
    large-batch training, as with ``optax.apply_every``. Use the exact form.

  Args:
    every_k_schedule: micro-batches per window, an int in [1, 2**31 - 1] or
      a traceable ``gradient_step -> k`` (rounded; below 1 or NaN means 1,
      beyond int32 means 2**31 - 1). A window keeps the k it started with
      (``AccumulateState.every_k``).
    inner: an ``optax.GradientTransformation`` run once per window, or None.
    accumulator_dtype: None (per leaf: float32, complex64 for complex
      params, or the param dtype when wider), float32, float64, bfloat16,
      ``"kahan_bfloat16"`` or a complex dtype. float16 and float8 are
      rejected: their sums overflow.
    should_skip_update_fn: ``fn(updates, gradient_step, params) -> (skip,
      skip_state)``, as in ``optax.MultiSteps``: a skipped micro-batch adds
      nothing (with an unreduced accumulator, it judges the window's
      reduced mean). When given, a window whose sum is not finite is
      discarded.
    axis_name: the data-parallel mesh axis (or a tuple of them) whose
      reduction is deferred to once per window. ``init`` under
      ``jax.set_mesh`` (Explicit axes) makes ``acc_grads``, ``acc_weight``
      and ``acc_value`` unreduced over it, for ``update`` under plain
      ``jax.jit`` (gradients unreduced, as
      :func:`optax_accum.unreduced_value_and_grad` returns them; ``weight``
      the global count) or in a ``jax.shard_map`` manual over every axis
      (gradients w.r.t. ``lax.pcast(params, axis_name, to='varying')``;
      ``weight`` this device's count, never the global one). Stacked per
      device, the state serves ``shard_map(check_vma=False)`` and
      ``jax.pmap``. Transformations go after the accumulator: before it
      they would see one device's part of a gradient.

  Keyword arguments of ``update``:
    weight: a scalar >= 0, the items (tokens) the micro-batch's loss
      averages over; weight 0 adds nothing (even NaN). A window of total
      weight 0 takes no step; a bad traced weight makes the update NaN.
    flush: a bool scalar; true ends the window after this micro-batch.
    value: the loss, for an ``inner`` that reads it: ``inner`` gets the
      window's weighted mean. Other keywords reach ``inner`` as passed with
      the window's last micro-batch, so ``optax.lbfgs`` (whose line search
      reads ``grad`` and ``value_fn``) is not large-batch exact.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AccumulateState`. ``update`` writes zero updates on mid-steps
    (:func:`optax_accum.apply_gradients` does not). Called outside
    ``jax.jit``, it runs jitted, cached per configuration: an ``inner``
    reading Python state sees it as it was when compiled.

  Raises:
    TypeError: a wrong type (``inner=optax.adamw``, a non-bool ``flush``),
      or a non-float gradient leaf.
    ValueError: a value out of range (k, ``weight``, ``accumulator_dtype``),
      a nested accumulator, updates of another structure or shape, a
      state made by another ``inner``, ``accumulator_dtype`` or
      ``should_skip_update_fn``, a param of another shape than its
      gradient; with ``axis_name``,
      gradients, a state or a mesh that do not fit it (each message says
      what to write). A keyword close to ``weight``, ``flush`` or
      ``value`` (``wieght``) warns.
    NameError: ``axis_name`` is not an axis where ``update`` runs.

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
  return Accumulator(
    every_k_schedule=every_k_schedule,
    inner=inner,
    accumulator_dtype=accumulator_dtype,
    should_skip_update_fn=should_skip_update_fn,
    axis_name=axis_name,
  ).transformation()


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
