"""Test configuration: 8 forced host CPU devices, a persistent compilation cache and XLA's
backend optimisations off, set before jax is imported.

Every multi-device code path (shard_map, pmap, sharded jit) is therefore exercised on any
machine, including CI's 2-core CPU. The compilation cache (``.jax_cache/`` in the repository,
or ``$JAX_COMPILATION_CACHE_DIR``) is shared by the test processes and by the scripts the tests
run in subprocesses, which inherit the environment: a program compiled once is loaded, not
compiled, by the next process that needs it (:mod:`jaxrm.io.compile_cache`).

The tests check numbers and behaviour, not speed, and most of their time is compiling, so they
compile the cheap way:

- every program, in the test processes and (through the environment) in the scripts they
  start, with JAX's ``jax_disable_most_optimizations`` (LLVM -O0, no expensive LLVM passes;
  :func:`compile_cache.optimizations_off`);
- and without XLA:CPU's MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``, the
  older loop emitters), which at -O0 own most of a compile: the over-optimisation ``--quick``
  run took 50 s instead of 113 s. Both settings yield to the environment.

The modules that check the reward model's step, model and losses against their references
(``test_rm_step``, ``test_transformer``, ``test_preference``, ``test_train_state``) use the
``xla_optimized`` fixture to compile at XLA's default optimisation level (still with the loop
emitters: ``XLA_FLAGS`` holds for the whole process).
``JAX_DISABLE_MOST_OPTIMIZATIONS=0 XLA_FLAGS=--xla_cpu_use_fusion_emitters=true python -m
pytest`` runs the whole suite with XLA's defaults (all pass there since cf27a41, last checked at
f2023ac; BUILD_NOTES.md).
"""

import os

_xla_flags = os.environ.get("XLA_FLAGS", "").split() + ["--xla_force_host_platform_device_count=8"]
if not any(f.startswith("--xla_cpu_use_fusion_emitters") for f in _xla_flags):
  _xla_flags.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(_xla_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="module")
def xla_optimized():
  """Compiles a module's programs at XLA's default optimisation level, not the suite's -O0; the
  old setting is restored after the module. Use ``pytestmark = pytest.mark.usefixtures(
  "xla_optimized")``."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
