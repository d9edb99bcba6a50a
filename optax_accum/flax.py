"""Flax front ends whose ``step`` counts gradient steps: NNX and linen.

``from optax_accum.flax import Optimizer, TrainState`` (needs flax; not
imported by ``import optax_accum``). Both apply updates with
:func:`optax_accum.apply_gradients`, so mid-steps leave params untouched.
"""

from typing import Any, Optional

from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp

from optax_accum import _apply
from optax_accum import _state
from optax_accum._errors import fail


def _steps_taken(opt_state, dtype) -> jax.Array:
  """1 where the mini-step took a gradient step (always 1 without one)."""
  states = _state.accumulate_states(opt_state)
  return jnp.asarray(states[0].has_updated if states else True).astype(dtype)


def _extra(weight, flush, extra_args, value=None) -> dict[str, Any]:
  given = {'weight': weight, 'flush': flush, 'value': value}
  given = {k: v for k, v in given.items() if v is not None}
  return {**(extra_args or {}), **given}


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` for accumulation: ``step`` counts gradient steps.

  A drop-in for ``nnx.Optimizer(model, tx, wrt=...)``: ``update(model,
  grads, weight=..., flush=..., **extra_args)`` is one mini-step through
  :func:`optax_accum.apply_gradients`; ``step`` (uint32) counts gradient steps.

  Args:
    model: the NNX module to train.
    tx: an optimizer, typically ``optax_accum.chain(accumulate(k), opt)``.
    wrt: the filter of the trained variables, as for ``nnx.Optimizer``.

  Raises:
    RuntimeError: flax older than 0.12.7 (no ``nnx.as_pure``). ValueError:
      from ``update``, those of :func:`optax_accum.apply_gradients`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> from flax import nnx
    >>> from optax_accum.flax import Optimizer
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.1))
    >>> optimizer = Optimizer(model, tx, wrt=nnx.Param)
    >>> loss = lambda m, x: jnp.sum(m(x) ** 2)
    >>> for n in (3.0, 5.0):  # two micro-batches, weighted by their size
    ...   grads = nnx.grad(loss)(model, jnp.ones((1, 2)))
    ...   optimizer.update(model, grads, weight=n)
    >>> int(optimizer.step[...]), int(optimizer.opt_state.mini_step[...])
    (1, 0)

  References:
    ``flax.nnx.Optimizer``; MaxText PR #812 (counting gradient steps).
  """

  def __init__(self, model, tx, *args, **kwargs):
    if not hasattr(nnx, 'as_pure'):  # flax's pure-state API, 0.12.7 on
      fail(RuntimeError, 'model', 'the NNX front end needs flax>=0.12.7')
    super().__init__(model, tx, *args, **kwargs)

  def update(
    self, model, grads, /, *, weight=None, flush=None, **extra_args
  ):  # pytype: disable=signature-mismatch
    """One mini-step; at a window's end ``model``'s ``wrt`` variables are
    updated inside the accumulator's conditional, so no updates are formed
    to return (``optax_accum.has_updated(optimizer.opt_state)`` tells)."""
    graph = getattr(self, 'graph', None)
    params = nnx.as_pure(nnx.state(model, self.wrt, graph=graph))
    grads = nnx.as_pure(nnx.state(grads, self.wrt, graph=graph))
    opt_state = nnx.as_pure(self.opt_state)
    extra = nnx.as_pure(_extra(weight, flush, extra_args))
    args = (self.tx, grads, opt_state, params)
    new_params, new_opt_state = _apply.apply_gradients(*args, **extra)
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_opt_state, graph=graph))
    self.step[...] += _steps_taken(new_opt_state, self.step[...].dtype)


class TrainState(train_state.TrainState):
  """Linen ``TrainState`` for accumulation: ``step`` counts gradient steps.

  A drop-in for ``flax.training.train_state.TrainState.create(...)``:
  ``apply_gradients(grads=..., weight=..., flush=..., value=...,
  extra_args=..., **kwargs)`` is one mini-step of
  :func:`optax_accum.apply_gradients` (``extra_args``, a dict, reach the
  rest of ``tx``; ``**kwargs`` replace fields).

  Raises:
    ValueError: those of :func:`optax_accum.apply_gradients`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> from optax_accum.flax import TrainState
    >>> tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(0.5))
    >>> state = TrainState.create(apply_fn=None, params=jnp.ones(2), tx=tx)
    >>> state = state.apply_gradients(grads=jnp.ones(2))
    >>> state = state.apply_gradients(grads=jnp.full(2, 3.0), flush=True)
    >>> int(state.step), state.params
    (1, Array([0., 0.], dtype=float32))

  References:
    ``flax.training.train_state.TrainState.apply_gradients``.
  """

  def apply_gradients(
    self,
    *,
    grads,
    weight=None,
    flush=None,
    value=None,
    extra_args: Optional[dict[str, Any]] = None,
    **kwargs,
  ):
    """One mini-step; returns the new state."""
    extra = _extra(weight, flush, extra_args, value)
    args = (self.tx, grads, self.opt_state, self.params)
    params, opt_state = _apply.apply_gradients(*args, **extra)
    step = self.step + _steps_taken(opt_state, jnp.result_type(self.step))
    return self.replace(step=step, params=params, opt_state=opt_state, **kwargs)


__all__ = ('Optimizer', 'TrainState')
