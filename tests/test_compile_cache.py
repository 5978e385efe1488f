"""The persistent compilation cache: a second process loads what the first compiled."""

import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxrm.io import compile_cache

_PROGRAM = textwrap.dedent(
  """
  import sys
  import jax, jax.numpy as jnp
  from jaxrm.io import compile_cache
  hits = []
  jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
  path = compile_cache.enable_compilation_cache(sys.argv[1])  # stores even a tiny program
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
  f(jnp.ones((17, 5))).block_until_ready()
  print(path, len(hits))
  """
)


def _run(cache_dir):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  out = subprocess.run(
    [sys.executable, "-c", _PROGRAM, cache_dir], capture_output=True, text=True, env=env
  )
  assert out.returncode == 0, out.stderr
  path, hits = out.stdout.split()
  return path, int(hits)


def test_second_process_loads_the_compiled_program(tmp_path):
  cache = str(tmp_path / "xla")
  path, hits = _run(cache)
  assert path == os.path.join(cache, compile_cache.machine_tag()) and hits == 0
  assert os.listdir(path), "nothing was written to the cache"
  _, hits = _run(cache)
  assert hits >= 1


_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx2 avx512f\n"


def test_machine_tag_names_the_cpu_model_and_its_flags():
  tag = compile_cache.machine_tag(_CPUINFO)
  assert tag.startswith(platform.machine()) and len(tag.rsplit("-", 1)[1]) == 12
  # the flags' order does not matter; a flag, or the model, does
  assert compile_cache.machine_tag(_CPUINFO.replace("fpu sse4_2", "sse4_2 fpu")) == tag
  assert compile_cache.machine_tag(_CPUINFO.replace(" avx512f", "")) != tag
  assert compile_cache.machine_tag(_CPUINFO.replace("AMD EPYC", "Intel Xeon")) != tag
  arm = "Features\t: fp asimd sve\nCPU part\t: 0xd40\n"
  assert compile_cache.machine_tag(arm) != compile_cache.machine_tag(arm.replace(" sve", ""))


def test_cache_dir_from_env(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv(compile_cache.ENV, "off")
  assert compile_cache.cache_dir_from_env() is None
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "a"))
  assert compile_cache.cache_dir_from_env() == str(tmp_path / "a")
  monkeypatch.delenv(compile_cache.ENV)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "b"))
  assert compile_cache.cache_dir_from_env() == str(tmp_path / "b")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.cache_dir_from_env() == os.path.expanduser(compile_cache.DEFAULT_DIR)


def test_bad_arguments(tmp_path):
  a_file = tmp_path / "f"
  a_file.write_text("x")
  with pytest.raises(ValueError, match="not a directory"):
    compile_cache.enable_compilation_cache(str(a_file))
  with pytest.raises(ValueError, match="opt_level"):
    compile_cache.backend_options(7)
  assert compile_cache.backend_options(-1) is None
  assert compile_cache.backend_options(0) == {"xla_backend_optimization_level": 0}
  with pytest.raises(ValueError, match="min_compile_time_secs"):
    compile_cache.enable_compilation_cache(str(tmp_path), min_compile_time_secs=-1)


def test_optimizations_off_sets_and_restores_jax_flag():
  flag = "jax_disable_most_optimizations"
  before = jax.config.values[flag]
  with compile_cache.optimizations_off(enabled=False):
    assert jax.config.values[flag] == before
  with pytest.raises(RuntimeError, match="inside"):
    with compile_cache.optimizations_off():
      assert jax.config.values[flag] is True
      # a program compiled here runs as usual
      assert float(jax.jit(lambda x: (x * 2.0).sum())(jnp.arange(3.0))) == 6.0
      raise RuntimeError("inside")
  assert jax.config.values[flag] == before
