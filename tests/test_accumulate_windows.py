"""Token weights, partial-window flush, skipping and telemetry (issue 4)."""

import functools

import chex
from flax import nnx
from helpers import stateless
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

K = 4
VOCAB, DIM, MAX_LEN = 7, 5, 12


def _token_problem(seed, k=K):
  """k micro-batches of padded sequences with different token counts."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(DIM, VOCAB)), jnp.float32)}
  batches = []
  for _ in range(k):
    n_seq = 2
    lengths = rng.integers(1, MAX_LEN + 1, size=n_seq)
    x = rng.normal(size=(n_seq, MAX_LEN, DIM)).astype(np.float32)
    y = rng.integers(0, VOCAB, size=(n_seq, MAX_LEN)).astype(np.int32)
    mask = (np.arange(MAX_LEN)[None] < lengths[:, None]).astype(np.float32)
    batches.append((jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)))
  return params, batches


def _token_sum_loss(params, x, y, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(x @ params["w"], y)
  return jnp.sum(ce * mask)


def _token_mean_loss(params, x, y, mask):
  return _token_sum_loss(params, x, y, mask) / jnp.sum(mask)


def _global_token_mean_grad(params, batches):
  """The exact gradient: sum-reduced loss over the window / total tokens."""
  total = sum(float(jnp.sum(m)) for _, _, m in batches)
  grads = [jax.grad(_token_sum_loss)(params, *b) for b in batches]
  return jax.tree.map(lambda *g: sum(g) / total, *grads)


FORMS = {
  "chainable": lambda: optax_accum.accumulate(K),
  "exact": lambda: optax_accum.accumulate(K, optax.scale(-1.0)),
  "chain": lambda: optax_accum.chain(
    optax_accum.accumulate(K), optax.scale(-1.0)
  ),
}
SIGN = {"chainable": 1.0, "exact": -1.0, "chain": -1.0}


def _emit(tx, params, batches, weighted=True, **kwargs):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for b in batches:
    grad = jax.grad(_token_mean_loss)(params, *b)
    w = jnp.sum(b[2]) if weighted else None
    updates, state = step(grad, state, params, weight=w, **kwargs)
  return updates, state


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_mean_is_the_global_token_mean_gradient(form, seed):
  params, batches = _token_problem(seed)
  want = _global_token_mean_grad(params, batches)
  updates, state = _emit(FORMS[form](), params, batches)
  got = jax.tree.map(lambda u: SIGN[form] * u, updates)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  assert bool(optax_accum.has_updated(state))
  # Without weights it is the mean of per-micro-batch means: not the same.
  unweighted, _ = _emit(FORMS[form](), params, batches, weighted=False)
  unweighted = jax.tree.map(lambda u: SIGN[form] * u, unweighted)
  assert float(jnp.max(jnp.abs(unweighted["w"] - want["w"]))) > 1e-3


def test_weight_reaches_accumulate_through_nnx_optimizer():
  params, batches = _token_problem(3)

  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(params["w"])

  def loss(model, x, y, mask):
    return _token_mean_loss({"w": model.w[...]}, x, y, mask)

  model = Model()
  optimizer = nnx.Optimizer(
    model,
    optax_accum.chain(optax_accum.accumulate(K), optax.sgd(1.0)),
    wrt=nnx.Param,
  )
  for b in batches:
    optimizer.update(model, nnx.grad(loss)(model, *b), weight=jnp.sum(b[2]))
  want = params["w"] - _global_token_mean_grad(params, batches)["w"]
  np.testing.assert_allclose(model.w[...], want, rtol=1e-5, atol=1e-6)


def test_zero_weight_window_takes_no_step_and_the_next_window_is_clean():
  tx = optax_accum.accumulate(2, optax.adamw(0.1))
  params = jnp.zeros(3)
  state = tx.init(params)
  inner_before = state.inner_opt_state
  step = jax.jit(tx.update)
  for g in (jnp.ones(3), jnp.full(3, jnp.nan)):  # zero tokens, even NaN
    u, state = step(g, state, params, weight=0.0)
  np.testing.assert_array_equal(u, np.zeros(3))
  assert not bool(state.has_updated)
  assert int(state.gradient_step) == 0 and int(state.mini_step) == 0
  chex.assert_trees_all_equal(state.inner_opt_state, inner_before)
  tx = optax_accum.accumulate(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(2):
    u, state = step(jnp.ones(3), state, params, weight=0.0)
  u, state = step(jnp.full(3, 2.0), state, params, weight=1.0)
  u, state = step(jnp.full(3, 5.0), state, params, weight=3.0)
  np.testing.assert_allclose(u, np.full(3, (2.0 + 15.0) / 4.0))
  assert int(state.gradient_step) == 1


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_concrete_weight_raises(bad):
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError):
    tx.update(jnp.ones(2), state, weight=bad)


def test_non_scalar_weight_raises():
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError):
    tx.update(jnp.ones(2), state, weight=jnp.ones(2))


def test_traced_negative_weight_poisons_the_window_with_nan():
  tx = optax_accum.accumulate(2)
  state = tx.init(jnp.zeros(2))
  step = jax.jit(tx.update)
  _, state = step(jnp.ones(2), state, weight=jnp.float32(-1.0))
  u, state = step(jnp.ones(2), state, weight=jnp.float32(1.0))
  assert bool(jnp.all(jnp.isnan(u)))


# Flush.


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("n", range(1, K))
def test_flush_after_n_microbatches_emits_their_weighted_mean(form, n):
  params, batches = _token_problem(4)
  tx = FORMS[form]()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i, b in enumerate(batches[:n]):
    grad = jax.grad(_token_mean_loss)(params, *b)
    updates, state = step(
      grad, state, params, weight=jnp.sum(b[2]), flush=jnp.asarray(i == n - 1)
    )
  want = _global_token_mean_grad(params, batches[:n])
  got = jax.tree.map(lambda u: SIGN[form] * u, updates)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  acc = _acc_state(state)
  assert bool(acc.has_updated)
  assert int(acc.gradient_step) == 1 and int(acc.mini_step) == 0
  # A full window after the flush is unaffected by it.
  updates, state = _emit(tx, params, batches)
  want_full = _global_token_mean_grad(params, batches)
  got = jax.tree.map(lambda u: SIGN[form] * u, updates)
  chex.assert_trees_all_close(got, want_full, rtol=1e-5, atol=1e-7)


def test_flush_of_an_empty_window_emits_nothing():
  tx = optax_accum.accumulate(2, optax.adam(1e-2))
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(jnp.ones(2), state, params)
  _, state = step(jnp.ones(2), state, params)  # emits
  # The next micro-batch is rejected, so the window is still empty.
  tx_skip = optax_accum.accumulate(
    2, optax.adam(1e-2), should_skip_update_fn=optax.skip_not_finite
  )
  s = tx_skip.init(params)
  u, s = tx_skip.update(jnp.full(2, jnp.nan), s, params, flush=True)
  assert not bool(s.has_updated) and int(s.gradient_step) == 0
  np.testing.assert_array_equal(u, np.zeros(2))
  assert int(state.gradient_step) == 1


def _acc_state(state):
  is_acc = lambda x: isinstance(x, optax_accum.AccumulateState)
  return next(s for s in jax.tree.leaves(state, is_leaf=is_acc) if is_acc(s))


# Skipping.


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", range(K))
def test_a_non_finite_window_is_skipped_as_the_large_batch(position, bad_value):
  """should_skip_update_fn judges the window's mean, the large batch's
  gradient: a window with a non-finite micro-batch takes no step, and the
  next window is the large batch of its own micro-batches."""
  params, batches = _token_problem(5)
  tx = optax_accum.accumulate(
    K, optax.scale(-1.0), should_skip_update_fn=optax.skip_not_finite
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = [jax.grad(_token_mean_loss)(params, *b) for b in batches]
  weights = [jnp.sum(b[2]) for b in batches]
  bad = list(zip(grads, weights))[:K]
  bad[position] = (
    jax.tree.map(lambda g: g.at[0, 0].set(bad_value), bad[position][0]),
    bad[position][1],
  )
  flags = []
  for g, w in bad + list(zip(grads, weights))[:K]:
    updates, state = step(g, state, params, weight=w)
    flags.append(bool(optax_accum.has_updated(state)))
  assert flags == [i == 2 * K - 1 for i in range(2 * K)]
  want = _global_token_mean_grad(params, batches[:K])
  chex.assert_trees_all_close(
    jax.tree.map(jnp.negative, updates), want, rtol=1e-5, atol=1e-7
  )
  assert int(state.num_rejected) == 1 and int(state.gradient_step) == 1
  assert int(state.skip_state["num_not_finite"]) == 0


def test_has_updated_stays_truthful_after_a_skip_unlike_multisteps():
  params = jnp.zeros(2)
  ours = optax_accum.accumulate(
    2, optax.sgd(1.0), should_skip_update_fn=optax.skip_not_finite
  )
  theirs = optax.MultiSteps(
    optax.sgd(1.0), 2, should_skip_update_fn=optax.skip_not_finite
  )
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for g in [jnp.ones(2), jnp.ones(2), jnp.full(2, jnp.nan)]:
    _, s_ours = ours.update(g, s_ours, params)
    _, s_theirs = theirs.update(g, s_theirs, params)
  # The last mini-step started a window: nothing was emitted on it.
  assert not bool(optax_accum.has_updated(s_ours))
  assert bool(theirs.has_updated(s_theirs))  # optax misreports


def test_skip_large_updates_works_as_is():
  skip = functools.partial(optax.skip_large_updates, max_squared_norm=10.0)
  tx = optax_accum.accumulate(2, should_skip_update_fn=skip)
  state = tx.init(jnp.zeros(2))
  u, state = tx.update(jnp.full(2, 100.0), state)
  u, state = tx.update(jnp.full(2, 2.0), state)  # mean norm^2 5e3: rejected
  np.testing.assert_allclose(u, [0.0, 0.0])
  u, state = tx.update(jnp.full(2, 1.0), state)
  u, state = tx.update(jnp.full(2, 2.0), state)
  np.testing.assert_allclose(u, [1.5, 1.5])
  assert int(state.num_rejected) == 1


# Telemetry.


def test_telemetry_is_readable_under_jit():
  tx = optax_accum.accumulate(3, should_skip_update_fn=optax.skip_not_finite)
  params = jnp.zeros(2)

  @jax.jit
  def run(state):
    out = []
    for g, w in [
      (jnp.array([3.0, 4.0]), 2.0),
      (jnp.full(2, jnp.nan), 1.0),
      (jnp.array([0.0, 0.0]), 1.0),  # ends a rejected window
      (jnp.array([3.0, 4.0]), 2.0),
      (jnp.array([0.0, 0.0]), 1.0),
    ]:
      _, state = tx.update(g, state, params, weight=w)
      out.append((state.acc_weight, state.num_rejected))
    _, state = tx.update(jnp.array([6.0, 8.0]), state, params, weight=1.0)
    return out, state

  out, state = run(tx.init(params))
  assert [(float(w), int(r)) for w, r in out] == [
    (2.0, 0),
    (3.0, 0),
    (0.0, 1),
    (2.0, 1),
    (3.0, 1),
  ]
  mean = (2 * np.array([3.0, 4.0]) + np.array([6.0, 8.0])) / 4.0
  np.testing.assert_allclose(state.grad_norm, np.linalg.norm(mean), rtol=1e-6)
  assert float(state.acc_weight) == 0.0  # reset on emission


def test_value_reaches_the_inner_optimizer_as_the_window_weighted_mean():
  seen = []

  def update(updates, state, params=None, *, value):
    del params
    jax.debug.callback(lambda v: seen.append(float(v)), value)
    return updates, state

  inner = stateless(update)
  tx = optax_accum.accumulate(3, inner)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for value, weight in [
    (1.0, 1.0),
    (4.0, 2.0),
    (10.0, 1.0),  # 19 / 4
    (2.0, 5.0),
    (jnp.nan, 0.0),
    (8.0, 5.0),
  ]:  # 50 / 10
    _, state = step(jnp.ones(2), state, params, value=value, weight=weight)
  jax.effects_barrier()
  np.testing.assert_allclose(seen, [19.0 / 4.0, 5.0])


def test_value_with_every_micro_batch_is_the_large_batch_loss():
  """Polyak SGD reads the loss: given with every micro-batch (weights the
  sizes) it steps as on the large batch."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 3)), rng.normal(size=12)
  loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
  w0, rows = (
    jnp.array([0.3, -0.2, 0.1]),
    [slice(0, 2), slice(2, 8), slice(8, 12)],
  )
  inner = optax.polyak_sgd(max_learning_rate=1.0)
  big_loss, big_grad = jax.value_and_grad(loss)(w0, x, y)
  big_step, _ = inner.update(big_grad, inner.init(w0), w0, value=big_loss)
  tx = optax_accum.accumulate(3, inner)
  state, w = tx.init(w0), w0
  for r in rows:
    value, g = jax.value_and_grad(loss)(w0, x[r], y[r])
    n = float(len(y[r]))
    w, state = optax_accum.apply_gradients(
      tx, g, state, w, weight=n, value=value
    )
  np.testing.assert_allclose(w, w0 + big_step, rtol=1e-5)


@pytest.mark.parametrize(
  "given, want",  # (weight, value or None) per micro-batch
  [
    ([(1.0, 2.0), (3.0, None), (2.0, 4.0)], np.nan),  # diluted, were it read
    ([(1.0, None), (2.0, None), (0.0, 5.0)], np.nan),  # only weight 0 gave it
    ([(1.0, 2.0), (0.0, None), (3.0, 6.0)], 5.0),  # weight 0 may lack it
  ],
)
def test_a_value_missing_where_the_weight_is_not_0_reaches_inner_as_nan(
  given, want
):
  seen = []

  def update(updates, state, params=None, *, value):
    del params
    seen.append(float(value))
    return updates, state

  tx = optax_accum.accumulate(3, stateless(update))
  state = tx.init(jnp.zeros(2))
  for weight, value in given:
    kw = {} if value is None else {"value": value}
    _, state = tx.update(jnp.ones(2), state, jnp.zeros(2), weight=weight, **kw)
  np.testing.assert_equal(seen, [want])


def test_reduce_on_plateau_sees_the_window_loss():
  tx = optax_accum.chain(
    optax_accum.accumulate(2),
    optax.contrib.reduce_on_plateau(
      patience=0, factor=0.5, cooldown=0, accumulation_size=1
    ),
  )
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  # Window losses 2.0 then 3.0 (one micro-batch at 0 would read as better).
  for value in (1.0, 3.0, 6.0, 0.0):
    _, state = step(jnp.ones(2), state, params, value=value)
  plateau = state.inner_opt_state
  np.testing.assert_allclose(plateau.best_value, 2.0)
  np.testing.assert_allclose(plateau.scale, 0.5)  # 3.0 did not improve


@pytest.mark.parametrize("form", ["exact", "after_an_element"])
def test_an_integer_value_reaches_inner_as_an_untruncated_mean(form):
  plateau = optax.contrib.reduce_on_plateau(patience=0, atol=1e-6, rtol=0.0)
  head = [optax.identity()] if form == "after_an_element" else []
  tx = optax_accum.chain(
    *head, optax_accum.accumulate(2), optax.sgd(1.0), plateau
  )
  params = jnp.ones(3)
  state = tx.init(params)
  for v in (3, 4):
    params, state = optax_accum.apply_gradients(
      tx, jnp.ones(3), state, params, value=v
    )
  is_plateau = lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)
  (plateau_state,) = [
    s for s in jax.tree.leaves(state, is_leaf=is_plateau) if is_plateau(s)
  ]
  np.testing.assert_allclose(plateau_state.best_value, 3.5)


@pytest.mark.parametrize("as_given", [jnp.float64, float])  # a Python float
@pytest.mark.parametrize("form", ["exact", "after_an_element"])
def test_a_float64_value_keeps_float64_under_x64(form, as_given):
  with jax.enable_x64(True):
    plateau = optax.contrib.reduce_on_plateau(patience=0)
    head = [optax.identity()] if form == "after_an_element" else []
    tx = optax_accum.chain(
      *head, optax_accum.accumulate(2), optax.sgd(1.0), plateau
    )
    params = jnp.ones(3, jnp.float64)
    state = tx.init(params)
    for v in (1e8 + 0.25, 1e8 + 0.5):  # float32 holds neither
      params, state = optax_accum.apply_gradients(
        tx, jnp.ones(3), state, params, value=as_given(v)
      )
    is_plateau = lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)
    (plateau_state,) = [
      s for s in jax.tree.leaves(state, is_leaf=is_plateau) if is_plateau(s)
    ]
    assert float(plateau_state.best_value) - 1e8 == 0.375
