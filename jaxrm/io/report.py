"""Reward-model report: held-out metrics, calibration, reward statistics, JSON + Markdown + plots.

:func:`build_report` turns the rewards a model gives to a set of preference pairs (plus,
optionally, response lengths, subsets and gold scores) and free-form descriptive sections
(model, data, training) into a JSON-serialisable dict; :func:`render_markdown` formats it and
:func:`write_report` writes ``rm_report.json``, ``rm_report.md``, the reliability diagram
``reliability.png`` and the reward histogram ``reward_histogram.png`` (matplotlib, Agg
backend: no display needed). The numbers come from :mod:`jaxrm.math.metrics`.

Calibration. The reward model is read as the Bradley–Terry classifier
``q = sigmoid(r_a - r_b)`` of the event "a is preferred". Presented only as
``(chosen, rejected)``, every label is 1 and a reliability diagram could only show how close
``q`` is to 1 (the ECE would be ``mean(1 - q)``, which a perfectly calibrated model does not
make 0). :func:`pairwise_calibration` therefore counts every pair in both orders,
``(chosen, rejected)`` with label ``p`` and ``(rejected, chosen)`` with label ``1 - p`` (``p``
= 1 unless soft labels are given): the bins are symmetric around 1/2 and the diagram shows
over- and under-confidence. Accuracy, log-loss and Brier score are the same in both orders.

Example::

  report = build_report(rewards_chosen, rewards_rejected,
                        response_lengths=(len_chosen, len_rejected),
                        sections={"model": {...}, "data": {...}, "training": {...}})
  paths = write_report(report, workdir, rewards_chosen=rewards_chosen,
                       rewards_rejected=rewards_rejected)

References:
  Guo et al. 2017, "On calibration of modern neural networks" (ECE, reliability diagrams).
  Singhal et al. 2023, "A long way to go: investigating length correlations in RLHF".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
import os
from typing import Any

import numpy as np

from jaxrm.io import rundir
from jaxrm.io.report_markdown import HISTOGRAM_PNG, RELIABILITY_PNG, render_markdown
from jaxrm.io.rundir import to_json
from jaxrm.math import metrics

REPORT_JSON = "rm_report.json"
REPORT_MARKDOWN = "rm_report.md"
REWARD_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _vector(name: str, x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or x.shape[0] == 0:
    raise ValueError(f"{name} must have shape [num_pairs] with num_pairs > 0, got {x.shape}")
  return x


def _pair(rewards_chosen: Any, rewards_rejected: Any) -> tuple[np.ndarray, np.ndarray]:
  rc = _vector("rewards_chosen", rewards_chosen)
  rr = _vector("rewards_rejected", rewards_rejected)
  if rr.shape != rc.shape:
    raise ValueError(
      f"rewards_rejected must have the shape of rewards_chosen {rc.shape}, got {rr.shape}"
    )
  if not (np.all(np.isfinite(rc)) and np.all(np.isfinite(rr))):
    raise ValueError("rewards_chosen and rewards_rejected must be finite")
  return rc, rr


def _same_shape(name: str, x: Any, n: int, dtype=np.float64) -> np.ndarray:
  x = np.asarray(x, dtype)
  if x.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},) like the rewards, got {x.shape}")
  return x


def _finite_or_none(x: float) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------ sections


def pairwise_calibration(
  rewards_chosen: Any, rewards_rejected: Any, *, labels: Any = None, num_bins: int = 10
) -> metrics.Calibration:
  """Reliability diagram and ECE of ``sigmoid(r_c - r_r)``, every pair counted in both orders.

  Args:
    rewards_chosen: ``[num_pairs]``.
    rewards_rejected: ``[num_pairs]``.
    labels: ``P(chosen preferred)`` ``[num_pairs]``; default all ones.
    num_bins: equal-width bins on ``[0, 1]``.

  Returns:
    A :class:`jaxrm.math.metrics.Calibration` over ``2 * num_pairs`` predictions: the pairs as
    ``(chosen, rejected)`` with label ``p`` and as ``(rejected, chosen)`` with ``1 - p``.
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  p = np.ones_like(rc) if labels is None else _same_shape("labels", labels, rc.shape[0])
  return metrics.expected_calibration_error(
    np.concatenate([rc, rr]).astype(np.float32),
    np.concatenate([rr, rc]).astype(np.float32),
    labels=np.concatenate([p, 1.0 - p]).astype(np.float32),
    num_bins=num_bins,
  )


def heldout_metrics(
  rewards_chosen: Any, rewards_rejected: Any, *, labels: Any = None, num_bins: int = 10
) -> dict[str, float]:
  """Accuracy, log-loss, Brier, symmetrised ECE and margin statistics of a set of pairs.

  Returns:
    :func:`jaxrm.math.metrics.summarize_preferences` (``accuracy``, ``log_loss``, ``brier``,
    ``reward_mean``, ``margin_mean``, ...) with ``ece`` replaced by the ECE of
    :func:`pairwise_calibration`, plus ``num_pairs`` and ``accuracy_stderr`` (the binomial
    standard error ``sqrt(a (1 - a) / n)``), as Python floats.
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  out = metrics.summarize_preferences(
    rc.astype(np.float32), rr.astype(np.float32), labels=labels, num_bins=num_bins
  )
  out["ece"] = float(pairwise_calibration(rc, rr, labels=labels, num_bins=num_bins).ece)
  n = rc.shape[0]
  out["num_pairs"] = n
  acc = out["accuracy"]
  out["accuracy_stderr"] = math.sqrt(max(acc * (1.0 - acc), 0.0) / n)
  return out


def reward_statistics(
  rewards_chosen: Any, rewards_rejected: Any, *, quantiles: Sequence[float] = REWARD_QUANTILES
) -> dict[str, Any]:
  """Distribution of the rewards (chosen and rejected together) and of the margins.

  Returns:
    ``mean``, ``std`` (population), ``min``, ``max``, ``quantiles`` ``{'q05': ...}`` of all
    ``2 * num_pairs`` rewards; ``chosen_mean``, ``rejected_mean``; ``margin_mean``,
    ``margin_std`` and ``margin_quantiles`` of ``r_c - r_r``.
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  everything = np.concatenate([rc, rr])
  margin = rc - rr
  name = lambda q: f"q{int(round(100 * q)):02d}"
  return {
    "mean": float(everything.mean()),
    "std": float(everything.std()),
    "min": float(everything.min()),
    "max": float(everything.max()),
    "quantiles": {name(q): float(v) for q, v in zip(quantiles, np.quantile(everything, quantiles))},
    "chosen_mean": float(rc.mean()),
    "rejected_mean": float(rr.mean()),
    "margin_mean": float(margin.mean()),
    "margin_std": float(margin.std()),
    "margin_quantiles": {
      name(q): float(v) for q, v in zip(quantiles, np.quantile(margin, quantiles))
    },
  }


def length_bias(
  rewards_chosen: Any, rewards_rejected: Any, lengths_chosen: Any, lengths_rejected: Any
) -> dict[str, Any]:
  """How the rewards relate to response length (a length-biased RM prefers longer answers).

  Args:
    rewards_chosen, rewards_rejected: ``[num_pairs]``.
    lengths_chosen, lengths_rejected: response lengths ``[num_pairs]`` (tokens after the
      prompt).

  Returns:
    ``pearson`` (:func:`jaxrm.math.metrics.length_correlation`) and ``spearman`` between reward
    and length over all responses (None if the lengths are constant); over the pairs whose
    responses differ in length (``pairs_with_length_difference``): ``chosen_longer`` (how
    often the data prefers the longer response) and ``model_prefers_longer`` (how often the
    model gives the longer one the higher reward, ties half); None without such pairs.
    ``shorter_wins_accuracy``: the accuracy, over all pairs, of the baseline that prefers
    the shorter response (ties half) — a reward model should beat both it and
    ``1 - shorter_wins_accuracy`` (prefer the longer) to show more than a length heuristic.
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  n = rc.shape[0]
  lc = _same_shape("lengths_chosen", lengths_chosen, n)
  lr = _same_shape("lengths_rejected", lengths_rejected, n)
  rewards, lengths = np.concatenate([rc, rr]), np.concatenate([lc, lr])
  constant = bool(np.all(lengths == lengths[0]))
  pearson = spearman = None
  if not constant and rewards.shape[0] >= 2:
    pearson = _finite_or_none(
      metrics.length_correlation(rewards.astype(np.float32), lengths.astype(np.float32))
    )
    spearman = _finite_or_none(metrics.spearman(rewards, lengths))
  differ = lc != lr
  out = {
    "pearson": pearson,
    "spearman": spearman,
    "constant_length": constant,
    "mean_length_chosen": float(lc.mean()),
    "mean_length_rejected": float(lr.mean()),
    "pairs_with_length_difference": int(differ.sum()),
    "chosen_longer": None,
    "model_prefers_longer": None,
    "shorter_wins_accuracy": float(np.mean((lc < lr) + 0.5 * (lc == lr))),
  }
  if differ.any():
    longer_is_chosen = lc[differ] > lr[differ]
    r_long = np.where(longer_is_chosen, rc[differ], rr[differ])
    r_short = np.where(longer_is_chosen, rr[differ], rc[differ])
    out["chosen_longer"] = float(longer_is_chosen.mean())
    out["model_prefers_longer"] = float(np.mean((r_long > r_short) + 0.5 * (r_long == r_short)))
  return out


def subset_accuracy(
  rewards_chosen: Any, rewards_rejected: Any, subset_ids: Any, subset_names: Sequence[str]
) -> list[dict[str, Any]]:
  """Accuracy per subset: ``[{'name', 'num_pairs', 'accuracy', 'accuracy_stderr'}]``.

  Args:
    rewards_chosen, rewards_rejected: ``[num_pairs]``.
    subset_ids: ``[num_pairs]`` ints indexing ``subset_names``.
    subset_names: the subset names; subsets without pairs are left out.
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  ids = _same_shape("subset_ids", subset_ids, rc.shape[0], np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= len(subset_names)):
    raise ValueError(
      f"subset_ids must lie in [0, {len(subset_names)}), got [{ids.min()}, {ids.max()}]"
    )
  score = (rc > rr) + 0.5 * (rc == rr)
  rows = []
  for i, name in enumerate(subset_names):
    sel = ids == i
    if sel.any():
      acc = float(score[sel].mean())
      rows.append(
        {
          "name": str(name),
          "num_pairs": int(sel.sum()),
          "accuracy": acc,
          "accuracy_stderr": math.sqrt(acc * (1 - acc) / int(sel.sum())),
        }
      )
  return rows


def gold_metrics(
  rewards_chosen: Any, rewards_rejected: Any, gold_chosen: Any, gold_rejected: Any
) -> dict[str, Any]:
  """Agreement of the reward model with a gold scorer (synthetic data).

  Returns:
    :func:`jaxrm.math.metrics.gold_agreement` (``pairwise_accuracy`` against gold's order,
    ``spearman`` and ``kendall_tau`` over all responses) plus ``labels_agree_with_gold``
    (how often the data's labels order the pair as gold does; below 1 with label noise or
    Bradley–Terry labels), all None where undefined.
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  gc = _same_shape("gold_chosen", gold_chosen, rc.shape[0])
  gr = _same_shape("gold_rejected", gold_rejected, rc.shape[0])
  if rc.shape[0] < 1:
    raise ValueError("gold metrics need at least one pair")
  out = metrics.gold_agreement(rc, rr, gc, gr)
  out = {k: _finite_or_none(v) for k, v in out.items()}
  out["labels_agree_with_gold"] = float(np.mean((gc > gr) + 0.5 * (gc == gr)))
  return out


def calibration_bins(calibration: metrics.Calibration) -> list[dict[str, Any]]:
  """The bins of a :class:`jaxrm.math.metrics.Calibration` as rows (empty bins: None values)."""
  count = np.asarray(calibration.count)
  k = count.shape[0]
  return [
    {
      "low": i / k,
      "high": (i + 1) / k,
      "count": int(count[i]),
      "confidence": _finite_or_none(np.asarray(calibration.confidence)[i]),
      "accuracy": _finite_or_none(np.asarray(calibration.accuracy)[i]),
    }
    for i in range(k)
  ]


def build_report(
  rewards_chosen: Any,
  rewards_rejected: Any,
  *,
  labels: Any = None,
  response_lengths: tuple[Any, Any] | None = None,
  subset_ids: Any = None,
  subset_names: Sequence[str] = (),
  gold: tuple[Any, Any] | None = None,
  num_bins: int = 10,
  sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Computes every evaluation section of the report from the rewards of a set of pairs.

  Args:
    rewards_chosen: ``[num_pairs]`` rewards of the preferred responses.
    rewards_rejected: ``[num_pairs]``.
    labels: optional soft labels ``P(chosen preferred)`` ``[num_pairs]``.
    response_lengths: optional ``(lengths_chosen, lengths_rejected)``, ``[num_pairs]`` each.
    subset_ids: optional ``[num_pairs]`` ints into ``subset_names``; the per-subset section
      is written when there are at least two subsets.
    subset_names: names of the subsets.
    gold: optional ``(gold_chosen, gold_rejected)`` gold scores ``[num_pairs]`` each.
    num_bins: calibration bins.
    sections: descriptive sections copied into the report as they are (e.g. ``'run'``,
      ``'model'``, ``'data'``, ``'training'``); must be JSON-serialisable.

  Returns:
    A JSON-serialisable dict with the given sections and ``heldout``
    (:func:`heldout_metrics`), ``calibration`` (``ece``, ``brier``, ``num_bins``, ``bins``,
    ``method``), ``rewards`` (:func:`reward_statistics`), ``length`` (:func:`length_bias` or
    None), ``subsets`` (:func:`subset_accuracy` or None) and ``gold`` (:func:`gold_metrics`
    or None).
  """
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  heldout = heldout_metrics(rc, rr, labels=labels, num_bins=num_bins)
  calibration = pairwise_calibration(rc, rr, labels=labels, num_bins=num_bins)
  report = dict(sections or {})
  report["heldout"] = heldout
  report["calibration"] = {
    "ece": float(calibration.ece),
    "brier": heldout["brier"],
    "num_bins": num_bins,
    "method": "each pair in both orders (chosen, rejected) and (rejected, chosen)",
    "bins": calibration_bins(calibration),
  }
  report["rewards"] = reward_statistics(rc, rr)
  report["length"] = None if response_lengths is None else length_bias(rc, rr, *response_lengths)
  report["subsets"] = None
  if subset_ids is not None and len(subset_names) >= 2:
    report["subsets"] = subset_accuracy(rc, rr, subset_ids, subset_names)
  report["gold"] = None if gold is None else gold_metrics(rc, rr, *gold)
  return to_json(report)


# ------------------------------------------------------------------------------ plots


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def plot_reliability(
  bins: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "Reliability diagram"
) -> None:
  """Writes a reliability diagram (observed frequency against confidence per bin) as PNG.

  Args:
    bins: rows of :func:`calibration_bins` (``low``, ``high``, ``count``, ``confidence``,
      ``accuracy``); empty bins are skipped.
    path: the PNG file.
    title: the plot title.
  """
  plt = _pyplot()
  fig, (ax, ax_count) = plt.subplots(
    2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
  )
  full = [b for b in bins if b["count"] and b["confidence"] is not None]
  centers = [(b["low"] + b["high"]) / 2 for b in bins]
  width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
  ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  ax.bar(
    [(b["low"] + b["high"]) / 2 for b in full],
    [b["accuracy"] for b in full],
    width=width * 0.9,
    alpha=0.5,
    color="tab:blue",
    label="observed frequency",
  )
  ax.plot(
    [b["confidence"] for b in full],
    [b["accuracy"] for b in full],
    "o-",
    color="tab:blue",
    label="(mean confidence, frequency)",
  )
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("P(first preferred), observed")
  ax.set_title(title)
  ax.legend(loc="upper left", fontsize=8)
  ax_count.bar(centers, [b["count"] for b in bins], width=width * 0.9, color="tab:gray")
  ax_count.set_xlabel("predicted P(first preferred) = sigmoid(r_first - r_second)")
  ax_count.set_ylabel("count")
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)


def plot_reward_histogram(
  rewards_chosen: Any, rewards_rejected: Any, path: str | os.PathLike, *, num_bins: int = 30
) -> None:
  """Writes overlaid histograms of the chosen and rejected rewards as PNG."""
  rc, rr = _pair(rewards_chosen, rewards_rejected)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  lo, hi = float(min(rc.min(), rr.min())), float(max(rc.max(), rr.max()))
  edges = np.linspace(lo, hi if hi > lo else lo + 1.0, num_bins + 1)
  ax.hist(rc, bins=edges, alpha=0.5, label=f"chosen (mean {rc.mean():.3f})")
  ax.hist(rr, bins=edges, alpha=0.5, label=f"rejected (mean {rr.mean():.3f})")
  ax.set_xlabel("reward")
  ax.set_ylabel("responses")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)


def write_report(
  report: Mapping[str, Any],
  out_dir: str | os.PathLike,
  *,
  rewards_chosen: Any,
  rewards_rejected: Any,
) -> dict[str, str]:
  """Writes the report files into ``out_dir`` (created if needed).

  Args:
    report: a report from :func:`build_report`.
    out_dir: the output directory.
    rewards_chosen, rewards_rejected: the rewards the report was built from (for the
      histogram).

  Returns:
    ``{'json', 'markdown', 'reliability', 'histogram'}`` -> written paths.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    "json": os.path.join(out_dir, REPORT_JSON),
    "markdown": os.path.join(out_dir, REPORT_MARKDOWN),
    "reliability": os.path.join(out_dir, RELIABILITY_PNG),
    "histogram": os.path.join(out_dir, HISTOGRAM_PNG),
  }
  plot_reliability(report["calibration"]["bins"], paths["reliability"])
  plot_reward_histogram(rewards_chosen, rewards_rejected, paths["histogram"])
  rundir.atomic_write(paths["json"], json.dumps(to_json(report), indent=2, allow_nan=False) + "\n")
  rundir.atomic_write(paths["markdown"], render_markdown(report))
  return paths
