"""The environment record written beside study results."""

import json

import jax
import numpy as np

from jaxrm.io.environment import allocator, environment


def test_environment_names_versions_and_devices():
  env = environment()
  json.dumps(env)  # JSON-able
  assert env["jax"] == jax.__version__ and env["numpy"] == np.__version__
  assert env["backend"] == jax.default_backend()
  assert env["device_count"] == len(jax.devices()) == 8  # tests force 8 host devices
  assert env["cpu"] and env["cpu_count"] >= 1


def test_allocator_reports_the_preloaded_library_and_its_options(monkeypatch):
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.delenv("MALLOC_CONF", raising=False)
  assert allocator() == {"ld_preload": "", "malloc_conf": ""}  # glibc's malloc
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
  monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
  assert environment()["allocator"] == {
    "ld_preload": "/usr/lib/libjemalloc.so.2",
    "malloc_conf": "dirty_decay_ms:-1",
  }
