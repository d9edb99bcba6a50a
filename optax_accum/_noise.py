"""The gradient noise scale B_simple from each window's micro-batches."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_accum._errors import fail
from optax_accum._layout import scalar_zeros
from optax_accum._state import accumulate_states


class NoiseScaleState(NamedTuple):
  """float32 ``acc_sq_norm`` (``sum_i w_i |g_i|^2`` of the window in flight),
  ``acc_count`` (its micro-batches of nonzero weight), both typed like
  ``acc_weight`` (per device with ``axis_name``), ``trace``, ``grad_sq``
  (the averaged estimates); int32 ``windows`` (how many were averaged)."""

  acc_sq_norm: jax.Array
  acc_count: jax.Array
  trace: jax.Array
  grad_sq: jax.Array
  windows: jax.Array


def init(names) -> NoiseScaleState:
  part = lambda: scalar_zeros(jnp.float32, names)  # one buffer each
  z = lambda: jnp.zeros([], jnp.float32)  # (donated apart)
  return NoiseScaleState(part(), part(), z(), z(), jnp.zeros([], jnp.int32))


def own(sq_norm, weight):
  """One micro-batch's ``(w |g|^2, 1)``; ``(0, 0)`` at weight 0."""
  w = jnp.float32(1) if weight is None else weight.astype(jnp.float32)
  term = jnp.where(w > 0, w * sq_norm.astype(jnp.float32), 0.0)
  return term, (w > 0).astype(jnp.float32)


def add(noise, sq_norms, fresh, layout) -> NoiseScaleState:
  """``(sum_i w_i |g_i|^2, count)`` of a mini-step's micro-batches, summed
  over the window (overwritten where ``fresh``)."""
  sq, n = (layout.scalar(jnp.asarray(x, jnp.float32)) for x in sq_norms)
  grow = lambda acc, x: jnp.where(fresh, x, acc + x)
  sq, n = grow(noise.acc_sq_norm, sq), grow(noise.acc_count, n)
  return noise._replace(acc_sq_norm=sq, acc_count=n)


def end_window(noise, sums, mean_norm, weight, used, decay) -> NoiseScaleState:
  """The window's estimates from its reduced ``sums``, averaged in where
  ``used`` (a gradient step of two micro-batches of nonzero weight)."""
  (sq_norms, n), total = sums, weight.astype(jnp.float32)
  a, b = sq_norms / total, jnp.square(mean_norm)
  used = used & (n >= 2)
  n1 = jnp.where(used, n - 1, 1.0)
  ema = lambda old, new: jnp.where(used, decay * old + (1 - decay) * new, old)
  return noise._replace(
    trace=ema(noise.trace, total * (a - b) / n1),
    grad_sq=ema(noise.grad_sq, (n * b - a) / n1),
    windows=noise.windows + used.astype(jnp.int32),
  )


def gradient_noise_scale(opt_state: Any) -> jax.Array:
  r"""The simple gradient noise scale ``B_simple = tr(S) / |G|^2``.

  The batch size (units of ``weight``, or micro-batches) beyond which a
  larger batch stops paying (McCandlish et al.), from the first accumulator
  with ``track_noise_scale=True``: each window of n >= 2 micro-batches
  gives unbiased ``tr(S)`` and ``|G|^2`` from its gradients :math:`g_i`
  (weights :math:`w_i`, total :math:`W`) and mean :math:`\bar g`:

  .. math::
    a = \sum_i w_i |g_i|^2 / W, \quad b = |\bar g|^2, \quad
    \mathrm{tr}\,S \approx \frac{W (a - b)}{n - 1}, \quad
    |G|^2 \approx \frac{n b - a}{n - 1},

  each averaged over windows (``noise_scale_decay``; the ratio needs no bias
  correction), leaving out windows skipped or of total weight 0.

  Args:
    opt_state: an optimizer state holding an :class:`AccumulateState`.

  Returns:
    A float32 scalar (per device or member for a stacked state); NaN before
    a window of two micro-batches; noisy, even negative, while ``|G|^2``
    is small against the noise.

  Raises:
    ValueError: no accumulator tracks it (naming ``track_noise_scale``).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(2, optax.sgd(0.0), track_noise_scale=True)
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in ([3.0, 1.0], [1.0, 3.0]):
    ...   _, state = tx.update(jnp.array(g), state)
    >>> round(float(optax_accum.gradient_noise_scale(state)), 3)  # 4 / 6
    0.667

  References:
    McCandlish et al. 2018, arXiv 1812.06162, App. A.1 (equal weights).
  """
  states = accumulate_states(opt_state)  # nnx.Optimizer's read too
  s = next((s.noise_scale for s in states if s.noise_scale), None)
  if s is None:
    fail(ValueError, 'track_noise_scale', 'False for every accumulator')
  ratio = s.trace / jnp.where(s.grad_sq == 0, jnp.nan, s.grad_sq)
  return jnp.where(s.windows > 0, ratio, jnp.nan).astype(jnp.float32)
