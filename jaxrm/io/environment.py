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

# The x86 vector extensions XLA's CPU compiler can target. Two CPUs with the same model name
# ("AMD EPYC") may differ here, and code compiled for wider vectors sums floats in another order.
VECTOR_ISA = (
  "sse4_2",
  "avx",
  "avx2",
  "fma",
  "avx512f",
  "avx512bw",
  "avx512vl",
  "avx512_vnni",
  "avx512_bf16",
  "amx_bf16",
)


def read_cpuinfo() -> str:
  """The text of ``/proc/cpuinfo`` (``''`` where there is none: not Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return ""


def cpu_model(cpuinfo: str) -> str:
  """The first ``model name`` of a ``/proc/cpuinfo`` text; else the platform's processor name."""
  for line in cpuinfo.splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str) -> list[str]:
  """The feature flags of the first ``flags`` (x86) or ``Features`` (Arm) line of a
  ``/proc/cpuinfo`` text (``[]`` where there is none: not Linux)."""
  for line in cpuinfo.splitlines():
    if line.split(":", 1)[0].strip() in ("flags", "Features"):
      return line.split(":", 1)[1].split()
  return []


def cpu_isa(cpuinfo: str) -> list[str]:
  """The :data:`VECTOR_ISA` extensions among :func:`cpu_flags`, in that order (``[]`` where
  there is none: not Linux, or not x86)."""
  flags = set(cpu_flags(cpuinfo))
  return [isa for isa in VECTOR_ISA if isa in flags]


def allocator() -> dict[str, str]:
  """The C allocator settings in this process's environment: ``LD_PRELOAD`` (e.g. jemalloc's
  library; empty: the C library's own malloc, glibc's on Linux) and ``MALLOC_CONF``
  (jemalloc's options). On the CPU they change step times by up to a third (BUILD_NOTES.md,
  "The allocator")."""
  return {k.lower(): os.environ.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF")}


def environment() -> dict[str, Any]:
  """Versions of Python, jax, jaxlib and numpy; the backend, device kind and count; the CPU
  model, vector extensions (:func:`cpu_isa`) and core count; ``$XLA_FLAGS`` (e.g.
  ``--xla_cpu_max_isa=AVX2`` pins the instructions XLA emits); the C allocator
  (:func:`allocator`). JSON-able."""
  devices = jax.devices()
  cpuinfo = read_cpuinfo()
  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "numpy": np.__version__,
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "cpu": cpu_model(cpuinfo),
    "cpu_isa": cpu_isa(cpuinfo),
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "allocator": allocator(),
  }
