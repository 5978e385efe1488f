"""A persistent XLA compilation cache, so a second process does not compile the same step again.

JAX can store compiled executables on disk and load them in a later process whose program,
shapes, devices and flags are the same. The experiment scripts call
:func:`enable_compilation_cache` at start-up, and the test suite enables the same cache for
itself and for the scripts it runs in subprocesses (``tests/conftest.py``). Measured figures
(cold vs warm process, first-step time) are in BUILD_NOTES.md.

The cache directory is, in order: the ``cache_dir`` argument; ``$JAXRM_COMPILATION_CACHE``;
``$JAX_COMPILATION_CACHE_DIR`` (JAX's own variable); ``~/.cache/jaxrm/xla``. Setting
``JAXRM_COMPILATION_CACHE=off`` disables it. A damaged or unreadable entry only costs a
recompile: JAX logs a warning and compiles (``jax_raise_persistent_cache_errors`` is off).

Programs are stored in a subdirectory per host CPU (:func:`machine_tag`). XLA:CPU compiles for
the CPU it runs on, and JAX's cache key names only the platform (``cpu``), so a directory
shared by two machines (a network home, a cluster's nodes) would otherwise hand one machine's
programs to the other: refused and recompiled where the other CPU lacks an instruction, or run
with the first machine's roundings where it has them all, so that a run's numbers would depend
on which machine filled the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform

from absl import logging
import jax

from jaxrm.data import dataset_cache
from jaxrm.io import environment, program_cache

ENV = "JAXRM_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "jaxrm", "xla")
PROGRAMS_DIR = "programs"  # beside the machine directories: jaxrm.io.program_cache
DATASETS_DIR = "datasets"  # prepared datasets: jaxrm.data.dataset_cache


def cache_dir_from_env() -> str | None:
  """The cache directory the environment selects, or ``None`` when ``$JAXRM_COMPILATION_CACHE``
  is ``off`` (or ``0``, ``false``, ``none``)."""
  value = os.environ.get(ENV)
  if value is not None and value.strip().lower() in ("off", "0", "false", "none", ""):
    return None
  value = value or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR
  return os.path.abspath(os.path.expanduser(value))


def machine_tag(cpuinfo: str | None = None) -> str:
  """``<architecture>-<12 hex digits>``: a hash of the CPU model and of the feature flags of the
  first ``flags`` (x86) or ``Features`` (Arm) line of ``/proc/cpuinfo`` (``cpuinfo``: that text;
  default: this host's). Two hosts share a tag when XLA:CPU would compile the same for both."""
  cpuinfo = environment.read_cpuinfo() if cpuinfo is None else cpuinfo
  flags = sorted(environment.cpu_flags(cpuinfo))
  text = "\n".join([environment.cpu_model(cpuinfo), " ".join(flags)])
  return f"{platform.machine() or 'unknown'}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def enable_compilation_cache(
  cache_dir: str | None = None, *, min_compile_time_secs: float = 0.0
) -> str | None:
  """Turns on JAX's persistent compilation cache; returns the directory it stores this host's
  programs in, ``<cache_dir>/<machine_tag()>`` (``None``: disabled). Lowered programs
  (:mod:`jaxrm.io.program_cache`) are kept in ``<cache_dir>/programs``, prepared datasets
  (:mod:`jaxrm.data.dataset_cache`) in ``<cache_dir>/datasets``.

  Args:
    cache_dir: the cache's root directory (created if missing); default:
      :func:`cache_dir_from_env`.
    min_compile_time_secs: programs that compile faster than this are not stored. Default: all
      of them. JAX's default of 1 s would skip most of a small model's steps, whose compiles
      take 0.2-1 s on a CPU, and a run's small programs (evaluation summaries, the report's
      statistics) load faster than they compile: about 0.4 s of a warm HH run (BUILD_NOTES.md,
      session 37).

  Raises:
    ValueError: ``min_compile_time_secs`` is negative, or ``cache_dir`` exists and is not a
      directory.
  """
  if not min_compile_time_secs >= 0:
    raise ValueError(f"min_compile_time_secs must be >= 0, got {min_compile_time_secs}")
  path = cache_dir_from_env() if cache_dir is None else os.path.abspath(cache_dir)
  if path is None:
    return None
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"compilation cache {path!r} exists and is not a directory")
  path = os.path.join(path, machine_tag())
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # read-only home, full disk: run without the cache
    logging.warning("compilation cache disabled (%s: %s)", path, e.strerror or e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  program_cache.enable(os.path.join(os.path.dirname(path), PROGRAMS_DIR))
  dataset_cache.enable(os.path.join(os.path.dirname(path), DATASETS_DIR))
  return path


OPT_LEVELS = (-1, 0, 1, 2, 3)  # -1: XLA's default (3); 0..3: LLVM's -O0..-O3


def backend_options(opt_level: int) -> dict[str, int] | None:
  """Per-program XLA compiler options for backend (LLVM) optimisation level ``opt_level``.

  Pass the result as ``jax.jit(..., compiler_options=...)`` or ``lowered.compile(
  compiler_options=...)``. Level ``-1`` keeps XLA's default (3) and returns ``None``. On the
  CPU, lower levels compile the studies' RL chunk several times faster; level 0 also runs it
  several times slower (``benchmarks/rl_chunk_compile.py``; figures in BUILD_NOTES.md). The
  level is part of the persistent cache's key, so programs at different levels do not collide.

  Raises:
    ValueError: ``opt_level`` is not one of -1, 0, 1, 2, 3.
  """
  if opt_level not in OPT_LEVELS:
    raise ValueError(f"opt_level must be -1 (XLA's default) or 0..3, got {opt_level!r}")
  return None if opt_level == -1 else {"xla_backend_optimization_level": opt_level}


@contextlib.contextmanager
def optimizations_off(enabled: bool = True):
  """Within the block, programs compile with XLA's backend optimisations off (JAX's
  ``jax_disable_most_optimizations``: LLVM -O0, no expensive LLVM passes); the old setting is
  restored on exit. ``enabled=False`` changes nothing.

  On the CPU a cold smoke run compiles about twice as fast and its steps run slower (figures in
  BUILD_NOTES.md). The setting can change float rounding and is part of the persistent cache's
  key, but not of jit's in-memory cache: a program already compiled in this process is reused
  as it was compiled.
  """
  if not enabled:
    yield
    return
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
