"""What a result was computed with: versions, devices and CPU, recorded beside the numbers.

Float-level differences between CPUs (vector instruction sets), XLA versions or reduction orders
are amplified by chaotic training runs; a result file that names its environment tells a reader
whether a mismatch with a re-run is a bug or a different machine.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import jax
import jaxlib
import numpy as np


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def allocator() -> dict[str, str]:
  """The C allocator settings in this process's environment: ``LD_PRELOAD`` (e.g. jemalloc's
  library; empty: the C library's own malloc, glibc's on Linux) and ``MALLOC_CONF``
  (jemalloc's options). On the CPU they change step times by up to a third (BUILD_NOTES.md,
  "The allocator")."""
  return {k.lower(): os.environ.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF")}


def environment() -> dict[str, Any]:
  """Versions of Python, jax, jaxlib and numpy; the backend, device kind and count; the CPU
  model and core count; the C allocator (:func:`allocator`). JSON-able."""
  devices = jax.devices()
  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "numpy": np.__version__,
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "cpu": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "allocator": allocator(),
  }
