"""Restoring an optimizer state with accumulation from an orbax checkpoint."""

import os
from typing import Any, Optional

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from optax_accum import _call_checks
from optax_accum import _layout
from optax_accum._errors import fail


def _flat(tree, is_leaf=None) -> dict[tuple[str, ...], Any]:
  """Leaves by path of names, whatever the node types (dict or tuple)."""
  attrs = lambda e: [a for a in ("name", "key", "idx") if hasattr(e, a)]
  name = lambda e: str(getattr(e, attrs(e)[0]) if attrs(e) else e)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(name(e) for e in path): x for path, x in leaves}


def _check_against_metadata(saved_tree, abstract_state, path):
  """Raises where the checkpoint and the target disagree, leaf by leaf."""
  is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  saved, want = _flat(saved_tree, is_leaf=is_meta), _flat(abstract_state)
  missing, extra = sorted(want.keys() - saved), sorted(saved.keys() - want)
  if missing or extra:
    show = lambda keys: ", ".join("/".join(k) for k in keys[:5]) or "none"
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    items = [d for d in found if os.path.exists(f"{path}/{d}/_METADATA")]
    hint = f"; pass an item's folder, {path}/{items[0]}" if items else ""
    here = f"its state has {show(missing)} where the checkpoint at {path}"
    fail(ValueError, "tx", f"{here} has {show(extra)}{hint}")
  typed = lambda x: f"{np.dtype(x.dtype)}{list(x.shape)}"
  for key, target in want.items():
    got, here = typed(saved[key]), typed(target)
    if got != here:
      fail(ValueError, "params", f"{'/'.join(key)}: {got} saved, {here} here")


def restore_checkpoint(
  path: str,
  tx: optax.GradientTransformation,
  params: optax.Params,
  checkpointer: Optional[Any] = None,
) -> Any:
  """Restores an optimizer state saved with orbax, checked against ``tx``.

  Compares the metadata leaf by leaf (path, shape, dtype) with
  ``jax.eval_shape(tx.init, params)``, restores into it (a window in
  flight keeps its k), reshards a :func:`reduced_state` back.

  Args:
    path: the checkpoint directory (a str or ``pathlib.Path``).
    tx: the optimizer to continue with.
    params: the params (arrays or ``jax.ShapeDtypeStruct``) ``tx`` trains;
      only their structure, shapes, dtypes and shardings are used.
    checkpointer: an ``orbax.checkpoint.StandardCheckpointer`` (or one with
      the same ``metadata``/``restore`` methods); a new one by default.

  Returns:
    The restored optimizer state, structured as ``tx.init(params)``.

  Raises:
    ValueError: the checkpoint's structure, a shape or dtype differs from
      ``tx.init(params)``'s. FileNotFoundError: nothing at ``path``.
    TypeError: ``checkpointer`` is a ``CheckpointManager`` (restore into
      :func:`reduced_state` of the target, then :func:`unreduced_state`).
    ImportError: no orbax-checkpoint (``optax_accum[checkpoint]``).

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, optax_accum
    >>> import orbax.checkpoint as ocp
    >>> params = {'w': jnp.zeros(3)}
    >>> tx = optax_accum.accumulate(5, optax.adamw(1e-3))
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.ones(3)}, state, params)
    >>> path = tempfile.mkdtemp() + '/opt_state'
    >>> ckptr = ocp.StandardCheckpointer()
    >>> ckptr.save(path, state); ckptr.wait_until_finished()
    >>> restored = optax_accum.restore_checkpoint(path, tx, params, ckptr)
    >>> int(restored.mini_step)
    1

  References:
    Orbax, https://orbax.readthedocs.io/en/latest/.
  """
  if checkpointer is None:
    try:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      fail(ImportError, "checkpointer", "None; pip install orbax-checkpoint", e)
    checkpointer = ocp.StandardCheckpointer()
  if hasattr(checkpointer, "latest_step"):  # a CheckpointManager
    fail(TypeError, "checkpointer", "a CheckpointManager; see reduced_state")
  # A fresh function, so no trace cache stands between `params` and `init`.
  abstract_state = jax.eval_shape(lambda p: tx.init(p), params)  # noqa: PLW0108
  if not os.path.exists(path):
    fail(FileNotFoundError, "path", f"{path}, where nothing exists")
  metadata = checkpointer.metadata(path)
  item = getattr(metadata, "item_metadata", metadata)
  saved_tree = getattr(item, "tree", metadata)
  # A state with unreduced leaves is saved reduced (orbax cannot write
  # unreduced arrays): restored so, then resharded to its unreduced types.
  saved_state = reduced_state(abstract_state)
  _check_against_metadata(saved_tree, saved_state, path)
  restored = checkpointer.restore(path, saved_state)
  return unreduced_state(restored, abstract_state)


def _unreduced(x) -> bool:
  if isinstance(x, jax.ShapeDtypeStruct):
    spec = getattr(x.sharding, "spec", None)
    return bool(getattr(spec, "unreduced", None))
  return bool(_call_checks.unreduced_axes(x))


def _reduced_leaf(x):
  if not isinstance(x, jax.ShapeDtypeStruct):
    return _layout.reduced(x)
  # jax.eval_shape records the abstract mesh, or no sharding for a counter:
  # orbax places arrays on the concrete mesh that is set (jax >= 0.10).
  sharding, spec = x.sharding, P()
  mesh = getattr(jax.sharding, 'get_mesh', lambda: None)()
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = sharding.spec.update(unreduced=frozenset())
    real = not isinstance(sharding.mesh, jax.sharding.AbstractMesh)
    mesh = sharding.mesh if real and mesh is not None else mesh
  elif sharding is not None:
    return x
  if mesh is None or mesh.empty:
    return x
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def reduced_state(opt_state: Any) -> Any:
  """The optimizer state with every leaf typed unreduced reduced.

  With ``axis_name`` the sums are typed unreduced, which orbax, numpy and
  ``jax.device_put`` cannot take: this gives them reduced (one all-reduce
  each) in any pytree; on ``jax.ShapeDtypeStruct`` leaves, a restore
  target on the mesh that is set. :func:`unreduced_state` is its inverse.

  Args:
    opt_state: a pytree of arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    The pytree, with no unreduced leaf.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name='data')
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> with jax.set_mesh(mesh):
    ...   state = tx.init({'w': jnp.zeros(3)})
    ...   saved = optax_accum.reduced_state(state)  # what orbax saves
    ...   restored = optax_accum.unreduced_state(saved, state)
    >>> jax.typeof(restored.acc_grads['w']) == jax.typeof(state.acc_grads['w'])
    True

  References:
    JAX's ``unreduced`` sharding type and ``jax.reshard``.
  """
  leaves, treedef = jax.tree.flatten(opt_state)
  abstract = [isinstance(x, jax.ShapeDtypeStruct) for x in leaves]
  todo = [i for i, x in enumerate(leaves) if not abstract[i] and _unreduced(x)]
  if todo:  # on the arrays' own mesh, whatever mesh is set
    with jax.set_mesh(leaves[todo[0]].sharding.mesh):
      reduce = jax.jit(lambda xs: [_reduced_leaf(x) for x in xs])
      for i, x in zip(todo, reduce([leaves[i] for i in todo])):
        leaves[i] = x
  leaves = [_reduced_leaf(x) if a else x for x, a in zip(leaves, abstract)]
  return treedef.unflatten(leaves)


def unreduced_state(opt_state: Any, like: Any) -> Any:
  """The inverse of :func:`reduced_state`: unreduced where ``like`` is.

  Args:
    opt_state: a state from :func:`reduced_state` (a restored checkpoint).
    like: the state, or ``jax.eval_shape(tx.init, params)`` under the same
      ``jax.set_mesh``, whose leaves give the types.

  Returns:
    ``opt_state`` resharded to ``like``'s unreduced types (no communication).

  Raises:
    ValueError: structures differ, or no mesh is set.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_accum
    >>> tx = optax_accum.accumulate(2, optax.sgd(0.1), axis_name='data')
    >>> params = {'w': jnp.zeros(3)}
    >>> with jax.set_mesh(jax.make_mesh((jax.device_count(),), ('data',))):
    ...   target = jax.eval_shape(tx.init, params)
    ...   restored = optax_accum.reduced_state(tx.init(params))  # as loaded
    ...   state = optax_accum.unreduced_state(restored, target)
    >>> got, want = state.acc_grads['w'], target.acc_grads['w']
    >>> jax.typeof(got).sharding.spec.unreduced == want.sharding.spec.unreduced
    True
  """
  if jax.tree.structure(opt_state) != jax.tree.structure(like):
    fail(ValueError, 'opt_state', 'structured unlike `like`')
  leaves, treedef = jax.tree.flatten(opt_state)
  todo = [i for i, t in enumerate(jax.tree.leaves(like)) if _unreduced(t)]
  if not todo:
    return opt_state
  if jax.sharding.get_abstract_mesh().empty:
    fail(ValueError, 'like', 'unreduced leaves but no jax.set_mesh(...)')
  specs = [_call_checks.spec_of(jax.tree.leaves(like)[i]) for i in todo]
  reshard = lambda xs: [jax.reshard(x, s) for x, s in zip(xs, specs)]
  for i, x in zip(todo, jax.jit(reshard)([leaves[i] for i in todo])):
    leaves[i] = x  # only the unreduced leaves: the rest stay where they are
  return treedef.unflatten(leaves)
