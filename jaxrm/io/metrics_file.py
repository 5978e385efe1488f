"""``metrics.jsonl`` and its curves: read, truncate on resume, scalar rows, learning-curve PNGs.

The file of a run directory (:mod:`jaxrm.io.rundir`, which re-exports these names and holds
the writer, :class:`jaxrm.io.rundir.MetricsWriter`): one strict-JSON object per line with at
least ``step``; ``curves_<split>.png`` beside it plot its numeric columns against the step
(:func:`curve_panels`: a quantity's quantiles in one panel, the columns that never change in
a caption).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
import io
import json
import math
import os
import re
import textwrap
from typing import Any

from absl import logging
import numpy as np

from jaxrm.io.files import atomic_write

METRICS_FILE = "metrics.jsonl"
CURVES_PREFIX = "curves_"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl`` (a torn last line is ignored)."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def truncate_metrics(path: str | os.PathLike, *, max_step: int) -> int:
  """Drops the rows after ``max_step`` (and torn lines) atomically; returns how many."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = [json.dumps(r) + "\n" for r in read_metrics(path) if int(r["step"]) <= max_step]
  if len(kept) == len(lines):
    return 0
  atomic_write(path, "".join(kept))
  logging.info("Removed %d rows after step %d from %s", len(lines) - len(kept), max_step, path)
  return len(lines) - len(kept)


def scalar_row(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON row of scalar metrics: bools, ints and floats (non-finite as None)."""
  row = {"step": int(step)}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.dtype == bool:
      row[k] = bool(v)
    elif v.dtype.kind in "iu":
      row[k] = int(v)
    else:
      row[k] = float(v) if np.isfinite(v) else None
  return row


_QUANTILE = re.compile(r"(.+)_q(\d+)")  # ``margin_q10``: the 10% quantile of ``margin``


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_panels(
  rows: Sequence[Mapping[str, Any]],
) -> tuple[list[tuple[str, list[str]]], dict[str, int | float]]:
  """How :func:`plot_curves` lays out one split's rows: its panels, and the columns it states
  in a caption instead.

  Each numeric column (not ``step``, not a bool) gets a panel of its own, in the order the
  columns first appear, except that:

  - quantiles of one quantity (``<name>_q<NN>``, e.g. ``margin_q10``, ``margin_q50``,
    ``margin_q90``) share the panel ``'<name> quantiles'``;
  - a column with the same number in every one of at least two rows (a count that stayed 0,
    the pairs of each evaluation) has no panel: it is returned with its value, for the
    caption. A column missing or non-finite (``None``) in some row keeps its panel.

  Returns:
    ``(panels, constants)``: ``[(title, [column, ...]), ...]`` and ``{column: value}``.
  """
  columns = list(
    dict.fromkeys(
      k for r in rows for k, v in r.items() if k not in ("step", "split") and _is_number(v)
    )
  )
  constants = {}
  if len(rows) >= 2:
    for key in columns:
      values = {r.get(key) for r in rows}
      if len(values) == 1 and all(_is_number(r.get(key)) for r in rows):
        constants[key] = rows[0][key]
  panels: dict[str, list[str]] = {}
  for key in columns:
    if key not in constants:
      match = _QUANTILE.fullmatch(key)
      panels.setdefault(f"{match.group(1)} quantiles" if match else key, []).append(key)
  # A lone quantile (the others constant) keeps its own name.
  return [(keys[0], keys) if len(keys) == 1 else (t, keys) for t, keys in panels.items()], constants


def plot_curves(workdir: str | os.PathLike, *, max_panels: int = 16) -> list[str]:
  """Writes ``curves_<split>.png`` beside ``metrics.jsonl``: the numeric columns against the
  step, laid out by :func:`curve_panels` (the constant columns in a caption below the panels;
  panels past ``max_panels`` are left out, with a log line naming them).

  Returns:
    The written paths (none when the file has no rows).
  """
  workdir = os.fspath(workdir)
  rows = read_metrics(os.path.join(workdir, METRICS_FILE))
  splits: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    splits.setdefault(str(row.get("split", "train")), []).append(row)
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths = []
  for split, split_rows in splits.items():
    panels, constants = curve_panels(split_rows)
    if panels[max_panels:]:
      logging.info(
        "%s: curves_%s.png leaves out the panels %s (more than %d)",
        workdir,
        split,
        [title for title, _ in panels[max_panels:]],
        max_panels,
      )
    panels = panels[:max_panels]
    if not panels and not constants:
      continue
    caption = []
    if constants:
      steps = [r["step"] for r in split_rows]
      values = ", ".join(
        f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in constants.items()
      )
      caption = textwrap.wrap(
        f"The same in every row (steps {min(steps)}-{max(steps)}): {values}", width=120
      )
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols) if panels else 0
    below = 0.2 + 0.15 * len(caption) if caption else 0.0  # inches for the caption
    width, height = 3.2 * cols if panels else 9.0, 2.4 * nrows + below
    fig = plt.figure(figsize=(width, height))
    if panels:
      axes = fig.subplots(nrows, cols, squeeze=False)
      # Fixed margins (inches) for 7-point ticks and 9-point titles: matplotlib's tight_layout
      # measured every label and took half of this function's time (BUILD_NOTES, session 35).
      fig.subplots_adjust(
        left=0.6 / width,
        right=1 - 0.15 / width,
        bottom=(0.5 + below) / height,
        top=1 - 0.3 / height,
        wspace=0.4,
        hspace=0.75,
      )
      for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
          pts = [(r["step"], r[key]) for r in split_rows if _is_number(r.get(key))]
          marker = "." if len(pts) < 30 else None
          label = f"q{_QUANTILE.fullmatch(key).group(2)}" if len(keys) > 1 else None
          ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        if len(keys) > 1:
          ax.legend(fontsize=6)
        ax.set_title(title, fontsize=9, y=1.0)  # a fixed y: not placed by measuring the ticks
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
      for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if caption:
      fig.text(0.15 / width, 0.1 / height, "\n".join(caption), fontsize=7, va="bottom")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    path = os.path.join(workdir, f"{CURVES_PREFIX}{split}.png")
    atomic_write(path, buffer.getvalue())
    paths.append(path)
  return paths


def plot_overlays(
  workdir: str | os.PathLike, filename: str, panels: Mapping[str, Collection[str]]
) -> str | None:
  """Writes ``<workdir>/<filename>``: one panel per entry of ``panels`` (title -> metric
  keys), each key of each split of ``metrics.jsonl`` a line against the step (``key`` for the
  ``train`` split, ``key (split)`` for the others), so related metrics share axes (proxy and
  gold reward, KL estimators). Panels with none of their keys in the file are left out.

  Returns:
    The written path, or None when no panel has data.
  """
  workdir = os.fspath(workdir)
  rows = read_metrics(os.path.join(workdir, METRICS_FILE))
  lines: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
  for title, keys in panels.items():
    for key in keys:
      for split in dict.fromkeys(str(r.get("split", "train")) for r in rows):
        pts = [
          (r["step"], r[key])
          for r in rows
          if str(r.get("split", "train")) == split and _is_number(r.get(key))
        ]
        if pts:
          label = key if split == "train" else f"{key} ({split})"
          lines.setdefault(title, []).append((label, pts))
  if not lines:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(lines), figsize=(4.0 * len(lines), 3.0), squeeze=False)
  for ax, (title, series) in zip(axes.flat, lines.items()):
    for label, pts in series:
      marker = "." if len(pts) < 30 else None
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80)
  plt.close(fig)
  path = os.path.join(workdir, filename)
  atomic_write(path, buffer.getvalue())
  return path
