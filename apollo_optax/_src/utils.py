"""Small helpers shared by the transformations: argument checks, leaf paths."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> Optional[float]:
  """``float(value)`` when it is known now; None for tracers and schedules.

  Hyperparameters may arrive as traced arrays (``optax.inject_hyperparams``),
  which can only be checked once they are concrete.
  """
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
    return float(value)
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    if value.size == 1:
      return float(value)
  return None


def check_real(
    name: str,
    value: Any,
    predicate: Callable[[float], bool],
    allowed: str,
) -> None:
  """Raises ValueError naming ``name`` and ``allowed`` if ``value`` fails."""
  if isinstance(value, str) or value is None:
    raise TypeError(f"`{name}` must be a number ({allowed}), got {value!r}.")
  v = concrete_float(value)
  if v is not None and not predicate(v):
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


# Steps at which a learning-rate schedule is checked at construction: the
# start, and points past a typical warm-up (a warm-up from 0 to a negative
# peak is 0 at step 0).
SCHEDULE_PROBE_STEPS = (0, 1, 10, 100, 1_000, 10_000)


def check_learning_rate(name: str, value: Any) -> None:
  """Refuses a negative learning rate or a schedule that returns one.

  A float must be >= 0; a schedule is evaluated at
  :data:`SCHEDULE_PROBE_STEPS` and every value it returns there must be >= 0.
  Traced values (under ``optax.inject_hyperparams``) are not checked.

  Raises:
    ValueError: naming ``name``, the offending value and, for a schedule, the
      step.
  """
  if not callable(value):
    check_real(name, value, lambda v: v >= 0.0, ">= 0 or a schedule")
    return
  for step in SCHEDULE_PROBE_STEPS:
    v = concrete_float(value(jnp.asarray(step, jnp.int32)))
    if v is not None and not v >= 0.0:
      raise ValueError(
          f"`{name}` is a schedule whose value at step {step} is {v}; a"
          " learning rate must be >= 0 at every step (to maximise an"
          " objective, minimise its negative)."
      )


def check_static_int(name: str, value: Any, minimum: int) -> int:
  """Returns ``value`` as an int >= ``minimum`` or raises a clear error."""
  if isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"`{name}` must be a static Python int (it fixes array shapes or the"
        " refresh schedule), got an array. With optax.inject_hyperparams pass"
        " static_args=('rank', 'update_proj_gap')."
    )
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
        f"`{name}` must be an int >= {minimum}, got {value!r} of type"
        f" {type(value).__name__}."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
  return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, choices))}, got"
        f" {value!r}."
    )


def key_name(entry: Any) -> str:
  """The readable name of one entry of a pytree key path."""
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def path_str(path: tuple[Any, ...]) -> str:
  """'layers/attn/q_proj/kernel' for a pytree key path."""
  return "/".join(key_name(entry) for entry in path)


def compute_dtype(dtype: Any) -> jnp.dtype:
  """At least float32; float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def canonicalize_dtype(dtype: Any, name: str) -> Optional[jnp.dtype]:
  if dtype is None:
    return None
  try:
    result = jnp.dtype(dtype)
  except TypeError as error:
    raise TypeError(f"`{name}` must be a dtype or None, got {dtype!r}.") from error
  if not jnp.issubdtype(result, jnp.floating):
    raise ValueError(f"`{name}` must be a floating dtype, got {result}.")
  return result


def deprecated_argument(
    function: str, old: str, old_value: Any, new: str, new_value: Any
) -> Any:
  """The value of ``new``, taken from ``old`` with a DeprecationWarning.

  Returns ``new_value`` when ``old_value`` is None; raises if both are given.
  """
  if old_value is None:
    return new_value
  warnings.warn(
      f"{function}: `{old}` is deprecated, use `{new}`.",
      DeprecationWarning,
      stacklevel=3,
  )
  if new_value is not None:
    raise ValueError(
        f"{function}: pass `{new}` or the deprecated `{old}`, not both."
    )
  return old_value


def prng_key(key: Union[jax.Array, int]) -> jax.Array:
  """A typed PRNG key from a typed key, a raw ``uint32`` key or an int seed."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if (isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32
      and key.shape == (2,)):
    return jax.random.wrap_key_data(key)
  if isinstance(key, bool) or not (
      isinstance(key, numbers.Integral)
      or (isinstance(key, (jax.Array, np.ndarray, np.generic))
          and key.shape == () and jnp.issubdtype(key.dtype, jnp.integer))
  ):
    raise TypeError(
        f"`key` must be a PRNG key (jax.random.key) or an int seed, got {key!r}."
    )
  return jax.random.key(key)
