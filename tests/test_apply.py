"""apply_gradients: the fused update-and-apply (issue 9)."""

import chex
from helpers import counting_inner
from helpers import grad_fn
from helpers import microbatches
from helpers import stateless
from helpers import train_large_batch
import hlo as hlo_lib
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

K = 4

OPTIMIZERS = {
  "accumulate": lambda: optax_accum.accumulate(K, optax.adamw(1e-2)),
  "chain": lambda: optax_accum.chain(
    optax.clip_by_global_norm(1.0), optax_accum.accumulate(K), optax.adamw(1e-2)
  ),
  # A wrapper optax_accum did not build, around an exact form.
  "nested": lambda: optax.chain(optax_accum.accumulate(K, optax.adamw(1e-2))),
  "plain_optax": lambda: optax.adamw(1e-2),
}


def _train(step, tx, params, xs, ys):
  params = jax.tree.map(jnp.array, params)  # a copy the step may donate
  state = tx.init(params)
  trajectory = []
  for x, y in zip(xs, ys):
    for xm, ym in microbatches(x, y, K):
      params, state = step(grad_fn(params, xm, ym), state, params)
      trajectory.append(jax.tree.map(np.array, params))  # before donation
  return trajectory, jax.tree.map(np.array, state)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_same_numbers_as_update_then_apply_updates(problem, name):
  params, xs, ys = problem
  tx = OPTIMIZERS[name]()

  def fused(g, s, p):
    return optax_accum.apply_gradients(tx, g, s, p)

  def two_lines(g, s, p):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  donate = dict(donate_argnums=(1, 2))
  got, got_state = _train(jax.jit(fused, **donate), tx, params, xs, ys)
  want, want_state = _train(jax.jit(two_lines, **donate), tx, params, xs, ys)
  # Mid-steps are bit for bit. On the emitting mini-step XLA fuses the inner
  # update with the apply into one kernel and may contract a multiply-add
  # differently, a last-bit difference (documented in apply_gradients).
  for i, (g, w) in enumerate(zip(got, want)):
    if name == "plain_optax" or i < K - 1:
      chex.assert_trees_all_equal(g, w)
    else:
      chex.assert_trees_all_close(g, w, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-6, atol=1e-7)


def test_matches_large_batch_and_leaves_params_alone_on_mid_steps(problem):
  params, xs, ys = problem
  tx = optax_accum.chain(optax_accum.accumulate(K), optax.adam(1e-2))
  step = jax.jit(lambda g, s, p: optax_accum.apply_gradients(tx, g, s, p))
  trajectory, _ = _train(step, tx, params, xs, ys)
  for i, p in enumerate(trajectory):
    if i % K != K - 1:  # a mid-step: the params of the last window
      before = trajectory[i - 1] if i else params
      chex.assert_trees_all_equal(p, before)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(trajectory[-1], want, rtol=1e-5, atol=1e-6)


def test_weight_and_flush_reach_the_accumulator():
  tx = optax_accum.chain(optax_accum.accumulate(3), optax.sgd(1.0))
  params = jnp.zeros(2)
  state = tx.init(params)
  params, state = optax_accum.apply_gradients(
    tx, jnp.full(2, 1.0), state, params, weight=1.0
  )
  params, state = optax_accum.apply_gradients(
    tx, jnp.full(2, 4.0), state, params, weight=3.0, flush=True
  )
  chex.assert_trees_all_close(params, jnp.full(2, -13.0 / 4.0))
  assert int(state.gradient_step) == 1


def test_inner_update_runs_once_per_window():
  calls = []
  tx = optax_accum.accumulate(K, counting_inner(calls))
  params = jnp.zeros(3)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: optax_accum.apply_gradients(tx, g, s, p))
  for _ in range(3 * K):
    params, state = step(jnp.ones(3), state, params)
  jax.effects_barrier()
  assert len(calls) == 3


def _full_size_copies(step, params, *args):
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, *args)
  return hlo_lib.full_size_copies(compiled.compile().as_text(), params)


@pytest.mark.parametrize("name", ["accumulate", "chain"])
def test_donated_step_copies_no_full_size_buffer(name):
  # Distinct shapes, so XLA cannot share one zeros buffer between leaves.
  params = {"w": jnp.zeros((37, 41)), "b": jnp.zeros(43)}
  tx = OPTIMIZERS[name]()

  def step(params, state, grads):
    return optax_accum.apply_gradients(tx, grads, state, params)

  assert _full_size_copies(step, params, tx.init(params), params) == 0

  def reversed_order(params, state, grads):
    params, state = optax_accum.apply_gradients(tx, grads, state, params)
    return state, params

  # Documented: JAX pairs donated inputs with outputs of the same shape in
  # order, so returning them in another order than they came in copies.
  assert _full_size_copies(reversed_order, params, tx.init(params), params)


def test_a_factory_as_tx_raises_naming_tx():
  with pytest.raises(TypeError):
    optax_accum.apply_gradients(optax.adam, jnp.ones(2), (), jnp.zeros(2))


def test_weight_or_flush_without_an_accumulator_raises():
  tx = optax.adamw(1e-2)
  params = jnp.zeros(2)
  state = tx.init(params)
  with pytest.raises(ValueError):
    optax_accum.apply_gradients(tx, jnp.ones(2), state, params, weight=0.0)


def test_multisteps_as_tx_raises_saying_what_to_write():
  tx = optax.MultiSteps(optax.adam(1e-2), K)
  with pytest.raises(TypeError):
    optax_accum.apply_gradients(tx, jnp.ones(2), (), jnp.zeros(2))


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax.chain(optax_accum.accumulate(K), optax.adam(1e-2)),
    lambda: optax.chain(
      optax.chain(optax_accum.accumulate(K), optax.adam(1e-2))
    ),
    lambda: optax.masked(
      optax.chain(optax_accum.accumulate(K), optax.adam(1e-2)),
      {"w": True, "b": False},
    ),
    lambda: optax.named_chain(
      ("acc", optax_accum.accumulate(K)), ("adam", optax.adam(1e-2))
    ),
    # One wrapper deeper than 0.3 could see (0.7555 against 0.8065).
    lambda: optax.masked(
      optax.chain(optax.chain(optax_accum.accumulate(K)), optax.adam(1e-2)),
      {"w": True, "b": True},
    ),
  ],
)
def test_chainable_form_raises_saying_what_to_write(problem, make):
  params, _, _ = problem
  tx = make()
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError):
    optax_accum.apply_gradients(tx, grads, tx.init(params), params)


def test_accumulators_under_partition_labels_are_exact(problem):
  params, xs, ys = problem
  tx = optax.partition(
    {
      "w": optax_accum.accumulate(K, optax.adam(1e-2)),
      "b": optax_accum.accumulate(K, optax.adam(1e-2)),
    },
    {"w": "w", "b": "b"},
  )
  step = jax.jit(lambda g, s, p: optax_accum.apply_gradients(tx, g, s, p))
  trajectory, _ = _train(step, tx, params, xs, ys)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(trajectory[-1], want, rtol=1e-5, atol=1e-6)


def _tuple_wrapper(tx):
  def update(u, s, p=None, **kw):
    u, inner = tx.update(u, s[0], p, **kw)
    return u, (inner,)

  return optax.GradientTransformationExtraArgs(lambda p: (tx.init(p),), update)


@pytest.mark.parametrize(
  "make",
  [
    # Exact forms inside wrappers optax_accum did not build: the presence
    # rule lets them through, and they are exact whatever wraps them.
    lambda: optax.masked(
      optax_accum.chain(
        optax.scale(1.0), optax_accum.accumulate(K), optax.adam(1e-2)
      ),
      {"w": True, "b": True},
    ),
    lambda: optax.chain(
      optax.inject_hyperparams(optax_accum.accumulate)(
        every_k_schedule=K, inner=optax.adam(1e-2)
      )
    ),
    # A user's wrapper whose state is a plain tuple.
    lambda: _tuple_wrapper(optax_accum.accumulate(K, optax.adam(1e-2))),
  ],
)
def test_wrapped_exact_forms_are_the_large_batch(problem, make):
  params, xs, ys = problem
  tx = make()
  step = jax.jit(lambda g, s, p: optax_accum.apply_gradients(tx, g, s, p))
  trajectory, _ = _train(step, tx, params, xs, ys)
  want, _ = train_large_batch(optax.adam(1e-2), params, xs, ys)
  chex.assert_trees_all_close(trajectory[-1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["accumulate", "chain"])
def test_a_param_of_another_shape_than_its_gradient_raises_naming_it(name):
  tx = OPTIMIZERS[name]()
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError):
    optax_accum.apply_gradients(tx, params, state, {"w": jnp.zeros(4)})


def test_the_chainable_form_before_lookahead_emits_the_gradients_structure():
  """Eager mid-steps of accumulate(k) emit zeros like its mean, whatever
  params a follower (optax.lookahead) takes."""
  params = {"w": jnp.ones(3)}
  tx = optax.chain(
    optax_accum.accumulate(2), optax.lookahead(optax.sgd(0.1), 2, 0.5)
  )
  lp, state = optax.LookaheadParams.init_synced(params), tx.init(params)
  for _ in range(4):
    u, state = tx.update({"w": jnp.ones(3)}, state, lp)
    lp = optax.apply_updates(lp, u)
  assert jax.tree.structure(lp) == jax.tree.structure(
    optax.LookaheadParams.init_synced(params)
  )
  assert not np.allclose(lp.fast["w"], 1.0)


@pytest.mark.parametrize("two_lines", [False, True])
def test_params_of_another_structure_than_the_gradients_work(
  problem, two_lines
):
  # optax.lookahead takes LookaheadParams(fast, slow) and fast's gradients;
  # eager mid-steps emit zeros structured as its updates (as under jit).
  params, xs, ys = problem
  look = lambda: optax.lookahead(optax.adam(1e-2), 2, 0.5)  # noqa: E731
  lookahead_params = optax.LookaheadParams.init_synced(params)
  tx = optax_accum.accumulate(K, look())
  ms = optax.MultiSteps(look(), K)
  # lookahead's init takes the fast params too.
  state, ms_state = tx.init(params), ms.init(params)
  p, q = lookahead_params, lookahead_params
  for x, y in zip(xs, ys):
    for xm, ym in microbatches(x, y, K):
      g = grad_fn(p.fast, xm, ym)
      if two_lines:
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
      else:
        p, state = optax_accum.apply_gradients(tx, g, state, p)
      updates, ms_state = ms.update(grad_fn(q.fast, xm, ym), ms_state, q)
      q = optax.apply_updates(q, updates)
  chex.assert_trees_all_close(p, q, rtol=1e-5, atol=1e-7)
  assert int(state.gradient_step) == len(xs)


@pytest.mark.parametrize(
  "made_by, used_by, error",
  [
    ("accumulate", "chain", TypeError),
    ("chain", "accumulate", TypeError),
  ],
)
def test_the_state_of_another_optimizer_raises(made_by, used_by, error):
  adamw = lambda: optax.adamw(1e-2)  # noqa: E731
  txs = dict(
    OPTIMIZERS,
    sgd_chain=lambda: optax_accum.chain(
      optax_accum.accumulate(K), optax.sgd(0.1)
    ),
    bfloat16=lambda: optax_accum.accumulate(
      K, adamw(), accumulator_dtype=jnp.bfloat16
    ),
    skip=lambda: optax_accum.accumulate(
      K, adamw(), should_skip_update_fn=optax.skip_not_finite
    ),
  )
  params = {"w": jnp.zeros(3)}
  state = txs[made_by]().init(params)
  with pytest.raises(error):
    optax_accum.apply_gradients(txs[used_by](), params, state, params)


@pytest.mark.parametrize(
  "typo, meant", [("wieght", "weight"), ("flsh", "flush")]
)
def test_a_misspelt_keyword_warns_naming_the_one_meant(typo, meant):
  tx, chain, sgd = (
    OPTIMIZERS["accumulate"](),
    OPTIMIZERS["chain"](),
    optax.sgd(1),
  )
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  calls = {
    "apply_gradients": lambda: optax_accum.apply_gradients(
      tx, params, state, params, **{typo: 2.0}
    ),
    "update": lambda: tx.update(params, state, params, **{typo: 2.0}),
    "jitted update": lambda: jax.jit(
      lambda p, s: tx.update(p, s, p, **{typo: 2.0})
    )(params, state),
    # optax_accum.chain's jitted call is cached: it warns on every call.
    "chain, second call": lambda: [
      optax_accum.apply_gradients(
        chain, params, chain.init(params), params, **{typo: 2.0}
      )
      for _ in range(2)
    ][-1],
    "no accumulator": lambda: optax_accum.apply_gradients(
      sgd, params, sgd.init(params), params, **{typo: 2.0}
    ),
  }
  for name, call in calls.items():
    with pytest.warns(UserWarning, match=rf"`{typo}`.*mean `{meant}`") as w:
      call()
    assert w[-1].filename == __file__, name  # the user's line
    if name == "chain, second call":
      assert len(w) >= 2


def test_other_keywords_reach_inner_unchanged():
  seen = []

  def update(updates, state, params=None, *, value_fn):
    del params
    seen.append(value_fn)
    return updates, state

  inner = stateless(update)
  tx = optax_accum.accumulate(1, inner)
  params = jnp.zeros(2)
  f = jnp.sum
  optax_accum.apply_gradients(tx, params, tx.init(params), params, value_fn=f)
  assert seen == [f]


def test_the_docstring_donation_order_copies_no_full_size_buffer():
  """apply_gradients' example donates (params, state) and returns them in
  that order: nothing is copied; the other order copies."""
  import hlo as hlo_lib  # pylint: disable=g-import-not-at-top

  tx = optax_accum.chain(optax_accum.accumulate(2), optax.adamw(0.5))
  params = {"w": jnp.zeros((37, 41)), "b": jnp.zeros(43)}
  step = lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p)  # noqa: E731
  swapped = lambda p, s, g: step(p, s, g)[::-1]  # noqa: E731

  def copies(fn):
    hlo = (
      jax.jit(fn, donate_argnums=(0, 1))
      .lower(params, tx.init(params), params)
      .compile()
      .as_text()
    )
    return hlo_lib.full_size_copies(hlo, params)

  assert copies(step) == 0
  assert copies(swapped) > 0
