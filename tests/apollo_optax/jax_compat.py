"""JAX APIs the tests use that moved between the supported JAX versions."""

import jax


def enable_x64(enabled: bool = True):
  """``jax.enable_x64`` (a context manager in newer JAX), or its older home.

  JAX 0.7 has it only as ``jax.experimental.enable_x64``; ``make test-floor``
  runs the tests there.
  """
  try:
    return jax.enable_x64(enabled)
  except AttributeError:
    from jax.experimental import enable_x64 as experimental_enable_x64  # pylint: disable=g-import-not-at-top
    return experimental_enable_x64(enabled)
