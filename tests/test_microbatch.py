"""microbatched_value_and_grad: in-step micro-batching (issue 9)."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

B, T, D = 8, 6, 3


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(D,)), jnp.float32),
    "b": jnp.asarray(0.3, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  # Uneven token counts: micro-batches of 2 sequences hold 1 to 12 tokens.
  lengths = np.array([6, 6, 1, 0, 3, 5, 2, 6])
  mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32)
  return params, x, y, mask


def _masked_mean_loss(params, x, y, mask):
  err = (x @ params["w"] + params["b"] - y) ** 2
  n = jnp.sum(mask)
  loss = jnp.sum(err * mask) / jnp.maximum(n, 1.0)
  return loss, (
    n,
    {"abs_err": jnp.sum(jnp.sqrt(err) * mask) / jnp.maximum(n, 1.0)},
  )


def _masked_sum_loss(params, x, y, mask):
  loss, (n, _) = _masked_mean_loss(params, x, y, mask)
  return loss * n, n


@pytest.mark.parametrize("unroll", [1, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradient_is_the_global_token_mean_gradient(k, unroll):
  params, x, y, mask = _problem()
  f = optax_accum.microbatched_value_and_grad(
    _masked_mean_loss,
    k,
    has_aux=True,
    batch_argnums=(1, 2, 3),
    unroll=unroll,
  )
  (loss, aux), grads, weight = jax.jit(f)(params, x, y, mask)
  (want_loss, (n, want_aux)), want_grads = jax.value_and_grad(
    _masked_mean_loss, has_aux=True
  )(params, x, y, mask)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(aux, want_aux, rtol=1e-5)
  assert float(weight) == float(n) == 29.0
  chex.assert_trees_all_equal_dtypes(grads, params)


def test_unweighted_mean_of_means_would_be_wrong():
  """The check above could fail: the naive mean differs here."""
  params, x, y, mask = _problem()
  per_micro = [
    jax.grad(lambda p, *a: _masked_mean_loss(p, *a)[0])(
      params, x[i : i + 2], y[i : i + 2], mask[i : i + 2]
    )
    for i in range(0, B, 2)
  ]
  naive = jax.tree.map(lambda *g: sum(g) / 4, *per_micro)
  want = jax.grad(lambda p: _masked_mean_loss(p, x, y, mask)[0])(params)
  assert (
    max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(naive), jax.tree.leaves(want))
    )
    > 1e-2
  )


def test_sum_reduction_gives_the_same_mean():
  params, x, y, mask = _problem()
  f = optax_accum.microbatched_value_and_grad(
    _masked_sum_loss, 4, reduction="sum", batch_argnums=(1, 2, 3)
  )
  loss, grads, _ = jax.jit(f)(params, x, y, mask)
  want_loss, want_grads = jax.value_and_grad(
    lambda p: _masked_mean_loss(p, x, y, mask)[0]
  )(params)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_each_microbatch_gets_its_own_key():
  def noisy_loss(w, x, key):
    noise = jax.random.normal(key, x.shape)
    return jnp.mean((x + noise) * w), x.shape[0]

  x = jnp.ones((4, 2))
  key = jax.random.key(7)
  f = optax_accum.microbatched_value_and_grad(noisy_loss, 2, key_argnum=2)
  _, g, _ = f(jnp.float32(1.0), x, key)
  want = (
    sum(
      jax.grad(
        lambda w, i=i: noisy_loss(
          w, x[2 * i : 2 * i + 2], jax.random.fold_in(key, i)
        )[0]
      )(1.0)
      for i in range(2)
    )
    / 2
  )
  np.testing.assert_allclose(g, want, rtol=1e-6)


def test_in_step_and_cross_step_compose_into_the_global_mean():
  params, x, y, mask = _problem()
  f = jax.jit(
    optax_accum.microbatched_value_and_grad(
      _masked_mean_loss, 2, has_aux=True, batch_argnums=(1, 2, 3)
    )
  )
  tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(1.0))
  state = tx.init(params)
  p = params
  for half in (slice(0, 4), slice(4, 8)):  # 2 steps x 2 micro-batches
    _, grads, weight = f(params, x[half], y[half], mask[half])
    p, state = optax_accum.apply_gradients(tx, grads, state, p, weight=weight)
  want = jax.grad(lambda q: _masked_mean_loss(q, x, y, mask)[0])(params)
  chex.assert_trees_all_close(
    p, jax.tree.map(lambda a, g: a - g, params, want), rtol=1e-5, atol=1e-6
  )


def test_zero_weight_microbatch_adds_nothing_even_nan():
  def loss_fn(w, x, n):
    return jnp.sum(x * w) / n[0], n[0]  # n = 0: a NaN loss and gradient

  x = jnp.array([1.0, 3.0, 5.0, 7.0])
  n = jnp.array([2.0, 2.0, 0.0, 0.0])
  f = optax_accum.microbatched_value_and_grad(loss_fn, 2, batch_argnums=(1, 2))
  loss, g, weight = f(jnp.float32(1.0), x, n)
  np.testing.assert_allclose(g, 2.0)  # (1 + 3) / 2, the first half alone
  np.testing.assert_allclose(loss, 2.0)
  assert float(weight) == 2.0


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(D, 1, rngs=rngs)

  def __call__(self, x):
    return self.lin(x)[..., 0]


def test_works_with_nnx_through_split_and_merge():
  _, x, y, mask = _problem()
  model = _Model(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, x, y, mask):
    m = nnx.merge(graphdef, params, rest)
    n = jnp.sum(mask)
    return jnp.sum((m(x) - y) ** 2 * mask) / jnp.maximum(n, 1.0), n

  f = optax_accum.microbatched_value_and_grad(
    loss_fn, 4, batch_argnums=(1, 2, 3)
  )
  _, grads, _ = jax.jit(f)(params, x, y, mask)
  want = nnx.grad(lambda m: jnp.sum((m(x) - y) ** 2 * mask) / jnp.sum(mask))(
    model
  )
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"num_microbatches": 0}, r"`num_microbatches` must be a positive int"),
    ({"num_microbatches": 2.0}, r"`num_microbatches` must be a positive int"),
    ({"num_microbatches": 2, "reduction": "avg"}, r"`reduction` must be"),
    ({"num_microbatches": 2, "batch_argnums": 0}, r"`batch_argnums` must"),
  ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
  with pytest.raises(ValueError):
    optax_accum.microbatched_value_and_grad(_masked_mean_loss, **kwargs)


def test_batch_not_divisible_raises_naming_the_leaf():
  params, x, y, mask = _problem()
  f = optax_accum.microbatched_value_and_grad(
    _masked_mean_loss, 3, has_aux=True, batch_argnums=(1, 2, 3)
  )
  with pytest.raises(ValueError):
    f(params, x, y, mask)


def test_float16_loss_with_a_large_token_count_stays_finite():
  params = {"w": jnp.ones(3, jnp.float16)}
  x = jnp.full((4, 3), 0.1, jnp.float16)
  loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
  f = optax_accum.microbatched_value_and_grad(
    lambda p, x: (loss(p, x), 70000.0), 2
  )
  _, grads, weight = f(params, x)
  want = jax.grad(loss)(params, x)
  chex.assert_trees_all_close(grads, want, rtol=2e-3)
  assert float(weight) == 140000.0


@pytest.mark.parametrize("bad", [jnp.nan, -1.0])
def test_negative_or_nan_weight_poisons_the_result(bad):
  def loss_fn(w, x, n):
    return jnp.mean((x * w) ** 2), n[0]

  x = jnp.arange(1.0, 5.0)
  n = jnp.array([1.0, bad, 1.0, 1.0])
  loss, g, weight = optax_accum.microbatched_value_and_grad(
    loss_fn, 4, batch_argnums=(1, 2)
  )(jnp.float32(1.0), x, n)
  assert np.isnan(float(g)) and np.isnan(float(loss))
  assert np.isnan(float(weight))


@pytest.mark.parametrize(
  "returns, has_aux",
  [
    (lambda v: v, False),  # no weight
    (lambda v: (v, 1.0), True),  # has_aux but no (weight, aux) pair
    (lambda v: (v, (1.0, {})), False),  # aux without has_aux
  ],
)
def test_loss_fn_of_another_form_raises_naming_the_form(returns, has_aux):
  f = optax_accum.microbatched_value_and_grad(
    lambda w, x: returns(jnp.mean(x * w)), 2, has_aux=has_aux
  )
  with pytest.raises((ValueError, TypeError)):
    f(jnp.float32(1.0), jnp.ones(4))


def test_argnum_beyond_the_arguments_raises():
  f = optax_accum.microbatched_value_and_grad(
    lambda w, x: (jnp.mean(x * w), 1.0), 2, batch_argnums=(1, 2)
  )
  with pytest.raises(ValueError):
    f(jnp.float32(1.0), jnp.ones(4))


def test_sum_reduction_combines_aux_as_per_microbatch_means():
  def loss_fn(w, x):
    sq = (x * w) ** 2
    return jnp.sum(sq), (x.shape[0], {"mean_sq": jnp.mean(sq)})

  x = jnp.array([1.0, 1.0, 1.0, 3.0])
  f = optax_accum.microbatched_value_and_grad(
    loss_fn, 2, has_aux=True, reduction="sum"
  )
  (loss, aux), _, n = f(jnp.float32(1.0), x)
  np.testing.assert_allclose(loss, 3.0)  # sum over items / items
  np.testing.assert_allclose(aux["mean_sq"], 3.0)  # (2 * 1 + 2 * 5) / 4
  assert float(n) == 4.0


def test_float64_loss_and_aux_keep_float64_under_x64():
  with jax.enable_x64(True):
    params, x, y, mask = jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float64), _problem()
    )
    f = optax_accum.microbatched_value_and_grad(
      _masked_mean_loss, 4, has_aux=True, batch_argnums=(1, 2, 3)
    )
    (loss, aux), grads, _ = jax.jit(f)(params, x, y, mask)
    (want_loss, (_, want_aux)), want_grads = jax.value_and_grad(
      _masked_mean_loss, has_aux=True
    )(params, x, y, mask)
    assert loss.dtype == aux["abs_err"].dtype == jnp.float64
    # float32 sums would be off by about 1e-8.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-13)
    np.testing.assert_allclose(aux["abs_err"], want_aux["abs_err"], rtol=1e-13)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-13)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), None])
def test_a_bad_concrete_weight_from_loss_fn_raises(weight):
  f = optax_accum.microbatched_value_and_grad(
    lambda p, x: (jnp.sum(x @ p), weight), 2
  )
  with pytest.raises(ValueError):
    f(jnp.ones(3), jnp.ones((4, 3)))


def test_a_numpy_integer_k_is_taken_as_accumulate_takes_it():
  loss_fn = lambda p, x: (jnp.mean(x * p), jnp.float32(x.shape[0]))  # noqa: E731
  x = jnp.arange(8.0)
  loss, grad, n = optax_accum.microbatched_value_and_grad(loss_fn, np.int64(4))(
    2.0, x
  )
  assert float(n) == 8.0 and jnp.allclose(grad, jnp.mean(x))
  assert jnp.allclose(loss, 2.0 * jnp.mean(x))


def test_a_batch_sharded_on_an_explicit_mesh_splits_without_moving_rows():
  """Without axis_name, GSPMD sharded rows are split strided, the same rows
  for every batch leaf (here one sharded, one replicated)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2), jnp.float32(x.shape[0])

  x = jax.random.normal(jax.random.key(0), (32, 3))
  y = jnp.arange(32.0)
  w = jnp.array([1.0, -1.0, 0.5])
  want = jax.grad(lambda w: loss_fn(w, x, y)[0])(w)
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    vg = optax_accum.microbatched_value_and_grad(
      loss_fn, 2, batch_argnums=(1, 2)
    )
    xs, ys = jax.device_put(x, P("data")), jax.device_put(y, P())
    _, grad, n = jax.jit(vg)(jax.device_put(w, P()), xs, ys)
  chex.assert_trees_all_close(grad, want, rtol=1e-5)
  assert float(n) == 32.0


def test_a_jax_integer_k_is_taken_and_a_float_refused():
  loss_fn = lambda p, x: (jnp.mean(x * p), jnp.float32(x.shape[0]))  # noqa: E731
  vg = optax_accum.microbatched_value_and_grad(loss_fn, jnp.int32(2))
  assert float(vg(1.0, jnp.arange(4.0))[2]) == 4.0
  with pytest.raises(ValueError) as e:
    optax_accum.microbatched_value_and_grad(loss_fn, 2.0)
  assert e.value.argument == "num_microbatches"
