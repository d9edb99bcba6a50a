"""The one helper through which every check raises (as chex routes its
assertions through one): the message names the argument, what it received
and what to write instead; the exception carries the name as ``argument``."""

from typing import NoReturn, Optional

import jax


def fail(
  exc_type: type[Exception],
  argument: str,
  message: str,
  cause: Optional[BaseException] = None,
) -> NoReturn:
  """Raises ``exc_type`` naming ``argument`` (set as ``.argument``)."""
  error = exc_type(f'`{argument}`: {message}')
  error.argument = argument  # type: ignore[attr-defined]
  raise error from cause


def leaf_name(path) -> str:
  """A leaf's path for messages; a bare array is named the root."""
  return jax.tree_util.keystr(path) or '(the root)'
