"""Below a feature's floor, its entry point raises naming the version it
needs (these run in CI's floor job, on jax 0.8.0 and flax 0.12.0)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_accum

OLD_JAX = jax.__version_info__ < (0, 10, 0)


@pytest.mark.skipif(not OLD_JAX, reason="jax>=0.10 has the deferral")
@pytest.mark.parametrize(
  "make",
  [
    lambda: optax_accum.accumulate(2, optax.sgd(0.1), axis_name="data"),
    lambda: optax_accum.microbatched_value_and_grad(
      lambda p, x: (p, 1.0), 1, axis_name="data"
    ),
  ],
)
def test_the_deferred_reduction_names_the_jax_it_needs(make):
  with pytest.raises(RuntimeError) as e:
    make()
  assert e.value.argument == "axis_name"
  assert "0.10" in str(e.value)


def test_the_module_front_end_names_the_flax_it_needs():
  nnx = pytest.importorskip("flax.nnx")
  if hasattr(nnx, "as_pure"):
    pytest.skip("flax>=0.12.7 has the NNX front end")
  from optax_accum.flax import Optimizer  # pylint: disable=g-import-not-at-top

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  with pytest.raises(RuntimeError) as e:
    Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  assert e.value.argument == "model"
  assert "0.12.7" in str(e.value)


def test_the_core_runs_on_every_supported_release():
  tx = optax_accum.chain(optax_accum.accumulate(2), optax.sgd(1.0))
  params = jnp.zeros(2)
  state = tx.init(params)
  for g in (jnp.array([1.0, 3.0]), jnp.array([3.0, 1.0])):
    params, state = optax_accum.apply_gradients(tx, g, state, params)
  assert jnp.allclose(params, -2.0)
