"""Property-based tests over random pytrees, k and micro-batch orders."""

import chex
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_accum

SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)

# A leaf is an array shape, None, or optax.MaskedNode(); containers are
# dicts and tuples, possibly empty.
LEAVES = st.one_of(SHAPES, SHAPES, st.none(), st.just(optax.MaskedNode()))
TREES = st.recursive(
  LEAVES,
  lambda children: st.one_of(
    st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
    st.lists(children, max_size=3).map(tuple),
  ),
  max_leaves=6,
)


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _fill_tree(spec, rng):
  if _is_shape(spec):
    return jnp.asarray(rng.normal(size=spec), jnp.float32)
  if spec is None or isinstance(spec, optax.MaskedNode):
    return spec
  if isinstance(spec, dict):
    return {k: _fill_tree(v, rng) for k, v in spec.items()}
  return tuple(_fill_tree(v, rng) for v in spec)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
  spec=TREES,
  k=st.integers(1, 5),
  seed=st.integers(0, 2**16),
  steps=st.integers(1, 3),
)
def test_exact_form_equals_large_batch_and_mid_steps_are_zero(
  spec, k, seed, steps
):
  rng = np.random.default_rng(seed)
  params = _fill_tree(spec, rng)
  opt = lambda: optax.adam(1e-2)
  tx = optax_accum.accumulate(k, opt())
  state, ref_opt = tx.init(params), opt()
  ref_state = ref_opt.init(params)
  p_acc = p_ref = params
  for _ in range(steps):
    grads = [_fill_tree(spec, rng) for _ in range(k)]
    order = rng.permutation(k)  # any order of the window's micro-batches
    for j, i in enumerate(order):
      updates, state = tx.update(grads[i], state, p_acc)
      if j < k - 1:
        chex.assert_trees_all_equal(
          updates, jax.tree.map(jnp.zeros_like, grads[i])
        )
        chex.assert_trees_all_equal_dtypes(updates, grads[i])
      p_acc = optax.apply_updates(p_acc, updates)
    mean = jax.tree.map(
      lambda *g: jnp.asarray(np.mean(np.stack(g), 0), jnp.float32), *grads
    )
    ref_updates, ref_state = ref_opt.update(mean, ref_state, p_ref)
    p_ref = optax.apply_updates(p_ref, ref_updates)
  chex.assert_trees_all_close(p_acc, p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    state.inner_opt_state, ref_state, rtol=1e-5, atol=1e-6
  )
  assert int(state.gradient_step) == steps
