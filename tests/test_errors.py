"""Errors as a table: (call, exception type, argument named). The prose is
free to change; the type and the argument named are the contract."""

from helpers import stateless
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

acc = optax_accum.accumulate
P0 = {"w": jnp.zeros(3)}


def _update(tx, **kw):
  return lambda: tx.update({"w": jnp.ones(3)}, tx.init(P0), P0, **kw)


CASES = {
  "k zero": (lambda: acc(0), ValueError, "every_k_schedule"),
  "k string": (lambda: acc("4"), TypeError, "every_k_schedule"),
  "inner factory": (lambda: acc(2, optax.adam), TypeError, "inner"),
  "nested accumulate": (lambda: acc(2, acc(2)), ValueError, "inner"),
  "float16 sum": (
    lambda: acc(2, accumulator_dtype=jnp.float16),
    ValueError,
    "accumulator_dtype",
  ),
  "skip not callable": (
    lambda: acc(2, should_skip_update_fn=True),
    TypeError,
    "should_skip_update_fn",
  ),
  "axis_name int": (lambda: acc(2, axis_name=3), TypeError, "axis_name"),
  "integer param": (
    lambda: acc(2).init({"w": jnp.zeros(3, jnp.int32)}),
    TypeError,
    "params",
  ),
  "negative weight": (_update(acc(2), weight=-1.0), ValueError, "weight"),
  "string weight": (_update(acc(2), weight="a"), TypeError, "weight"),
  "vector weight": (_update(acc(2), weight=jnp.ones(2)), ValueError, "weight"),
  "weight beyond float32": (_update(acc(2), weight=1e39), ValueError, "weight"),
  # weight x gradient would overflow (1e30 x 1e9) or underflow float32.
  "weight of 1e30": (_update(acc(2), weight=1e30), ValueError, "weight"),
  "weight of 1e-30": (_update(acc(2), weight=1e-30), ValueError, "weight"),
  "int flush": (_update(acc(2), flush=1), TypeError, "flush"),
  "vector value": (_update(acc(2), value=jnp.ones(2)), ValueError, "value"),
  "updates of another shape": (
    lambda: acc(2).update({"w": jnp.ones(4)}, acc(2).init(P0)),
    ValueError,
    "updates",
  ),
  "state of another optimizer": (
    lambda: acc(2).update(P0, optax.sgd(1.0).init(P0)),
    TypeError,
    "state",
  ),
  "params None": (
    lambda: optax_accum.apply_gradients(acc(2), P0, acc(2).init(P0), None),
    ValueError,
    "params",
  ),
  "weight without an accumulator": (
    lambda: optax_accum.apply_gradients(
      optax.sgd(1.0), P0, optax.sgd(1.0).init(P0), P0, weight=2.0
    ),
    ValueError,
    "weight",
  ),
  "chainable form in optax.chain": (
    lambda: optax_accum.apply_gradients(
      (tx := optax.chain(acc(2), optax.adam(0.1))), P0, tx.init(P0), P0
    ),
    ValueError,
    "tx",
  ),
  "chainable form one wrapper deeper": (
    lambda: optax_accum.apply_gradients(
      (
        tx := optax.masked(
          optax.chain(optax.chain(acc(2)), optax.adam(0.1)), {"w": True}
        )
      ),
      P0,
      tx.init(P0),
      P0,
    ),
    ValueError,
    "tx",
  ),
  "two accumulators in chain": (
    lambda: optax_accum.chain(acc(2), acc(3)),
    ValueError,
    "transforms[1]",
  ),
  "chain element not a transformation": (
    lambda: optax_accum.chain(optax.adam),
    TypeError,
    "transforms[0]",
  ),
  "has_updated without an accumulator": (
    lambda: optax_accum.has_updated(optax.sgd(1.0).init(P0)),
    ValueError,
    "opt_state",
  ),
  "microbatches zero": (
    lambda: optax_accum.microbatched_value_and_grad(lambda p, x: (p, 1), 0),
    ValueError,
    "num_microbatches",
  ),
  "batch arguments of two sizes": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x, m: (jnp.sum(x * p) + jnp.sum(m), 1.0),
      2,
      batch_argnums=(1, 2),
    )(1.0, jnp.ones(8), jnp.ones(4)),
    ValueError,
    "batch_argnums",
  ),
  "key_argnum among batch_argnums": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (p, 1.0), 2, batch_argnums=(1, 2), key_argnum=2
    ),
    ValueError,
    "key_argnum",
  ),
  "key_argnum at a float": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x, k: (jnp.sum(x * p), 1.0), 2, key_argnum=2
    )(1.0, jnp.ones(4), jnp.float32(3.0)),
    TypeError,
    "key_argnum",
  ),
  "batch_argnums True": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (p, 1.0), 2, batch_argnums=True
    ),
    ValueError,
    "batch_argnums",
  ),
  "sq_norms not a bool": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (p, 1.0), 2, sq_norms="yes"
    ),
    TypeError,
    "sq_norms",
  ),
  "has_aux not a bool": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (p, 1.0), 2, has_aux=1
    ),
    TypeError,
    "has_aux",
  ),
  "params a list for dict updates": (
    lambda: optax_accum.apply_gradients(
      acc(1, optax.adamw(0.1)),
      {"w": jnp.ones(3), "b": jnp.ones(2)},
      acc(1, optax.adamw(0.1)).init({"w": jnp.ones(3), "b": jnp.ones(2)}),
      [jnp.ones(3), jnp.ones(2)],
    ),
    ValueError,
    "params",
  ),
  "params missing a leaf, before adamw reads them": (
    lambda: jax.jit(acc(2, optax.adamw(0.1)).update)(
      {"w": jnp.ones(3), "b": jnp.ones(2)},
      acc(2, optax.adamw(0.1)).init({"w": jnp.ones(3), "b": jnp.ones(2)}),
      {"w": jnp.ones(3)},
    ),
    ValueError,
    "params",
  ),
  "params a list around the gradient's array": (
    lambda: acc(2, optax.sgd(0.1)).update(
      jnp.ones(3), acc(2, optax.sgd(0.1)).init(jnp.ones(3)), [jnp.ones(3)]
    ),
    ValueError,
    "params",
  ),
  "LookaheadParams of another shape": (
    lambda: acc(2, optax.lookahead(optax.sgd(0.1), 2, 0.5)).update(
      {"w": jnp.ones(3)},
      acc(2, optax.lookahead(optax.sgd(0.1), 2, 0.5)).init(P0),
      optax.LookaheadParams.init_synced({"w": jnp.ones((4, 3))}),
    ),
    ValueError,
    "params",
  ),
  "loss_fn not callable": (
    lambda: optax_accum.microbatched_value_and_grad("loss", 2),
    TypeError,
    "loss_fn",
  ),
  "batch leaves of two sizes": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, b: (jnp.sum(b["x"] * p) + jnp.sum(b["c"]), 1.0), 2
    )(1.0, {"x": jnp.ones(8), "c": jnp.ones(4)}),
    ValueError,
    "batch_argnums",
  ),
  "per-member weight with shared counters": (
    lambda: _shared_vmap_step(weight=jnp.array([1.0, 2.0, 3.0])),
    ValueError,
    "weight",
  ),
  "per-member flush with shared counters": (
    lambda: _shared_vmap_step(flush=jnp.array([True, False, True])),
    ValueError,
    "flush",
  ),
  "a CheckpointManager as checkpointer": (
    lambda: optax_accum.restore_checkpoint(
      "/nonexistent", acc(2), P0, _Manager()
    ),
    TypeError,
    "checkpointer",
  ),
  "optax.MultiSteps nested": (
    lambda: acc(
      2, optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation()
    ).init(P0),
    ValueError,
    "inner",
  ),
  "optax.apply_every nested": (
    lambda: acc(2, optax.chain(optax.apply_every(2), optax.sgd(1.0))).init(P0),
    ValueError,
    "inner",
  ),
  "an exact form's state for another inner": (
    lambda: acc(2, optax.adam(1.0)).update(
      P0, acc(2, optax.sgd(1.0)).init(P0), P0
    ),
    ValueError,
    "state",
  ),
  "the same under jit": (
    lambda: jax.jit(acc(2, optax.sgd(1.0)).update)(
      P0, acc(2, optax.adam(1.0)).init(P0), P0
    ),
    ValueError,
    "state",
  ),
  "optax.MultiSteps before an accumulator": (
    lambda: optax_accum.chain(
      optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation(),
      acc(2),
      optax.sgd(1.0),
    ).init(P0),
    ValueError,
    "transforms[0]",
  ),
  "integer gradients": (
    lambda: acc(2, optax.sgd(1.0)).update(
      {"w": jnp.ones(3, jnp.int32)}, acc(2).init(P0)
    ),
    TypeError,
    "updates",
  ),
  "bool gradients": (
    lambda: acc(2).update({"w": jnp.ones(3, bool)}, acc(2).init(P0)),
    TypeError,
    "updates",
  ),
  "schedule branching in Python": (
    lambda: acc(lambda s: 2 if s < 100 else 8),
    TypeError,
    "every_k_schedule",
  ),
  "schedule of no argument": (
    lambda: acc(lambda: 2),
    TypeError,
    "every_k_schedule",
  ),
  "unroll of -1": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (p, 1.0), 2, unroll=-1
    ),
    TypeError,
    "unroll",
  ),
  "microbatched with an integer param": (
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (jnp.sum(p["w"] * x), 1.0), 2
    )({"w": jnp.ones(3), "n": jnp.int32(0)}, jnp.ones((4, 3))),
    TypeError,
    "params",
  ),
  "a state made on another mesh": (
    lambda: _other_mesh_step(),  # noqa: PLW0108
    ValueError,
    "state",
  ),
}


class _Manager:
  """Stands for an orbax CheckpointManager (what restore_checkpoint reads)."""

  def latest_step(self):
    return 0


def _shared_vmap_step(**per_member):
  tx = optax_accum.chain(acc(2), optax.adam(0.1))
  members = jnp.zeros((3, 4))
  state, axes = optax_accum.share_counters(jax.vmap(tx.init)(members))
  ((name, value),) = per_member.items()
  step = jax.vmap(
    lambda p, s, g, x: optax_accum.apply_gradients(tx, g, s, p, **{name: x}),
    in_axes=(0, axes, 0, 0),
    out_axes=(0, axes),
  )
  return step(members, state, jnp.ones((3, 4)), value)


def _other_mesh_step():
  tx = acc(2, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    state = tx.init(P0)
  mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  with jax.set_mesh(mesh4):
    grads = jax.tree.map(lambda x: jax.device_put(x, jax.P()), P0)
    return jax.jit(tx.update)(grads, state)


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_error_names_its_argument(name):
  call, error, argument = CASES[name]
  with pytest.raises(error) as e:
    call()
  assert e.value.argument == argument
  assert f"`{argument}`" in str(e.value)


def test_the_chainable_form_message_names_the_exact_spelling():
  tx = optax.chain(acc(2), optax.adam(0.1))
  with pytest.raises(ValueError, match=r"optax_accum\.chain\(.*accumulate"):
    optax_accum.apply_gradients(tx, P0, tx.init(P0), P0)


def test_x64_with_strict_promotion_trains_and_is_exact():
  """Weights and the mean in the accumulator's dtype: float64 windows with
  fractional weights match the float64 large batch to 1e-12."""
  with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=3))}
    grads = [jnp.asarray(rng.normal(size=3)) for _ in range(3)]
    weights = [0.1, 0.7, 1.3]
    tx = acc(3, optax.sgd(1.0))
    state = tx.init(params)
    for g, w in zip(grads, weights):
      new, state = optax_accum.apply_gradients(
        tx, {"w": g}, state, params, weight=w
      )
    mean = sum(w * g for w, g in zip(weights, grads)) / sum(weights)
    np.testing.assert_allclose(new["w"], params["w"] - mean, rtol=1e-12)
    assert new["w"].dtype == jnp.float64
    assert state.acc_weight.dtype == jnp.float64


@pytest.mark.parametrize("value", ["a", 1j, [1.0]])
def test_a_value_or_weight_that_is_not_a_real_scalar_names_it(value):
  for name in ("weight", "value"):
    with pytest.raises((TypeError, ValueError)) as e:
      _update(acc(2), **{name: value})()
    assert e.value.argument == name


def test_strict_promotion_takes_mixed_weight_and_value_dtypes():
  """Integer and float64 weights and values reach the accumulator cast to
  its dtypes, under strict promotion, jitted, with and without x64."""
  for x64 in (False, True):
    with jax.enable_x64(x64), jax.numpy_dtype_promotion("strict"):
      tx = acc(2, optax.sgd(1.0))
      step = jax.jit(
        lambda g, s, p, w, v, tx=tx: optax_accum.apply_gradients(
          tx, g, s, p, weight=w, value=v
        )
      )
      params = {"w": jnp.zeros(3)}
      state = tx.init(params)
      for w, v in ((jnp.int32(3), jnp.int32(2)), (1.0, 4.0)):
        params, state = step({"w": jnp.ones(3)}, state, params, w, v)
      np.testing.assert_allclose(params["w"], -1.0)
      assert int(state.gradient_step) == 1


def test_microbatched_float64_is_exact_with_fractional_weights():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(24, 3)))
    mask = jnp.asarray(rng.uniform(size=24))

    def loss_fn(w, x, m):
      n = jnp.sum(m)
      return jnp.sum(m * (x @ w) ** 2) / n, n

    w = jnp.asarray(rng.normal(size=3))
    f = optax_accum.microbatched_value_and_grad(
      loss_fn, 4, batch_argnums=(1, 2)
    )
    loss, g, n = jax.jit(f)(w, x, mask)
    want_loss, want_g = jax.value_and_grad(lambda w: loss_fn(w, x, mask)[0])(w)
    np.testing.assert_allclose(g, want_g, rtol=1e-12)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    assert n.dtype == jnp.float64


def test_an_inner_whose_state_is_none_is_an_exact_form():
  """None marks the chainable form; an inner's own None state does not."""
  none_state = optax.GradientTransformation(
    lambda p: None, lambda u, s, p=None: (u, s)
  )
  tx = optax.chain(acc(2, none_state))
  params, state = P0, tx.init(P0)
  for g in (1.0, 3.0):
    params, state = optax_accum.apply_gradients(
      tx, {"w": jnp.full(3, g)}, state, params
    )
  np.testing.assert_allclose(params["w"], 2.0)


def test_share_counters_refuses_any_skip_function():
  skip = lambda m, s, p: (jnp.sum(m) > 0, ())  # noqa: E731
  tx = acc(2, optax.sgd(1.0), should_skip_update_fn=skip)
  with pytest.raises(ValueError) as e:
    optax_accum.share_counters(jax.vmap(tx.init)(jnp.zeros((2, 3))))
  assert e.value.argument == "opt_state"


def test_eager_inner_runs_as_python_once_per_window():
  """An inner branching in Python on values works eagerly: it runs once per
  window, on values; mid-steps do not run it, even abstractly."""
  calls = []

  def update(u, s, p=None):
    calls.append(not isinstance(u["w"], jax.core.Tracer))
    scale = 0.5 if float(jnp.sum(u["w"])) > 0 else 2.0
    return jax.tree.map(lambda x: -scale * x, u), s

  tx = acc(2, stateless(update))
  state = tx.init(P0)
  outs = []
  for g in (1.0, 3.0, -1.0, -3.0):
    u, state = tx.update({"w": jnp.full(3, g)}, state, P0)
    outs.append(float(u["w"][0]))
  assert outs == [0.0, -1.0, 0.0, 4.0] and calls == [True, True]


def test_a_schedule_returning_none_names_every_k_schedule():
  with pytest.raises(TypeError) as e:
    acc(lambda step: None)
  assert e.value.argument == "every_k_schedule"


@pytest.mark.parametrize("big", [2**40, np.int64(2**32 + 4)])
def test_a_large_integer_weight_is_kept_whole(big):
  """Not narrowed to int32 (which wraps numpy's and overflows Python's)."""
  tx = acc(2, optax.sgd(1.0))
  state = tx.init(P0)
  _, state = tx.update({"w": jnp.full(3, 5.0)}, state, P0, weight=big)
  u, state = tx.update({"w": jnp.ones(3)}, state, P0, weight=1)
  want = -(5.0 * float(big) + 1.0) / (float(big) + 1.0)
  np.testing.assert_allclose(u["w"], want, rtol=1e-6)


def test_a_large_count_passed_to_jit_as_a_float_is_exact():
  """docs/getting-started.md: counts beyond 2**31 go to jit as floats."""
  tx = acc(2, optax.sgd(1.0))
  step = jax.jit(lambda g, s, w: tx.update(g, s, P0, weight=w))
  _, state = step({"w": jnp.full(3, 5.0)}, tx.init(P0), float(2**32))
  u, _ = step({"w": jnp.ones(3)}, state, 1.0)
  want = -(5.0 * 2**32 + 1.0) / (2**32 + 1.0)
  np.testing.assert_allclose(u["w"], want, rtol=1e-6)


@pytest.mark.parametrize("flag", [np.bool_(True), jnp.array(True)])
def test_has_aux_takes_numpy_and_jax_bools(flag):
  loss = lambda w, x: (jnp.mean(x * w), (x.shape[0], {"m": jnp.mean(x)}))  # noqa: E731
  f = optax_accum.microbatched_value_and_grad(loss, 2, has_aux=flag)
  (_, aux), g, n = f(1.0, jnp.arange(4.0))
  np.testing.assert_allclose([aux["m"], g, n], [1.5, 1.5, 4.0])


def test_value_none_means_not_given():
  tx = acc(2, optax.sgd(1.0))
  g = {"w": jnp.ones(3)}
  s1, s2 = tx.init(P0), tx.init(P0)
  for _ in range(2):
    u1, s1 = tx.update(g, s1, P0, value=None)
    u2, s2 = tx.update(g, s2, P0)
  np.testing.assert_array_equal(u1["w"], u2["w"])
  assert float(s1.acc_value) == 0.0
