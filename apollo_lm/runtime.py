"""Process-level services of a run: multi-process start, signals, memory.

Nothing here knows about models or optimizers: :func:`initialize` starts
``jax.distributed`` when the run has several processes and sets the
compilation cache, :func:`stop_on_signals` turns SIGTERM/Ctrl-C into a flag
the loop checks after each step, :func:`memory_in_use` reads device memory.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax

from apollo_lm.run_config import TrainConfig


def initialize(config: TrainConfig) -> None:
  """``jax.distributed.initialize`` for multi-process runs; the XLA cache."""
  coordinator = config.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  wanted = coordinator is not None or (config.num_processes or 1) > 1
  if wanted and not jax.distributed.is_initialized():
    # Cross-process collectives of the CPU backend (a no-op elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=config.num_processes, process_id=config.process_id)
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache)


def memory_in_use() -> tuple[int, str]:
  """(bytes, what): device 0's bytes in use, else this process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_in_use" in stats:
    return int(stats["bytes_in_use"]), "device"
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, Any]]:
  """Yields a dict whose ``"signal"`` is set by SIGTERM/SIGINT meanwhile.

  Handlers can only be installed from the main thread; elsewhere (e.g. a
  training thread of a notebook) signals keep their default behaviour.
  """
  flag: dict[str, Any] = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    flag["signal"] = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
