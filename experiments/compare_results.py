r"""Compares two studies' ``results.json``: does a rerun reproduce a committed run?

Walks both JSON trees together and prints the largest absolute difference over numeric leaves
(lists compared element by element; NaN equals NaN), the paths whose numbers differ by more
than ``--atol``, the non-numeric leaves that differ and the paths present in only one file.
``--ignore`` skips keys by name anywhere in the tree (by default the run's environment and
timing, which differ between any two runs). Where both files record an ``environment``, the
fields in which the two runs' environments differ are printed as well (CPU model, vector
extensions, versions, ``XLA_FLAGS``, allocator): XLA compiles different roundings for
different CPUs, so two runs of the same commit on two machines need not agree bit for bit.
``--select`` compares one subtree of both files (keys and list indices joined by ``/``), e.g.
one world's proxies of a run restricted to that world. Exits 1 when anything differs beyond
``--atol`` (environments do not count)::

  python experiments/compare_results.py docs/objective_mismatch/results.json \
    runs/mismatch/results.json --atol=1e-6
  python experiments/compare_results.py docs/overoptimization/results.json \
    runs/world0/results.json --select=worlds/0/proxies
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

_SELECT = flags.DEFINE_string(
  "select", "", "Compare only this subtree of both files: keys and list indices joined by '/'."
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


def environment_differences(a: Any, b: Any) -> list[str]:
  """``'field: A vs B'`` for each field of two runs' top-level ``environment`` dicts that
  differs (absent fields as ``None``); ``[]`` where either run records none."""
  ea, eb = (t.get("environment") if isinstance(t, dict) else None for t in (a, b))
  if not (isinstance(ea, dict) and isinstance(eb, dict)):
    return []
  keys = list(ea) + [k for k in eb if k not in ea]
  return [f"{k}: {ea.get(k)!r} vs {eb.get(k)!r}" for k in keys if ea.get(k) != eb.get(k)]


def select(tree: Any, path: str) -> Any:
  """The subtree of ``tree`` at ``path`` (dict keys and list indices joined by ``/``; ``''``:
  the whole tree).

  Raises:
    KeyError: a step of ``path`` is not in the tree (the message names the step).
  """
  node = tree
  for i, step in enumerate(s for s in path.split("/") if s):
    where = "/".join(path.strip("/").split("/")[:i]) or "the top level"
    if isinstance(node, dict) and step in node:
      node = node[step]
    elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
      node = node[int(step)]
    else:
      raise KeyError(f"no {step!r} under {where}")
  return node


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
  subtrees = []
  for path, tree in zip(argv[1:], trees):
    try:
      subtrees.append(select(tree, _SELECT.value))
    except KeyError as e:
      cli.die(f"--select={_SELECT.value}: {path}: {e.args[0]}")
  try:
    c = compare(*subtrees, atol=_ATOL.value, ignore=tuple(_IGNORE.value))
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
  env = environment_differences(*trees)
  if env:
    print(f"the runs' environments differ in {len(env)} field(s) (roundings can differ with them):")
    print("\n".join(f"  {r}" for r in env))
  print("SAME" if c.same else "DIFFERENT")
  sys.exit(0 if c.same else 1)


if __name__ == "__main__":
  cli.run(main)
