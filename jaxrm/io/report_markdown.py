"""Markdown of a reward-model report (:func:`jaxrm.io.report.build_report`).

:func:`render_markdown` formats the report's sections as tables; the figures that
:func:`jaxrm.io.report.write_report` writes beside it are linked by file name
(:data:`RELIABILITY_PNG`, :data:`HISTOGRAM_PNG`). :mod:`jaxrm.io.report` re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

RELIABILITY_PNG = "reliability.png"
HISTOGRAM_PNG = "reward_histogram.png"


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if value == 0 or not math.isfinite(value):
      return str(value) if value else "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
      return f"{value:.{digits}g}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")
  if isinstance(value, (list, tuple)):
    return ", ".join(_fmt(v, digits) for v in value)
  if isinstance(value, Mapping):
    return ", ".join(f"{k}={_fmt(v, digits)}" for k, v in value.items())
  return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  return lines + [""]


def _key_values(section: Mapping[str, Any], skip: Sequence[str] = ()) -> list[str]:
  rows = [(k, v) for k, v in section.items() if k not in skip and not isinstance(v, Mapping)]
  return _table(("field", "value"), rows) if rows else []


def render_markdown(report: Mapping[str, Any]) -> str:
  """Formats a report from :func:`build_report` as Markdown (figures linked by file name)."""
  out = ["# Reward-model report", ""]
  run = report.get("run") or {}
  if run:
    best = run.get("best_checkpoint_step")
    out += [
      f"Run `{run.get('workdir', '?')}`, checkpoint step {_fmt(run.get('step'))}"
      + (
        f" (best saved checkpoint by held-out accuracy: step {_fmt(best)})"
        if best is not None
        else ""
      )
      + ".",
      "",
    ]
    if run.get("evaluated_on"):
      out += [f"Evaluated on the **{run['evaluated_on']}** split.", ""]
    for warning in run.get("warnings") or ():
      out += [f"**Warning:** {warning}.", ""]
  model = report.get("model")
  if model:
    out += ["## Model", ""] + _key_values(model)
    if isinstance(model.get("config"), Mapping):
      out += _key_values(model["config"])
  data = report.get("data")
  if data:
    out += ["## Data", ""] + _key_values(data, skip=("splits", "synthetic"))
    splits = data.get("splits") or {}
    if splits:
      out += _table(
        (
          "split",
          "pairs",
          "seq len mean",
          "median",
          "p95",
          "max",
          "prompt mean",
          "response mean",
          "truncated pairs",
          "skipped lines",
        ),
        [
          (
            name,
            s.get("pairs"),
            s.get("sequence_length", {}).get("mean"),
            s.get("sequence_length", {}).get("median"),
            s.get("sequence_length", {}).get("p95"),
            s.get("sequence_length", {}).get("max"),
            s.get("prompt_length", {}).get("mean"),
            s.get("response_length", {}).get("mean"),
            s.get("truncated_pairs"),
            s.get("skipped"),
          )
          for name, s in splits.items()
        ],
      )
      reasons = {
        name: s.get("skipped_reasons") for name, s in splits.items() if s.get("skipped_reasons")
      }
      for name, r in reasons.items():
        out += [f"Skipped in {name}: {_fmt(r)}.", ""]
    if isinstance(data.get("synthetic"), Mapping):
      out += ["Synthetic world:", ""] + _key_values(data["synthetic"])
  training = report.get("training")
  if training:
    out += ["## Loss and training", ""] + _key_values(training)
  h = report["heldout"]
  out += ["## Held-out preference accuracy", ""]
  out += _table(
    ("pairs", "accuracy", "± s.e.", "log-loss", "Brier", "ECE"),
    [(h["num_pairs"], h["accuracy"], h["accuracy_stderr"], h["log_loss"], h["brier"], h["ece"])],
  )
  cal = report["calibration"]
  out += [
    "## Calibration",
    "",
    f"ECE {_fmt(cal['ece'])} ({cal['num_bins']} bins, {cal['method']}), Brier "
    f"{_fmt(cal['brier'])}.",
    "",
    f"![reliability diagram]({RELIABILITY_PNG})",
    "",
  ]
  out += _table(
    ("bin", "pairs", "mean confidence", "observed frequency"),
    [
      (f"[{b['low']:.1f}, {b['high']:.1f})", b["count"], b["confidence"], b["accuracy"])
      for b in cal["bins"]
    ],
  )
  r = report["rewards"]
  out += ["## Reward distribution", ""]
  out += _table(
    ("", "mean", "std", *r["quantiles"].keys()),
    [
      ("reward (all responses)", r["mean"], r["std"], *r["quantiles"].values()),
      ("margin r_c - r_r", r["margin_mean"], r["margin_std"], *r["margin_quantiles"].values()),
    ],
  )
  out += [
    f"Mean reward: chosen {_fmt(r['chosen_mean'])}, rejected {_fmt(r['rejected_mean'])}.",
    "",
    f"![reward histogram]({HISTOGRAM_PNG})",
    "",
  ]
  length = report.get("length")
  if length is not None:
    out += ["## Reward and response length", ""]
    if length["constant_length"]:
      out += ["Every response has the same length: no length correlation to measure.", ""]
    out += _table(
      (
        "Pearson(reward, length)",
        "Spearman",
        "pairs with different lengths",
        "data prefers longer",
        "model prefers longer",
        "accuracy of 'shorter wins'",
      ),
      [
        (
          length["pearson"],
          length["spearman"],
          length["pairs_with_length_difference"],
          length["chosen_longer"],
          length["model_prefers_longer"],
          length["shorter_wins_accuracy"],
        )
      ],
    )
  if report.get("subsets"):
    out += ["## Accuracy per subset", ""]
    out += _table(
      ("subset", "pairs", "accuracy", "± s.e."),
      [(s["name"], s["num_pairs"], s["accuracy"], s["accuracy_stderr"]) for s in report["subsets"]],
    )
  gold = report.get("gold")
  if gold is not None:
    out += ["## Agreement with the gold reward", ""]
    out += _table(
      ("pairwise accuracy vs gold", "Spearman", "Kendall tau", "labels agree with gold"),
      [
        (
          gold["pairwise_accuracy"],
          gold["spearman"],
          gold["kendall_tau"],
          gold["labels_agree_with_gold"],
        )
      ],
    )
  return "\n".join(out).rstrip() + "\n"
