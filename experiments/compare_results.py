r"""Compares two studies' ``results.json``: does a rerun reproduce a committed run?

Walks both JSON trees together and prints the largest absolute difference over numeric leaves
(lists compared element by element; NaN equals NaN), the paths whose numbers differ by more
than ``--atol``, the non-numeric leaves that differ and the paths present in only one file.
``--ignore`` skips keys by name anywhere in the tree (by default the run's environment and
timing, which differ between any two runs). Exits 1 when anything differs beyond ``--atol``::

  python experiments/compare_results.py docs/objective_mismatch/results.json \
    runs/mismatch/results.json --atol=1e-6
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402

_ATOL = flags.DEFINE_float("atol", 0.0, "Numeric differences up to this are reported as equal.")
_IGNORE = flags.DEFINE_list(
  "ignore", ["environment", "timing_this_invocation"], "Keys skipped wherever they occur."
)


@dataclasses.dataclass
class Comparison:
  """What :func:`compare` found. ``max_abs_diff`` is over every numeric leaf pair."""

  max_abs_diff: float = 0.0
  numeric_leaves: int = 0
  numbers_differ: list[tuple[str, float]] = dataclasses.field(default_factory=list)
  values_differ: list[str] = dataclasses.field(default_factory=list)
  only_in_a: list[str] = dataclasses.field(default_factory=list)
  only_in_b: list[str] = dataclasses.field(default_factory=list)

  @property
  def same(self) -> bool:
    return not (self.numbers_differ or self.values_differ or self.only_in_a or self.only_in_b)


def _is_number(x: Any) -> bool:
  return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def compare(a: Any, b: Any, *, atol: float = 0.0, ignore: tuple[str, ...] = ()) -> Comparison:
  """Compares two JSON values (``None`` counts as NaN, as ``json`` writes NaN for the studies).

  Args:
    a, b: parsed JSON (dicts, lists, numbers, strings, booleans, None).
    atol: numeric differences ``<= atol`` are not listed in ``numbers_differ``.
    ignore: dict keys skipped at any depth.
  """
  if atol < 0:
    raise ValueError(f"atol must be >= 0, got {atol}")
  out = Comparison()

  def walk(x, y, path):
    if isinstance(x, dict) and isinstance(y, dict):
      for k in x:
        if k in ignore:
          continue
        if k in y:
          walk(x[k], y[k], f"{path}/{k}")
        else:
          out.only_in_a.append(f"{path}/{k}")
      out.only_in_b.extend(f"{path}/{k}" for k in y if k not in x and k not in ignore)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
      for i, (u, v) in enumerate(zip(x, y)):
        walk(u, v, f"{path}[{i}]")
    elif _is_number(x) and _is_number(y):
      u = math.nan if x is None else float(x)
      v = math.nan if y is None else float(y)
      out.numeric_leaves += 1
      if math.isnan(u) and math.isnan(v):
        return
      d = abs(u - v) if not (math.isnan(u) or math.isnan(v)) else math.inf
      out.max_abs_diff = max(out.max_abs_diff, d)
      if d > atol:
        out.numbers_differ.append((path, d))
    elif x != y:
      out.values_differ.append(path or "/")

  walk(a, b, "")
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    cli.die("usage: compare_results.py A.json B.json [--atol=X] [--ignore=key,...]")
  trees = []
  for path in argv[1:]:
    try:
      with open(path) as f:
        trees.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      cli.die(f"{path}: {e}")
  try:
    c = compare(*trees, atol=_ATOL.value, ignore=tuple(_IGNORE.value))
  except ValueError as e:
    cli.die(f"--atol: {e}")
  print(f"numeric leaves compared: {c.numeric_leaves}; max |a - b| = {c.max_abs_diff:.3g}")
  for title, rows in (
    (f"numbers differing by > {_ATOL.value:g}", [f"{p}: {d:.3g}" for p, d in c.numbers_differ]),
    ("other values differing", c.values_differ),
    (f"only in {argv[1]}", c.only_in_a),
    (f"only in {argv[2]}", c.only_in_b),
  ):
    if rows:
      print(f"{title} ({len(rows)}):")
      print("\n".join(f"  {r}" for r in rows[:50]) + ("\n  ..." if len(rows) > 50 else ""))
  print("SAME" if c.same else "DIFFERENT")
  sys.exit(0 if c.same else 1)


if __name__ == "__main__":
  cli.run(main)
