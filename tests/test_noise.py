"""gradient_noise_scale against the exact B_simple = tr(S) / |G|^2 of a
linear regression at fixed params, from its per-example gradients."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_accum

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4096, 4)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5, 3.0]) + RNG.normal(size=4096)).astype(
  np.float32
)
W = jnp.array([0.5, -1.0, 0.0, 2.0])  # fixed: sgd(0) never moves it


def _exact():
  per_example = 2 * X * (X @ np.asarray(W) - Y)[:, None]
  g = per_example.mean(0)
  return np.trace(np.cov(per_example.T, bias=True)) / (g @ g)


def _grad(idx):
  x, y = jnp.asarray(X[idx]), jnp.asarray(Y[idx])
  return jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(W)


@pytest.mark.parametrize("sizes", [(8, 8, 8, 8), (2, 0, 6, 10, 14)])
def test_the_estimate_is_within_ten_percent_of_the_exact_noise_scale(sizes):
  """Equal micro-batches, and unequal ones (weight = size) with a weight-0
  micro-batch whose gradient is NaN."""
  tx = optax_accum.accumulate(
    len(sizes), optax.sgd(0.0), track_noise_scale=True, noise_scale_decay=0.998
  )
  state = tx.init(W)
  update = jax.jit(lambda g, s, w: tx.update(g, s, W, weight=w))
  rng = np.random.default_rng(1)
  for _ in range(500):
    for n in sizes:
      g = _grad(rng.integers(0, len(Y), n)) if n else jnp.full(4, jnp.nan)
      _, state = update(g, state, jnp.float32(n))
  estimate = float(optax_accum.gradient_noise_scale(state))
  exact = _exact()
  assert 5 < exact < 200  # a regime where the estimate means something
  assert abs(estimate / exact - 1) < 0.1, (estimate, exact)
  assert int(state.noise_scale.windows) == 500


def test_windows_of_one_micro_batch_or_rejected_are_left_out():
  tx = optax_accum.accumulate(
    2,
    optax.sgd(0.0),
    should_skip_update_fn=optax.skip_not_finite,
    track_noise_scale=True,
  )
  state = tx.init(jnp.zeros(2))
  assert np.isnan(float(optax_accum.gradient_noise_scale(state)))
  _, state = tx.update(jnp.ones(2), state, flush=True)  # one micro-batch
  _, state = tx.update(jnp.ones(2), state)
  _, state = tx.update(jnp.array([jnp.inf, 0.0]), state)  # rejected
  assert int(state.noise_scale.windows) == 0
  for g in ([3.0, 1.0], [1.0, 3.0]):
    _, state = tx.update(jnp.array(g), state)
  assert int(state.noise_scale.windows) == 1
  assert float(optax_accum.gradient_noise_scale(state)) == pytest.approx(4 / 6)


@pytest.mark.parametrize(
  "make, argument",
  [
    (
      lambda: optax_accum.gradient_noise_scale(
        optax_accum.accumulate(2).init(jnp.zeros(2))
      ),
      "track_noise_scale",
    ),
    (
      lambda: optax_accum.accumulate(
        2, track_noise_scale=True, noise_scale_decay=1.0
      ),
      "noise_scale_decay",
    ),
    (
      lambda: optax_accum.accumulate(2, track_noise_scale=1),
      "track_noise_scale",
    ),
  ],
)
def test_bad_noise_scale_arguments_name_themselves(make, argument):
  with pytest.raises((ValueError, TypeError, RuntimeError)) as e:
    make()
  assert e.value.argument == argument


def test_a_tracked_state_can_be_donated_from_init():
  tx = optax_accum.accumulate(2, optax.adamw(1e-3), track_noise_scale=True)
  step = jax.jit(
    lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p),
    donate_argnums=(0, 1),
  )
  params = jnp.zeros(3)
  params, state = step(params, tx.init(params), jnp.ones(3))
  params, state = step(params, state, jnp.ones(3))
  assert int(state.noise_scale.windows) == 1


def test_a_float64_window_keeps_the_state_s_dtypes_under_x64():
  with jax.enable_x64(True):
    tx = optax_accum.accumulate(2, optax.sgd(0.0), track_noise_scale=True)
    params = jnp.zeros(3, jnp.float64)
    state = tx.init(params)
    before = jax.tree.map(lambda x: x.dtype, state)
    update = jax.jit(lambda g, s: tx.update(g, s, params))
    for g in (jnp.ones(3), jnp.arange(3.0), jnp.ones(3)):
      _, state = update(g.astype(jnp.float64), state)
    assert jax.tree.map(lambda x: x.dtype, state) == before
    assert update._cache_size() == 1


def test_the_nnx_optimizer_state_is_read_as_it_is():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = optax_accum.accumulate(2, optax.sgd(0.0), track_noise_scale=True)
  optimizer = optax_accum.flax.Optimizer(model, tx, wrt=nnx.Param)
  for x in ([1.0, 0.0], [0.0, 3.0]):
    grads = nnx.grad(lambda m, x=x: jnp.sum(m(jnp.array([x]))))(model)
    optimizer.update(model, grads)
  got = optax_accum.gradient_noise_scale(optimizer.opt_state)
  want = optax_accum.gradient_noise_scale(nnx.as_pure(optimizer.opt_state))
  assert float(got) == float(want) and not np.isnan(float(got))


def test_a_numpy_bool_turns_tracking_on():
  tx = optax_accum.accumulate(2, track_noise_scale=np.bool_(True))
  assert tx.init(jnp.zeros(2)).noise_scale is not None


def _shard_map_windows(tx, grads, weights):
  """Mini-steps in jax.shard_map over 8 devices: grads[t][d] and
  weights[t][d] are device d's micro-batch gradient and count at step t."""
  mesh = jax.make_mesh((8,), ("data",))
  with jax.set_mesh(mesh):
    state = tx.init(W)
    specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, state)

    def local(s, g, n):  # g[0]: this device's own gradient (varying)
      return tx.update(g[0], s, W, weight=n[0])[1]

    step = jax.jit(
      jax.shard_map(
        local, in_specs=(specs, P("data"), P("data")), out_specs=specs
      )
    )
    put = lambda g, n: (
      jax.device_put(jnp.stack(g), P("data")),
      jax.device_put(jnp.asarray(n, jnp.float32), P("data")),
    )
    for g, n in zip(grads, weights):
      state = step(state, *put(g, n))
    report = optax_accum.reduction_report(
      step, state, *put(grads[0], weights[0])
    )
  return state, report


@pytest.mark.skipif(
  jax.__version_info__ < (0, 10, 0), reason="axis_name needs jax>=0.10"
)
def test_per_device_micro_batches_in_shard_map_give_the_single_device_value():
  """k=2 mini-steps on 8 devices are windows of 16 micro-batches: the same
  estimate as one device adding the 16, and no reduction every call."""
  rng = np.random.default_rng(2)
  steps, k = 40, 2
  sizes = rng.integers(1, 9, size=(steps, 8))
  grads = [[_grad(rng.integers(0, len(Y), n)) for n in row] for row in sizes]
  one = optax_accum.accumulate(16, optax.sgd(0.0), track_noise_scale=True)
  state = one.init(W)
  update = jax.jit(lambda g, s, n: one.update(g, s, W, weight=n))
  for row_g, row_n in zip(grads, sizes):
    for g, n in zip(row_g, row_n):
      _, state = update(g, state, jnp.float32(n))
  tx = optax_accum.accumulate(
    k, optax.sgd(0.0), track_noise_scale=True, axis_name="data"
  )
  sharded, report = _shard_map_windows(tx, grads, sizes)
  want = float(optax_accum.gradient_noise_scale(state))
  got = float(optax_accum.gradient_noise_scale(sharded))
  assert int(sharded.noise_scale.windows) == steps // k
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert report.every_call_bytes < 1024
  assert report.emitting_bytes >= 4 * 4


@pytest.mark.skipif(
  jax.__version_info__ < (0, 10, 0), reason="axis_name needs jax>=0.10"
)
def test_under_plain_jit_on_a_mesh_tracking_is_refused_naming_it():
  tx = optax_accum.accumulate(
    2, optax.sgd(0.0), track_noise_scale=True, axis_name="data"
  )
  vg = optax_accum.microbatched_value_and_grad(
    lambda w, x: (jnp.mean((x @ w) ** 2), x.shape[0]), 1, axis_name="data"
  )
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    state = tx.init(W)
    x = jax.device_put(jnp.ones((16, 4)), P("data"))

    def step(s, x):
      _, g, n = vg(W, x)
      return tx.update(g, s, W, weight=n)

    with pytest.raises(ValueError) as e:
      jax.jit(step)(state, x)
  assert e.value.argument == "track_noise_scale"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_in_step_form_hands_its_norms_over_for_the_same_estimate(
  reduction,
):
  """microbatched_value_and_grad(..., sq_norms=True) over k micro-batches
  and accumulate(1, ..., sq_norms=...) give the cross-step estimate."""
  rng = np.random.default_rng(3)
  k, windows, rows = 4, 30, 8

  def loss_fn(w, x, y, mask):
    per = mask * (x @ w - y) ** 2
    n = jnp.sum(mask)
    total = jnp.sum(per)
    return (total / jnp.maximum(n, 1) if reduction == "mean" else total), n

  vg = optax_accum.microbatched_value_and_grad(
    loss_fn, k, batch_argnums=(1, 2, 3), reduction=reduction, sq_norms=True
  )
  inside = optax_accum.accumulate(1, optax.sgd(0.0), track_noise_scale=True)
  cross = optax_accum.accumulate(k, optax.sgd(0.0), track_noise_scale=True)
  s_in, s_cross = inside.init(W), cross.init(W)
  one = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  for _ in range(windows):
    idx = rng.integers(0, len(Y), k * rows)
    x, y = jnp.asarray(X[idx]), jnp.asarray(Y[idx])
    mask = jnp.asarray(rng.random(k * rows) < 0.7, jnp.float32)
    _, g, n, sq = jax.jit(vg)(W, x, y, mask)
    _, s_in = inside.update(g, s_in, W, weight=n, sq_norms=sq)
    for i in range(k):
      part = slice(i * rows, (i + 1) * rows)
      (_, m), gi = one(W, x[part], y[part], mask[part])
      if reduction == "sum":
        gi = gi / jnp.maximum(m, 1)
      _, s_cross = cross.update(gi, s_cross, W, weight=m)
  want = float(optax_accum.gradient_noise_scale(s_cross))
  got = float(optax_accum.gradient_noise_scale(s_in))
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.skipif(
  jax.__version_info__ < (0, 10, 0), reason="axis_name needs jax>=0.10"
)
def test_under_plain_jit_on_a_mesh_the_handed_over_norms_give_the_estimate():
  """The in-step form on a mesh (axis_name) gives the estimate that one
  device forms from the same micro-batches."""
  rng = np.random.default_rng(4)

  def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2), jnp.float32(x.shape[0])

  tx = optax_accum.accumulate(
    2, optax.sgd(0.0), track_noise_scale=True, axis_name="data"
  )
  vg = optax_accum.microbatched_value_and_grad(
    loss_fn, 2, batch_argnums=(1, 2), axis_name="data", sq_norms=True
  )
  one = optax_accum.accumulate(32, optax.sgd(0.0), track_noise_scale=True)
  s_one = one.init(W)
  grad = jax.jit(jax.grad(lambda w, x, y: loss_fn(w, x, y)[0]))
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    state = tx.init(W)

    def step(s, x, y):
      _, g, n, sq = vg(W, x, y)
      return tx.update(g, s, W, weight=n, sq_norms=sq)[1]

    step = jax.jit(step)
    for _ in range(20):
      idx = rng.integers(0, len(Y), 64)  # 8 devices x 2 micro-batches x 4
      x, y = jnp.asarray(X[idx]), jnp.asarray(Y[idx])
      for _ in range(2):  # two mini-steps of the window
        put = [jax.device_put(a, P("data")) for a in (x, y)]
        state = step(state, *put)
        # the same 16 micro-batches of 4 rows: each device splits its own
        for d in range(8):
          for i in range(2):
            rows = d * 8 + i * 4 + jnp.arange(4)
            g = grad(W, x[rows], y[rows])
            _, s_one = one.update(g, s_one, W, weight=4.0)
  want = float(optax_accum.gradient_noise_scale(s_one))
  got = float(optax_accum.gradient_noise_scale(state))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_a_count_summed_in_float32_stays_a_count():
  """n is summed as w (1 / w) in the scan: for weights such as 41 that is
  0.99999994 in float32, and two micro-batches must still count as 2."""

  def loss_fn(v, x):
    return jnp.mean((x @ v) ** 2), jnp.float32(41.0)

  vg = optax_accum.microbatched_value_and_grad(loss_fn, 2, sq_norms=True)
  x = jnp.asarray(X[:8])
  _, g, n, sq = vg(W, x)
  assert float(sq[1]) == 2.0
  tx = optax_accum.accumulate(1, optax.sgd(0.0), track_noise_scale=True)
  _, state = tx.update(g, tx.init(W), W, weight=n, sq_norms=sq)
  assert int(state.noise_scale.windows) == 1


def test_handed_over_norms_with_elements_before_the_accumulator_are_refused():
  tx = optax_accum.chain(
    optax.scale(2.0),
    optax_accum.accumulate(1, track_noise_scale=True),
    optax.sgd(0.0),
  )
  state = tx.init(W)
  with pytest.raises(ValueError) as e:
    tx.update(W, state, W, weight=4.0, sq_norms=(1.0, 2.0))
  assert e.value.argument == "sq_norms"
