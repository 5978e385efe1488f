"""Test configuration: 8 forced host CPU devices, set before jax is imported.

Every multi-device code path (shard_map, pmap, sharded jit) is therefore exercised on any
machine, including CI's 2-core CPU.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
