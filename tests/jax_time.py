"""A pytest plugin that records how much of each test JAX spends tracing, lowering and
compiling, to find where the suite's time goes (``benchmarks/suite_time.py`` reads it).

  python -m pytest -p tests.jax_time --jax_time=/tmp/jax_time

writes one JSON line per test to ``/tmp/jax_time/<worker>.jsonl``: the test's wall seconds
(setup, call and teardown), and of them the seconds JAX recorded in this process for tracing
jaxprs, lowering them to StableHLO and compiling them with XLA (``compile``; a persistent
compilation-cache hit is counted there too, as a load), with the number of compiles and of
cache hits. Traces of functions nested in a traced function are counted inside the outer one
as well, so ``trace`` can exceed the wall time in principle. Beside them, the CPU seconds
(user and system) of this process during the test (``cpu_s``, all its threads) and of the
subprocesses the test started and waited for (``children_cpu_s``: the scripts a test runs,
whose JAX work the events above do not see).
"""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

_DURATIONS = {
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
  "/jax/core/compile/backend_compile_duration": "compile_s",
}
_COUNTS = {
  "/jax/core/compile/backend_compile_duration": "compiles",
  "/jax/compilation_cache/cache_hits": "cache_hits",
}


class _Totals:
  """Running totals of the events above in this process (listeners may run on any thread)."""

  def __init__(self):
    self.values = dict.fromkeys([*_DURATIONS.values(), *_COUNTS.values()], 0)

  def on_duration(self, event, duration, **_):
    if event in _DURATIONS:
      self.values[_DURATIONS[event]] += duration
    if event in _COUNTS:
      self.values[_COUNTS[event]] += 1

  def on_event(self, event, **_):
    if event in _COUNTS:
      self.values[_COUNTS[event]] += 1


def pytest_addoption(parser):
  parser.addoption(
    "--jax_time",
    default=None,
    metavar="DIR",
    help="write each test's JAX trace / lower / compile seconds to DIR/<worker>.jsonl",
  )


def pytest_configure(config):
  out_dir = config.getoption("jax_time")
  if not out_dir:
    return
  from jax import monitoring  # noqa: PLC0415  (after conftest.py set up the environment)

  totals = _Totals()
  monitoring.register_event_duration_secs_listener(totals.on_duration)
  monitoring.register_event_listener(totals.on_event)
  os.makedirs(out_dir, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  config.pluginmanager.register(_Reporter(totals, os.path.join(out_dir, f"{worker}.jsonl")))


class _Reporter:
  def __init__(self, totals: _Totals, path: str):
    self.totals = totals
    self.path = path

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(self, item, nextitem):
    before = dict(self.totals.values)
    start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    yield
    row = {
      "test": item.nodeid,
      "wall_s": time.perf_counter() - start,
      "cpu_s": time.process_time() - cpu,
      "children_cpu_s": _children_cpu() - children,
    }
    row.update({k: v - before[k] for k, v in self.totals.values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def _children_cpu() -> float:
  """User and system CPU seconds of this process's finished, waited-for subprocesses."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime
