"""Smoke tests of the benchmark scripts: they run and print their tables (no timing asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_model_throughput_quick_prints_mfu_table():
  out = _run("model_throughput.py", "--quick", "--sampler_batches=1,4")
  assert "matmul ceiling" in out and "MFU" in out and "sampler tok/s" in out
  lines = out.strip().splitlines()
  assert lines[-1].split("|")[0].strip() == "tiny" and len(lines[-1].split("|")) == 3
  assert lines[-2] == "preset | batch 1 | batch 4"


def test_seed_sweep_prints_one_row_per_seed_count():
  out = _run("seed_sweep.py", "--seeds=1,2", "--steps=3", "--width=8", "--batch_size=16")
  rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
  assert [int(r.split("|")[0]) for r in rows] == [1, 2]
