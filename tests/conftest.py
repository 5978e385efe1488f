"""Test configuration: 8 forced host CPU devices and a persistent compilation cache, set before
jax is imported.

Every multi-device code path (shard_map, pmap, sharded jit) is therefore exercised on any
machine, including CI's 2-core CPU. The compilation cache (``.jax_cache/`` in the repository,
or ``$JAX_COMPILATION_CACHE_DIR``) is shared by the test processes and by the scripts the tests
run in subprocesses, which inherit the environment: a program compiled once is loaded, not
compiled, by the next process that needs it (:mod:`jaxrm.io.compile_cache`).
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402  (after the environment above)

from jaxrm.io import compile_cache  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
  """Compiles with XLA's backend optimisations off (:func:`compile_cache.optimizations_off`)
  for a module's tests, which check numbers, not speed, and whose time is mostly compiling; the
  old setting is restored after the module. Use ``pytestmark = pytest.mark.usefixtures(
  "fast_compiles")``."""
  with compile_cache.optimizations_off():
    yield
