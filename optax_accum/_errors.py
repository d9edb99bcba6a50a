"""The one helper through which every check of optax_accum raises.

Messages read alike: the argument, what it received, what it must be, and
what to write instead. The exception carries the argument's name as
``argument``, so tests and callers can tell errors apart without reading
their prose (as chex routes every assertion through one helper).
"""

from typing import NoReturn

import jax


def fail(
  exc_type: type[Exception], argument: str, received: str, instead: str
) -> NoReturn:
  """Raises ``exc_type`` naming ``argument``.

  Args:
    exc_type: ``ValueError``, ``TypeError`` or ``NameError``.
    argument: the argument, as the caller wrote it (``weight``, ``inner``).
    received: what was received, and why it cannot be used.
    instead: what to write instead.

  Raises:
    exc_type: always, with ``.argument`` set.
  """
  error = exc_type(f'`{argument}`: {received}. {instead}')
  error.argument = argument  # type: ignore[attr-defined]
  raise error


def leaf_name(path) -> str:
  """A leaf's path for messages; a bare array is named the root."""
  return jax.tree_util.keystr(path) or '(the root)'
