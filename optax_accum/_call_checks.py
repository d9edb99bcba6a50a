"""The checks of each call (construction's and init's: ``_checks``):
structure and shape, concrete ``weight``, ``flush``, ``value`` and
``sq_norms``, and the parallel types that would give wrong numbers."""

import difflib
import sys
from typing import Any
import warnings

import jax
from jax.core import Tracer
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from optax_accum import _checks
from optax_accum._errors import fail
from optax_accum._errors import leaf_name
from optax_accum._state import AccumulateState


def mini_step(grads, state, params, weight, flush, extra):
  """The checks of one mini-step; returns ``(grads, weight, flush, value)``
  as arrays, the weight and value in the state's dtypes for them."""
  if not isinstance(state, AccumulateState):
    fail(TypeError, 'state', f'a {type(state).__name__}; use tx.init(params)')
  made = getattr(jax.typeof(state.mini_step).sharding, 'mesh', None)
  here = jax.sharding.get_abstract_mesh()
  if not (made is None or made.empty or here.empty or made == here):
    fail(ValueError, 'state', f'made on {made.shape}, used on {here.shape}')
  for argument, x in (('weight', weight), ('flush', flush)):
    if x is not None and _batched(x) and not _batched(state.mini_step):
      fail(ValueError, argument, 'per member, counters shared; in_axes=None')
  structure(grads, state.acc_grads, params)
  if extra:
    misspelt_keywords(extra)
  if 'value' in extra:
    _real_scalar(extra['value'], 'value')
    extra = {'value': jnp.asarray(extra['value'], state.acc_value.dtype)}
  weight = weight_of(weight, state.acc_weight.dtype)  # None: not given
  flush = None if flush is None else flush_of(flush)
  return jax.tree.map(jnp.asarray, grads), weight, flush, extra.get('value')


def _batched(x) -> bool:
  """Batched by ``jax.vmap`` (JAX has no public test for it)."""
  return type(x).__name__ == 'BatchTracer'


def structure(grads, acc_grads, params) -> None:
  """The gradients have the params' structure, shapes and kind; so have the
  params (or their ``fast`` and ``slow``: ``optax.lookahead``'s, whose
  init takes ``params.fast``)."""
  got, want = jax.tree.structure(grads), jax.tree.structure(acc_grads)
  if got != want:
    fail(ValueError, 'updates', f'structure {got}; init made {want}')
  look = isinstance(params, optax.LookaheadParams)
  trees = (params.fast, params.slow) if look else (params,)
  trees = [t for t in trees if t is not None]
  for t in trees:
    if jax.tree.structure(t) != got:
      at = f'structure {jax.tree.structure(t)}'
      fail(ValueError, 'params', f'{at}; the updates have {got}')
  leaves = (jax.tree.leaves(t) for t in (acc_grads, *trees))
  for (path, g), a, *ps in zip(jax.tree.leaves_with_path(grads), *leaves):
    for argument, x in [('updates', g)] + [('params', p) for p in ps]:
      if jnp.shape(x) != jnp.shape(a):
        at = f'{jnp.shape(x)} at {leaf_name(path)}'
        want = f'the params have {jnp.shape(a)}'
        fail(ValueError, argument, f'shape {at}; {want}')
    if not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
      at = f'{jnp.result_type(g)} at {leaf_name(path)}'
      fail(TypeError, 'updates', f'{at}; gradients are floating')
    if jnp.iscomplexobj(g) and not jnp.iscomplexobj(a):
      fail(TypeError, 'updates', f'complex at {leaf_name(path)}, params real')


def inner_state(got, made) -> None:
  """``inner_opt_state`` is structured as ``inner.init`` makes it."""
  if jax.tree.structure(got) != jax.tree.structure(made):
    kind = lambda x: type(x).__name__
    name = lambda t: list(map(kind, t)) if type(t) is tuple else kind(t)
    at = f'its inner_opt_state is {name(got)}, inner.init makes {name(made)}'
    fail(ValueError, 'state', f'{at}: use this tx.init(params)')


def _real_scalar(value: Any, argument: str) -> None:
  """A real (integer or floating) scalar, not a string, bool or list."""
  try:
    dtype = None if isinstance(value, (str, bytes)) else jnp.result_type(value)
  except TypeError:
    dtype = None
  if dtype is None or not _checks.real_dtype(dtype):
    fail(TypeError, argument, f'{value!r}, not a real number')
  if np.shape(value) != ():
    fail(ValueError, argument, f'shape {np.shape(value)}; pass a scalar')


def weight_of(value, dtype=jnp.float32):
  """A real scalar, 0 or in [2**-64, 2**64] (so weight x gradient neither
  overflows nor underflows where the mean would not), in ``dtype``: a bad
  concrete one raises, a bad traced one is NaN."""
  if value is None:
    return None
  _real_scalar(value, 'weight')
  if isinstance(value, jax.Array) and unreduced_axes(value):
    fail(ValueError, 'weight', f'{jax.typeof(value)}; reduce it first')
  if not isinstance(value, Tracer):  # in float64 (a numpy int64, a
    given, value = value, np.asarray(value, np.float64)  # Python int whole)
    if not (value == 0 or 2.0**-64 <= value <= 2.0**64):
      fail(ValueError, 'weight', f'{given!r}, not 0 nor in [2**-64, 2**64]')
  value = jnp.asarray(value, dtype)
  good = (value == 0) | ((value >= 2.0**-64) & (value <= 2.0**64))
  return jnp.where(good, value, jnp.full_like(value, jnp.nan))


def sq_norms(value) -> None:
  """``(sum_i w_i |g_i|^2, count)``: two real scalars."""
  if not (isinstance(value, tuple) and len(value) == 2):
    fail(TypeError, 'sq_norms', f'{value!r}; give the in-step form\'s pair')
  for x in value:
    _real_scalar(x, 'sq_norms')


def flush_of(value):
  if isinstance(value, bool) or (
    jnp.shape(value) == () and getattr(value, 'dtype', None) == jnp.bool_
  ):
    return jnp.asarray(value)
  fail(TypeError, 'flush', f'{value!r}; write flush=bool(...) or (x > 0)')


_OWN_KEYWORDS = ('weight', 'flush', 'value', 'sq_norms')


def misspelt_keywords(extra_args) -> None:
  """Warns of a keyword close to ``weight``, ``flush`` or ``value``: optax
  passes unknown keywords on to transformations that ignore them."""
  for name in extra_args:
    close = difflib.get_close_matches(name, _OWN_KEYWORDS, n=1, cutoff=0.8)
    if name not in _OWN_KEYWORDS and close:
      ask = f'did you mean `{close[0]}`? Silence this warning if an inner'
      said = f'accumulate got `{name}`, which it does not read: {ask}'
      level = _user_stacklevel()
      warnings.warn(f'{said} optimizer takes it.', UserWarning, level)


def _user_stacklevel() -> int:
  """The stacklevel of the first frame outside optax_accum, jax, optax and
  flax, so a warning points at the user's line on every path."""
  frame, level = sys._getframe(1), 1  # pylint: disable=protected-access
  while frame is not None:
    module = frame.f_globals.get('__name__', '').split('.')[0]
    if module not in ('optax_accum', 'jax', 'jaxlib', 'optax', 'flax'):
      return level
    frame, level = frame.f_back, level + 1
  return 1


def keywords_read(extra_args, holds_accumulator: bool) -> None:
  """``weight``/``flush`` reach no accumulator: they would be ignored."""
  given = [k for k in ('weight', 'flush') if extra_args.get(k) is not None]
  if given and not holds_accumulator:
    fail(ValueError, given[0], 'given to a tx with no accumulator to read it')


def no_chainable_form(chainable: bool, argument: str) -> None:
  """The presence rule: a chainable-form accumulator inside a
  transformation this library did not build runs the elements after it on
  every mini-step's zeros, so it is refused."""
  if chainable:
    form = 'a chainable-form accumulate(k) whose followers would run on'
    fix = 'write optax_accum.chain(accumulate(k), opt)'
    fail(ValueError, argument, f'holds {form} every mini-step: {fix}')


# ------------------------------------------- each call: parallel types


def spec_of(x) -> P:
  """The PartitionSpec in ``x``'s type (``P()`` where it has none)."""
  spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
  return P() if spec is None else spec


def unreduced_axes(x) -> frozenset:
  typ = jax.typeof(x)
  spec = getattr(getattr(typ, 'sharding', None), 'spec', None)
  manual = getattr(typ, 'manual_axis_type', None)
  manual = getattr(manual, 'unreduced', ()) or ()
  return frozenset(getattr(spec, 'unreduced', ())) | frozenset(manual)


def varying_axes(x) -> frozenset:
  typ = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  manual = getattr(typ, 'manual_axis_type', None)
  return frozenset(getattr(manual, 'varying', ()) or ())


def unreduced_without_accumulator(grads, holds_accumulator: bool) -> None:
  axes = sorted(_axes_of(grads, unreduced_axes))
  if axes and not holds_accumulator:
    fail(ValueError, 'grads', f'unreduced over {axes} and no accumulator')


def acted_on_parts(grads, error: Exception) -> None:
  """Names the cause when JAX refused an operation on unreduced gradients
  inside a transformation optax_accum did not build: an element before
  the accumulator (a clip, a scale) saw each device's part of the sum."""
  axes = sorted(_axes_of(grads, unreduced_axes))
  if axes and 'reduced' in str(error):
    fix = 'put it after, optax_accum.chain(accumulate(k, ...), clip, opt)'
    acted = 'an element before the accumulator acted on gradients unreduced'
    fail(ValueError, 'tx', f'{acted} over {axes}: {fix}', error)


def _axes_of(tree, axes_fn) -> set:
  return set().union(*(axes_fn(x) for x in jax.tree.leaves(tree)))


def no_axis_call(state, grads, weight, flush, value) -> None:
  """Without ``axis_name``: gradients typed per device (unreduced, or
  varying over axes the state does not) need one."""
  for g, a in zip(jax.tree.leaves(grads), jax.tree.leaves(state.acc_grads)):
    axes = unreduced_axes(g) or (varying_axes(g) - varying_axes(a))
    if axes:
      need = _shown(sorted(axes))
      fail(ValueError, 'axis_name', f'None; the gradients need {need!r}')
  own = varying_axes(state.acc_weight)  # a per-device state's axes
  for argument, x in (('weight', weight), ('flush', flush), ('value', value)):
    axes = set() if x is None else varying_axes(x) - own
    if axes:
      at = f'varies over {sorted(axes)}, the state does not'
      fail(ValueError, argument, f'{at}: reduce it or give axis_name')


def unreduced_state(names, acc_grads, acc_weight) -> None:
  """A state whose sums are unreduced over exactly ``axis_name``; made by
  tx.init(params) under `jax.set_mesh` (in shard_map, with those specs)."""
  sums = {'acc_grads': acc_grads, 'acc_weight': acc_weight}
  for path, a in jax.tree.leaves_with_path(sums):
    if set(unreduced_axes(a)) != set(names):
      at = f'{jax.typeof(a)} at {leaf_name(path)}'
      fail(ValueError, 'state', f'{at}, not unreduced: init under set_mesh')


def checked_call(names, grads, acc_grads, scalars) -> None:
  """In ``shard_map(check_vma=True)``: each device's own gradient (w.r.t.
  ``lax.pcast(params, names, to='varying')``), and no value varying over
  axes the accumulator does not."""
  accs = jax.tree.leaves(acc_grads)
  for (path, g), a in zip(jax.tree.leaves_with_path(grads), accs):
    extra = varying_axes(g) - set(names) - varying_axes(a)
    if not set(names) <= varying_axes(g) or extra:
      at = f'{jax.typeof(g)} at {leaf_name(path)}'
      want = f"lax.pcast(params, {_shown(names)!r}, to='varying')"
      fail(ValueError, 'updates', f'{at}; differentiate w.r.t. {want}')
  for argument, x in scalars.items():
    extra = set() if x is None else varying_axes(x) - set(names)
    if argument == 'flush' and x is not None:
      extra = varying_axes(x)
    if extra:
      fail(ValueError, argument, f'varies over {sorted(extra)}')


def mesh_call(names, grads, value) -> None:
  """Under plain ``jax.jit`` on a mesh: gradients typed unreduced over
  ``axis_name`` (from ``microbatched_value_and_grad(..., axis_name)``), a
  replicated ``value``."""
  if not any(isinstance(g, Tracer) for g in jax.tree.leaves(grads)):
    fail(ValueError, 'updates', 'eager on a mesh with axis_name: jit the step')
  for path, g in jax.tree.leaves_with_path(grads):
    if set(unreduced_axes(g)) != set(names):
      at = f'{jax.typeof(g)} at {leaf_name(path)}, not unreduced'
      fail(ValueError, 'updates', f'{at}: microbatched_value_and_grad')
  if value is not None and unreduced_axes(value):
    fail(ValueError, 'value', f'{jax.typeof(value)}; pass a replicated loss')


def _shown(names):
  return names[0] if len(names := tuple(names)) == 1 else names
