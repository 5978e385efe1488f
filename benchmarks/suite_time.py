r"""Where the test suite's time goes: tracing, lowering, XLA compiling or the rest.

Reads the per-test rows that the ``tests.jax_time`` pytest plugin wrote and prints the totals,
then the slowest files and tests with their wall seconds split into JAX's tracing, lowering
and compiling in the test's own process (a persistent-cache hit counts as a compile: it is a
load) and the rest (running programs, Python, and any subprocess the test started), and the
CPU seconds of the test's process and of the subprocesses it started (the scripts a test
runs)::

  python -m pytest -p tests.jax_time --jax_time=/tmp/jax_time
  python benchmarks/suite_time.py --rows=/tmp/jax_time --top=25

Figures in BUILD_NOTES.md ("Test suite").
"""

from __future__ import annotations

import collections
import glob
import json
import os

from absl import app, flags

_ROWS = flags.DEFINE_string("rows", None, "the directory the plugin's --jax_time wrote")
_TOP = flags.DEFINE_integer("top", 25, "how many files and tests to list")

_PARTS = ("trace_s", "lower_s", "compile_s")


def read_rows(directory: str) -> list[dict]:
  """Every test row in ``directory/*.jsonl`` (one file per pytest worker)."""
  paths = sorted(glob.glob(os.path.join(directory, "*.jsonl")))
  if not paths:
    raise FileNotFoundError(f"--rows={directory}: no *.jsonl files (run pytest -p tests.jax_time)")
  rows = []
  for path in paths:
    with open(path) as f:
      for number, line in enumerate(f, 1):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{number}: not a JSON row ({e.msg})") from None
  return rows


def _sum(rows: list[dict]) -> dict:
  total = collections.Counter()
  for row in rows:
    total.update({k: v for k, v in row.items() if k != "test"})
  total["rest_s"] = total["wall_s"] - sum(total[k] for k in _PARTS)
  total["tests"] = len(rows)
  return total


_HEADER = (
  "  wall s | trace s | lower s | compile s |  rest s | compiles |  hits |  cpu s | "
  "subprocess cpu s | tests | what"
)


def _line(name: str, t: dict) -> str:
  return (
    f"{t['wall_s']:8.1f} | {t['trace_s']:7.1f} | {t['lower_s']:7.1f} | {t['compile_s']:9.1f} | "
    f"{t['rest_s']:7.1f} | {t['compiles']:8d} | {t['cache_hits']:5d} | {t['cpu_s']:6.1f} | "
    f"{t['children_cpu_s']:16.1f} | {t['tests']:5d} | {name}"
  )


def table(rows: list[dict], *, top: int) -> str:
  """The totals, then the ``top`` slowest files and tests, as text."""
  by_file = collections.defaultdict(list)
  for row in rows:
    by_file[row["test"].split("::")[0]].append(row)
  files = sorted(((_sum(r), f) for f, r in by_file.items()), key=lambda x: -x[0]["wall_s"])
  tests = sorted(((_sum([r]), r["test"]) for r in rows), key=lambda x: -x[0]["wall_s"])
  out = [_HEADER, _line("all tests", _sum(rows)), "", f"slowest {top} files:", _HEADER]
  out += [_line(f, t) for t, f in files[:top]]
  out += ["", f"slowest {top} tests (a module fixture counts in its first test):", _HEADER]
  out += [_line(name, t) for t, name in tests[:top]]
  return "\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _ROWS.value:
    raise app.UsageError("--rows is required: the directory pytest --jax_time wrote")
  try:
    rows = read_rows(_ROWS.value)
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  print(table(rows, top=_TOP.value))


if __name__ == "__main__":
  app.run(main)
