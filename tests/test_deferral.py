"""Deferred reduction with typed (unreduced) accumulators (issue 10):
shard_map with JAX's default check_vma=True, plain jit on an Explicit mesh,
HSDP. The check_vma=False mode with stacked state is in
tests/test_distributed.py."""

import chex
from helpers import MESH_LAYOUTS
from helpers import make_problem
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_accum

K = 4
N_DEV = 8


def masked_loss(p, x, y, m):
  """A token-masked mean and its token count, the micro-batch's weight."""
  err = jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, -1)
  n = jnp.sum(m)
  return jnp.sum(err * m) / jnp.maximum(n, 1.0), n


def _masked_problem(steps=2, batch=K * 16, seed=0):
  params, xs, ys = make_problem(seed=seed, steps=steps, batch=batch, dim=8)
  rng = np.random.default_rng(seed + 1)
  ms = jnp.asarray(rng.random(xs.shape[:2]) < 0.6, jnp.float32)
  return params, xs, ys, ms


def _large_batch(opt, params, xs, ys, ms):
  state = opt.init(params)
  for x, y, m in zip(xs, ys, ms):
    g = jax.grad(masked_loss, has_aux=True)(params, x, y, m)[0]
    updates, state = opt.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _specs(tree):
  """Each leaf's PartitionSpec, read from its type (shard_map specs)."""
  return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)


def _checked_step(tx, mesh, state, fused=True):
  """A whole step in shard_map (check_vma=True), per-device weights."""

  def local(p, s, x, y, m):
    loss, n = masked_loss(p, x, y, m)
    del loss
    g = jax.grad(lambda q: masked_loss(q, x, y, m)[0])(
      lax.pcast(p, "data", to="varying")
    )
    if fused:
      return optax_accum.apply_gradients(tx, g, s, p, weight=n)
    updates, s = tx.update(g, s, p, weight=n)
    return optax.apply_updates(p, updates), s

  specs = _specs(state)
  return jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), specs, P("data"), P("data"), P("data")),
      out_specs=(P(), specs),
    ),
    donate_argnums=1,
  )


def _run(step, params, state, xs, ys, ms, k=K, spec=None):
  spec = P("data") if spec is None else spec
  p = params
  for x, y, m in zip(xs, ys, ms):
    for xm, ym, mm in zip(
      jnp.split(x, k), jnp.split(y, k), jnp.split(m, k), strict=True
    ):
      args = [jax.device_put(a, spec) for a in (xm, ym, mm)]
      p, state = step(p, state, *args)
  return p, state, args


def _report(step, *args):
  return optax_accum.reduction_report(step, *args)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
  "make_tx",
  [
    lambda: optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data"),
    lambda: optax_accum.chain(
      optax_accum.accumulate(K, axis_name="data"), optax.adamw(1e-2)
    ),
  ],
  ids=["exact", "chain"],
)
def test_checked_shard_map_is_exact_and_reduces_once_per_window(make_tx, fused):
  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = make_tx()
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    step = _checked_step(tx, mesh, state, fused)
    p, state, args = _run(step, p, state, xs, ys, ms)
    report = _report(step, p, state, *args)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
  # Every mini-step: no reduction; the window's one lives in the emitting
  # branch.
  assert report.every_call_bytes == 0
  assert report.emitting_bytes >= 4 * params["w"].size


def test_checked_shard_map_raises_for_gradients_already_reduced():
  params, xs, ys, ms = _masked_problem(steps=1)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name="data")

  def local(p, s, x, y, m):  # no pcast: shard_map sums the gradient
    g = jax.grad(lambda q: masked_loss(q, x, y, m)[0])(p)
    return tx.update(g, s, p)

  with jax.set_mesh(mesh):
    state = tx.init(params)
    specs = _specs(state)
    step = jax.shard_map(
      local,
      in_specs=(P(), specs, P("data"), P("data"), P("data")),
      out_specs=(P(), specs),
    )
    x, y, m = (jax.device_put(a[0, :16], P("data")) for a in (xs, ys, ms))
    with pytest.raises(
      ValueError,
    ):
      jax.jit(step).lower(params, state, x, y, m)


def test_checked_shard_map_raises_for_a_state_made_without_the_mesh():
  params, xs, ys, ms = _masked_problem(steps=1)
  tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name="data")
  state = tx.init(params)  # no mesh set: a plain accumulator
  mesh = jax.make_mesh((N_DEV,), ("data",))

  def local(p, s, x, y, m):
    g = jax.grad(lambda q: masked_loss(q, x, y, m)[0])(
      lax.pcast(p, "data", to="varying")
    )
    return tx.update(g, s, p)

  with jax.set_mesh(mesh):
    step = jax.shard_map(
      local,
      in_specs=(P(), P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P()),
    )
    x, y, m = (jax.device_put(a[0, :16], P("data")) for a in (xs, ys, ms))
    with pytest.raises(ValueError):
      jax.jit(step).lower(params, state, x, y, m)


def test_checked_shard_map_flush_that_varies_raises_naming_flush():
  params, xs, ys, ms = _masked_problem(steps=1)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(4, optax.sgd(0.1), axis_name="data")

  def local(p, s, x, y, m):
    g = jax.grad(lambda q: masked_loss(q, x, y, m)[0])(
      lax.pcast(p, "data", to="varying")
    )
    return tx.update(g, s, p, flush=jnp.sum(m) > 1)  # differs per device

  with jax.set_mesh(mesh):
    state = tx.init(params)
    specs = _specs(state)
    step = jax.shard_map(
      local,
      in_specs=(P(), specs, P("data"), P("data"), P("data")),
      out_specs=(P(), specs),
    )
    x, y, m = (jax.device_put(a[0, :16], P("data")) for a in (xs, ys, ms))
    with pytest.raises(ValueError):
      jax.jit(step).lower(params, state, x, y, m)


def test_checked_shard_map_flush_ends_a_partial_window_exactly():
  params, xs, ys, ms = _masked_problem(steps=1, batch=2 * 16)
  want = _large_batch(optax.sgd(0.1), params, xs, ys, ms)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(4, optax.sgd(0.1), axis_name="data")

  def local(p, s, x, y, m, flush):
    _, n = masked_loss(p, x, y, m)
    g = jax.grad(lambda q: masked_loss(q, x, y, m)[0])(
      lax.pcast(p, "data", to="varying")
    )
    return optax_accum.apply_gradients(tx, g, s, p, weight=n, flush=flush)

  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    specs = _specs(state)
    step = jax.jit(
      jax.shard_map(
        local,
        in_specs=(P(), specs, P("data"), P("data"), P("data"), P()),
        out_specs=(P(), specs),
      )
    )
    for i, (xm, ym, mm) in enumerate(
      zip(jnp.split(xs[0], 2), jnp.split(ys[0], 2), jnp.split(ms[0], 2))
    ):
      args = [jax.device_put(a, P("data")) for a in (xm, ym, mm)]
      p, state = step(p, state, *args, jnp.asarray(i == 1))
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == 1 and int(state.mini_step) == 0


def test_checked_shard_map_window_rejected_takes_no_step():
  params, xs, ys, ms = _masked_problem(steps=1, batch=2 * 16)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(
    2,
    optax.adamw(1e-2),
    axis_name="data",
    should_skip_update_fn=optax.skip_not_finite,
  )
  nan_x = xs.at[0, 5].set(jnp.nan)  # one device, one micro-batch
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    step = _checked_step(tx, mesh, state)
    p, state, _ = _run(step, p, state, nan_x, ys, ms, k=2)
  chex.assert_trees_all_equal(p, params)
  assert int(state.gradient_step) == 0 and not bool(state.has_updated)
  assert int(state.inner_opt_state[0].count) == 0  # adamw not stepped
  assert int(state.num_rejected) == 1  # the window's two micro-batches


def test_checked_shard_map_window_of_weight_zero_takes_no_step():
  params, xs, ys, ms = _masked_problem(steps=1, batch=2 * 16)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(2, optax.adamw(1e-2), axis_name="data")
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    step = _checked_step(tx, mesh, state)
    p, state, _ = _run(step, p, state, xs, ys, 0 * ms, k=2)
  chex.assert_trees_all_equal(p, params)
  assert int(state.gradient_step) == 0
  assert int(state.inner_opt_state[0].count) == 0


# Plain jit on an Explicit mesh.


def _masked_vg():
  """`masked_loss`'s gradients, unreduced over "data"."""
  return optax_accum.microbatched_value_and_grad(
    masked_loss, 1, batch_argnums=(1, 2, 3), axis_name="data"
  )


def _train_jit_on_mesh(tx, params, xs, ys, ms):
  """Trains under plain jit on an 8-device "data" mesh; returns params."""
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = jax.device_put(params, P())
    state = tx.init(p)
    p, _, _ = _run(_mesh_step(tx, _masked_vg()), p, state, xs, ys, ms)
  return p


def _mesh_step(tx, vg, fused=True):
  @jax.jit
  def step(p, s, x, y, m):
    _, g, n = vg(p, x, y, m)
    if fused:
      return optax_accum.apply_gradients(tx, g, s, p, weight=n)
    updates, s = tx.update(g, s, p, weight=n)
    return optax.apply_updates(p, updates), s

  return step


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_microbatches", [1, 2])
@pytest.mark.parametrize("layout", sorted(MESH_LAYOUTS))
def test_jit_on_a_mesh_is_exact_and_defers_the_axis_reduction(
  layout, num_microbatches, fused
):
  shape, names, axis, w_spec, batch_spec = MESH_LAYOUTS[layout]
  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name=axis)
  vg = optax_accum.microbatched_value_and_grad(
    masked_loss, num_microbatches, batch_argnums=(1, 2, 3), axis_name=axis
  )
  mesh = jax.make_mesh(shape, names)
  with jax.set_mesh(mesh):
    p = {
      "w": jax.device_put(params["w"], w_spec),
      "b": jax.device_put(params["b"], P()),
    }
    state = tx.init(p)
    step = _mesh_step(tx, vg, fused)
    p, state, args = _run(step, p, state, xs, ys, ms, spec=batch_spec)
    report = _report(step, p, state, *args)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
  assert p["w"].sharding.is_equivalent_to(NamedSharding(mesh, w_spec), 2)
  assert state.acc_grads["w"].sharding.spec.unreduced == {axis}
  # Every call: the scalar weights/losses over all devices and, on the
  # (replica, fsdp) mesh, the bias over fsdp; nothing over the replica
  # axis alone, which waits for the window's end.
  by_axis = report.by_axis()
  if len(names) > 1:  # the replica axis alone waits for the window's end
    assert by_axis.get((axis,), (0, 0))[0] == 0
  assert by_axis.get(tuple(names), (0, 0))[0] <= 16  # all devices: scalars


def test_jit_on_a_mesh_with_unequal_tokens_per_device_is_the_global_mean():
  params, xs, ys, _ = _masked_problem(steps=1)
  # Device d of micro-batch i keeps a different share of its tokens.
  rows = jnp.arange(xs.shape[1])
  ms = ((rows % 16) < (rows // 16 + 1) * 3).astype(jnp.float32)[None]
  want = _large_batch(optax.sgd(0.1), params, xs, ys, ms)
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  p = _train_jit_on_mesh(tx, params, xs, ys, ms)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_jit_on_a_mesh_raises_for_reduced_gradients():
  params, xs, ys, ms = _masked_problem(steps=1)
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = jax.device_put(params, P())
    state = tx.init(p)
    g = jax.grad(lambda q: masked_loss(q, xs[0], ys[0], ms[0])[0])(p)
    with pytest.raises(ValueError):
      jax.jit(tx.update)(g, state, p)


def test_jit_on_an_auto_mesh_raises_saying_explicit():
  params = {"w": jnp.ones(3)}
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    state = tx.init(params)
    with pytest.raises(ValueError):
      jax.jit(tx.update)(params, state, params)


def test_init_raises_for_a_param_sharded_over_the_axis():
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.ones((8, 2)), P("data"))}
    with pytest.raises(ValueError):
      tx.init(params)


def test_one_state_runs_in_checked_shard_map_and_in_jit():
  """The layout is shared: windows may alternate between the two modes."""
  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")
  vg = _masked_vg()
  mesh = jax.make_mesh((N_DEV,), ("data",))
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    checked = _checked_step(tx, mesh, state)
    jitted = _mesh_step(tx, vg)
    p, state, _ = _run(checked, p, state, xs[:1], ys[:1], ms[:1])
    p, state, _ = _run(jitted, p, state, xs[1:], ys[1:], ms[1:])
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


# Wrappers and front ends on the jit path.


def _wrapped(name):
  acc = optax_accum.accumulate
  if name == "optax.chain":  # an exact form inside optax.chain
    return optax.chain(acc(K, optax.adamw(1e-2), axis_name="data"))
  if name == "optax.partition":  # one accumulator per label
    return optax.partition(
      {
        "w": acc(K, optax.adamw(1e-2), axis_name="data"),
        "b": acc(K, optax.adamw(1e-2), axis_name="data"),
      },
      {"w": "w", "b": "b"},
    )
  if name == "inject_hyperparams":
    return optax.inject_hyperparams(acc)(
      every_k_schedule=K, inner=optax.adamw(1e-2), axis_name="data"
    )
  return optax_accum.chain(acc(K, axis_name="data"), optax.adamw(1e-2))


@pytest.mark.parametrize(
  "name",
  ["optax_accum.chain", "optax.chain", "optax.partition", "inject_hyperparams"],
)
def test_jit_on_a_mesh_through_wrappers_is_exact(name):
  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  tx = _wrapped(name)
  p = _train_jit_on_mesh(tx, params, xs, ys, ms)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_an_element_before_the_accumulator_in_optax_chain_names_tx():
  """In a chain optax_accum did not build, JAX refuses the clip on each
  device's part of the gradient; the error names the cause and the fix."""
  params, xs, ys, ms = _masked_problem(steps=1)
  acc = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")
  tx = optax.chain(optax.clip_by_global_norm(1.0), acc)
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = jax.device_put(params, P())
    state = tx.init(p)
    args = [jax.device_put(a[0, :16], P("data")) for a in (xs, ys, ms)]
    with pytest.raises(ValueError) as e:
      _mesh_step(tx, _masked_vg())(p, state, *args)
  assert e.value.argument == "tx"
  assert "optax_accum.chain(" in str(e.value)


def test_elements_before_an_accumulator_with_axis_name_raise():
  """They would see each device's part of a gradient: refused when the
  chain is built, on every parallel path."""
  with pytest.raises(ValueError) as e:
    optax_accum.chain(
      optax.clip_by_global_norm(1.0),
      optax_accum.accumulate(K, axis_name="data"),
      optax.adamw(1e-2),
    )
  assert e.value.argument == "transforms[0]"


def test_nnx_optimizer_on_a_mesh_is_exact_and_counts_gradient_steps():
  nnx = pytest.importorskip("flax.nnx")
  from optax_accum.flax import Optimizer  # pylint: disable=g-import-not-at-top

  _, xs, ys, ms = _masked_problem()

  def loss_of(model, x, y, m):
    err = jnp.sum((jnp.tanh(model(x)) - y) ** 2, -1)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)

  reference = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
  ref_opt = nnx.Optimizer(reference, optax.adamw(1e-2), wrt=nnx.Param)
  for x, y, m in zip(xs, ys, ms):
    ref_opt.update(reference, nnx.grad(loss_of)(reference, x, y, m))

  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    model = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
    tx = optax_accum.chain(
      optax_accum.accumulate(K, axis_name="data"), optax.adamw(1e-2)
    )
    opt = Optimizer(model, tx, wrt=nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, y, m):
      return loss_of(nnx.merge(graphdef, p, rest), x, y, m), jnp.sum(m)

    vg = optax_accum.microbatched_value_and_grad(
      loss, 1, batch_argnums=(1, 2, 3), axis_name="data"
    )

    @nnx.jit
    def step(model, opt, x, y, m):
      _, g, n = vg(nnx.state(model, nnx.Param), x, y, m)
      opt.update(model, g, weight=n)

    for x, y, m in zip(xs, ys, ms):
      for xm, ym, mm in zip(jnp.split(x, K), jnp.split(y, K), jnp.split(m, K)):
        step(model, opt, *[jax.device_put(a, P("data")) for a in (xm, ym, mm)])
  chex.assert_trees_all_close(
    nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param), atol=1e-6
  )
  assert int(opt.step[...]) == len(xs)


@pytest.mark.parametrize("at", [2, K])
@pytest.mark.parametrize(
  "how", ["restore_checkpoint", "CheckpointManager", "whole_train_state"]
)
def test_an_unreduced_state_saved_reduced_resumes(how, at, tmp_path):
  """At a window boundary bit for bit; mid-window the saved part-sums are
  their total, which later additions meet in another order (float32
  rounding)."""
  ocp = pytest.importorskip("orbax.checkpoint")
  params, xs, ys, ms = _masked_problem()
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")
  vg = _masked_vg()
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = jax.device_put(params, P())
    state = tx.init(p)
    step = _mesh_step(tx, vg)
    batches = [
      [jax.device_put(a, P("data")) for a in micro]
      for x, y, m in zip(xs, ys, ms)
      for micro in zip(jnp.split(x, K), jnp.split(y, K), jnp.split(m, K))
    ]
    for b in batches[:at]:
      p, state = step(p, state, *b)
    saved = optax_accum.reduced_state(state)
    assert not any(
      jax.typeof(x).sharding.spec.unreduced for x in jax.tree.leaves(saved)
    )
    target = jax.eval_shape(tx.init, params)
    if how == "restore_checkpoint":
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(tmp_path / "opt_state", saved)
      ckptr.wait_until_finished()
      restored = optax_accum.restore_checkpoint(
        tmp_path / "opt_state", tx, params, ckptr
      )
    elif how == "whole_train_state":  # one reduced_state call each way
      mgr = ocp.CheckpointManager(tmp_path / "train")
      train = optax_accum.reduced_state({"params": p, "opt_state": state})
      mgr.save(1, args=ocp.args.StandardSave(train))
      mgr.wait_until_finished()
      like = {"params": jax.eval_shape(lambda: p), "opt_state": target}
      back = mgr.restore(
        1, args=ocp.args.StandardRestore(optax_accum.reduced_state(like))
      )
      back = optax_accum.unreduced_state(back, like)
      chex.assert_trees_all_equal(back["params"], p)
      restored = back["opt_state"]
    else:
      mgr = ocp.CheckpointManager(tmp_path / "ckpt")
      mgr.save(
        1, args=ocp.args.Composite(opt_state=ocp.args.StandardSave(saved))
      )
      mgr.wait_until_finished()
      restored = mgr.restore(
        1,
        args=ocp.args.Composite(
          opt_state=ocp.args.StandardRestore(optax_accum.reduced_state(target))
        ),
      ).opt_state
      restored = optax_accum.unreduced_state(restored, target)
    assert jax.typeof(restored.acc_grads["w"]).sharding.spec.unreduced == {
      "data"
    }
    p_a, s_a, p_b, s_b = p, state, p, restored
    for b in batches[at:]:
      p_a, s_a = step(p_a, s_a, *b)
      p_b, s_b = step(p_b, s_b, *b)
  if at % K == 0:
    chex.assert_trees_all_equal(p_a, p_b)
  else:
    chex.assert_trees_all_close(p_a, p_b, rtol=1e-6, atol=1e-7)


def test_unreduced_state_raises_for_another_structure():
  with pytest.raises(ValueError):
    optax_accum.unreduced_state({"a": jnp.ones(1)}, {"b": jnp.ones(1)})


@pytest.mark.parametrize("path", ["shard_map", "jit"])
def test_an_axis_of_one_device_is_exact_on_both_paths(path):
  """Nothing to defer: the state is plain and the values reduced on arrival
  (JAX 0.10 cannot lower a pcast to unreduced over a size-1 axis)."""
  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")
  mesh = jax.make_mesh((1,), ("data",))
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    assert not jax.typeof(state.acc_grads["w"]).sharding.spec.unreduced
    if path == "shard_map":
      step = _checked_step(tx, mesh, state)
    else:
      vg = _masked_vg()
      step = _mesh_step(tx, vg)
    p, state, _ = _run(step, p, state, xs, ys, ms)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


# Slips that would give wrong numbers or another library's error.


def test_a_forgotten_axis_name_raises_on_both_paths():
  params, xs, ys, ms = _masked_problem(steps=1)
  tx = optax_accum.accumulate(K, optax.sgd(0.1))  # no axis_name
  vg = _masked_vg()
  mesh = jax.make_mesh((N_DEV,), ("data",))
  with jax.set_mesh(mesh):
    p = jax.device_put(params, P())
    state = tx.init(p)
    args = [jax.device_put(a[0, :16], P("data")) for a in (xs, ys, ms)]
    with pytest.raises(ValueError):
      _mesh_step(tx, vg)(p, state, *args)
    with pytest.raises(ValueError):
      _checked_step(tx, mesh, state)(p, state, *args)


def test_an_unreduced_weight_raises_naming_weight():
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = jax.tree.map(
      lambda a: jax.reshard(a, P(unreduced={"data"})), params
    )
    weight = jax.reshard(jnp.float32(2.0), P(unreduced={"data"}))
    with pytest.raises(ValueError):
      jax.jit(tx.update)(grads, state, params, weight=weight)


def test_restore_onto_fewer_devices_continues_the_run(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  tx = optax_accum.accumulate(K, optax.adamw(1e-2), axis_name="data")
  vg = _masked_vg()
  ckptr = ocp.StandardCheckpointer()
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = jax.device_put(params, P())
    state = tx.init(p)
    p, state, _ = _run(_mesh_step(tx, vg), p, state, xs[:1], ys[:1], ms[:1])
    ckptr.save(tmp_path / "s", optax_accum.reduced_state(state))
    ckptr.wait_until_finished()
    p = jax.device_get(p)
  mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  with jax.set_mesh(mesh4):
    state = optax_accum.restore_checkpoint(tmp_path / "s", tx, params, ckptr)
    p = jax.device_put(p, P())
    p, state, _ = _run(_mesh_step(tx, vg), p, state, xs[1:], ys[1:], ms[1:])
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_reduced_state_reads_the_sums_outside_the_mesh():
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = jax.tree.map(
      lambda a: jax.reshard(a, P(unreduced={"data"})), params
    )
    _, state = jax.jit(tx.update)(grads, state, params, weight=3.0)
  read = optax_accum.reduced_state(state)  # no mesh set here
  assert float(read.acc_weight) == 3.0
  np.testing.assert_allclose(read.acc_grads["w"], 3.0 * np.ones(3))
  with pytest.raises(ValueError):
    optax_accum.unreduced_state(read, state)


@pytest.mark.parametrize("skip", [None, optax.skip_not_finite])
def test_hsdp_in_shard_map_with_the_group_count_is_exact(skip):
  """Params sharded over fsdp, gathered in the loss (their gradients
  reduce-scattered over fsdp by autodiff); the weight behind a gradient
  reduced over fsdp is the group's count."""
  params, xs, ys, ms = _masked_problem()
  pad = lambda a: jnp.concatenate([a, 0 * a[..., :1]], -1)  # 4 outputs
  params, ys = jax.tree.map(pad, params), pad(ys)
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  mesh = jax.make_mesh((2, 4), ("replica", "fsdp"))
  tx = optax_accum.accumulate(
    K, optax.adamw(1e-2), axis_name="replica", should_skip_update_fn=skip
  )
  pspec = {"w": P(None, "fsdp"), "b": P("fsdp")}
  batch = P(("replica", "fsdp"))

  def make_step(state, group_count):
    def local(p, s, x, y, m):
      def loss(q):
        full = {
          "w": lax.all_gather(q["w"], "fsdp", axis=1, tiled=True),
          "b": lax.all_gather(q["b"], "fsdp", axis=0, tiled=True),
        }
        err = jnp.sum((jnp.tanh(x @ full["w"] + full["b"]) - y) ** 2, -1)
        n = lax.psum(jnp.sum(m), "fsdp") if group_count else jnp.sum(m)
        return jnp.sum(err * m) / jnp.maximum(n, 1.0), n

      g, n = jax.grad(loss, has_aux=True)(lax.pcast(p, "replica", to="varying"))
      return optax_accum.apply_gradients(tx, g, s, p, weight=n)

    specs = _specs(state)
    return jax.jit(
      jax.shard_map(
        local,
        in_specs=(pspec, specs, batch, batch, batch),
        out_specs=(pspec, specs),
      )
    )

  with jax.set_mesh(mesh):
    p = jax.tree.map(jax.device_put, params, pspec)
    state = tx.init(p)
    args = [jax.device_put(a[0, :16], batch) for a in (xs, ys, ms)]
    with pytest.raises(ValueError):
      make_step(state, False)(p, state, *args)
    p, state, _ = _run(make_step(state, True), p, state, xs, ys, ms, spec=batch)
  chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == len(xs)


def test_mismatched_deferred_axes_raise_naming_both():
  tx = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="replica")
  with jax.set_mesh(jax.make_mesh((2, 4), ("replica", "fsdp"))):
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    both = P(unreduced={"replica", "fsdp"})
    grads = jax.tree.map(lambda a: jax.reshard(a, both), params)
    with pytest.raises(ValueError):
      jax.jit(tx.update)(grads, state, params)
    other = optax_accum.accumulate(K, optax.sgd(0.1), axis_name="fsdp")
    with pytest.raises(ValueError):
      jax.jit(other.update)(grads, state, params)


def test_apply_gradients_without_an_accumulator_raises_for_unreduced():
  tx = optax.adamw(1e-2)
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    params = {"w": jnp.ones(3)}
    grads = jax.tree.map(
      lambda a: jax.reshard(a, P(unreduced={"data"})), params
    )
    with pytest.raises(ValueError):
      jax.jit(optax_accum.apply_gradients, static_argnums=0)(
        tx, grads, tx.init(params), params
      )


def test_linen_train_state_on_a_mesh_is_exact_and_counts_gradient_steps():
  from optax_accum.flax import TrainState  # pylint: disable=g-import-not-at-top

  params, xs, ys, ms = _masked_problem()
  want = _large_batch(optax.adamw(1e-2), params, xs, ys, ms)
  tx = optax_accum.chain(
    optax_accum.accumulate(K, axis_name="data"), optax.adamw(1e-2)
  )
  vg = _masked_vg()

  @jax.jit
  def step(state, x, y, m):
    _, g, n = vg(state.params, x, y, m)
    return state.apply_gradients(grads=g, weight=n)

  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    state = TrainState.create(
      apply_fn=None, params=jax.device_put(params, P()), tx=tx
    )
    for x, y, m in zip(xs, ys, ms):
      for micro in zip(jnp.split(x, K), jnp.split(y, K), jnp.split(m, K)):
        state = step(state, *[jax.device_put(a, P("data")) for a in micro])
  chex.assert_trees_all_close(state.params, want, rtol=1e-5, atol=1e-6)
  assert int(state.step) == len(xs)


def _value_probe():
  """An element that keeps the `value` it is passed, as its state."""
  return optax.GradientTransformationExtraArgs(
    lambda params: jnp.zeros([], jnp.float32),
    lambda u, s, p=None, value=None, **kw: (u, jnp.asarray(value, jnp.float32)),
  )


def test_the_window_mean_value_reaches_the_elements_after():
  acc = optax_accum.accumulate(2, axis_name="data")
  tx = optax_accum.chain(acc, _value_probe())
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = jax.tree.map(
      lambda a: jax.reshard(a, P(unreduced={"data"})), params
    )
    step = jax.jit(optax_accum.apply_gradients, static_argnums=0)
    for w, v in ((1.0, 2.0), (3.0, 6.0)):  # weighted mean (2 + 18) / 4
      params, state = step(tx, grads, state, params, weight=w, value=v)
  probe_state = state.inner_opt_state  # the element after, folded in
  assert float(probe_state) == 5.0


def test_eager_unreduced_gradients_name_updates_and_ask_for_jit():
  """JAX runs no eager op on unreduced arrays: a clear error, not its own."""
  params, xs, ys, ms = _masked_problem()
  tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name="data")
  with jax.set_mesh(jax.make_mesh((N_DEV,), ("data",))):
    p = jax.device_put(params, P())
    x, y, m = (jax.device_put(a[0], P("data")) for a in (xs, ys, ms))
    _, g, n = jax.jit(_masked_vg())(p, x, y, m)
    with pytest.raises(ValueError) as e:
      tx.update(g, tx.init(p), p, weight=n)
  assert e.value.argument == "updates"


def test_the_shard_map_step_traces_the_inner_as_often_as_one_device():
  """Making cond branches agree on what varies costs another trace only
  where the operands vary (a per-device state), not with axis_name."""
  traces = []

  def update(u, s, p=None):
    traces.append(1)
    return u, s

  inner = lambda: optax.GradientTransformation(  # noqa: E731
    lambda p: optax.EmptyState(), update
  )
  params, xs, ys, ms = _masked_problem()
  tx = optax_accum.accumulate(2, inner())
  one = jax.jit(lambda p, s, g: optax_accum.apply_gradients(tx, g, s, p))
  one.lower(params, tx.init(params), params)
  alone, traces[:] = len(traces), []
  mesh = jax.make_mesh((N_DEV,), ("data",))
  tx = optax_accum.accumulate(2, inner(), axis_name="data")
  with jax.set_mesh(mesh):
    state = tx.init(jax.device_put(params, P()))
    args = [jax.device_put(a[0], P("data")) for a in (xs, ys, ms)]
    p = jax.device_put(params, P())
    _checked_step(tx, mesh, state).lower(p, state, *args)
  assert alone > 0 and len(traces) == alone
