"""Shared pytest setup: eight virtual CPU devices for the sharding tests.

Runs before any test module imports jax, because the device count is fixed
when the backend initialises.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top

# Also covers an XLA_FLAGS inherited from the environment without the count.
jax.config.update("jax_num_cpu_devices", 8)
