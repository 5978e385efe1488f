"""The environment record written beside study results."""

import json

import jax
import numpy as np

from jaxrm.io.environment import allocator, cpu_isa, cpu_model, environment


def test_environment_names_versions_and_devices():
  env = environment()
  json.dumps(env)  # JSON-able
  assert env["jax"] == jax.__version__ and env["numpy"] == np.__version__
  assert env["backend"] == jax.default_backend()
  assert env["device_count"] == len(jax.devices()) == 8  # tests force 8 host devices
  assert env["cpu"] and env["cpu_count"] >= 1
  assert isinstance(env["cpu_isa"], list) and isinstance(env["xla_flags"], str)


# Two CPUs that both call themselves "AMD EPYC": the record must tell them apart.
_ZEN3 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni
"""
_ZEN4 = _ZEN3.replace("sha_ni", "avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni", 1)


def test_cpu_model_and_vector_extensions_come_from_the_first_cpuinfo_entry():
  assert cpu_model(_ZEN3) == cpu_model(_ZEN4) == "AMD EPYC"
  assert cpu_isa(_ZEN3) == ["sse4_2", "avx", "avx2", "fma"]
  assert cpu_isa(_ZEN4) == [
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
  ]
  assert cpu_isa("processor\t: 0\nmodel name\t: Apple M2\n") == []  # no flags line


def test_xla_flags_are_recorded(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
  assert environment()["xla_flags"] == "--xla_cpu_max_isa=AVX2"


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
