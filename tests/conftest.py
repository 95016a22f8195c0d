"""Shared pytest setup: eight virtual CPU devices for the sharding tests.

Runs before any test module imports jax, because the device count is fixed
when the backend initialises.

The ``slow`` marker marks end-to-end runs (the training loop, fine-tuning
runs, the examples' and benchmarks' mains): ``make test`` runs them,
``make test-fast`` (``-m "not slow"``) leaves them out. Tests that use the
``small_run``/``small_cli`` fixtures (a run of ``apollo_lm.train``) get it
here; the others are marked where they are defined.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top

# Also covers an XLA_FLAGS inherited from the environment without the count.
jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if {"small_run", "small_cli"} & set(getattr(item, "fixturenames", ())):
      item.add_marker("slow")
