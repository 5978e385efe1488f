"""Tests for jaxrm.io.report against float64 NumPy / scipy references, and its files."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from jaxrm.io import report
from jaxrm.math import metrics


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _pairs(seed, n=300):
  rng = np.random.default_rng(seed)
  return rng.normal(size=n) + 0.4, rng.normal(size=n)


def _np_ece(q, y, num_bins):
  """Equal-width-bin ECE of predictions q against labels y (float64 reference)."""
  bins = np.clip(np.floor(q * num_bins).astype(int), 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    sel = bins == b
    if sel.any():
      ece += sel.sum() / q.size * abs(y[sel].mean() - q[sel].mean())
  return ece


def _calibrated_pairs(seed, n=20000):
  """Pairs whose labels are drawn from sigmoid(r_c - r_r): a perfectly calibrated model."""
  rng = np.random.default_rng(seed)
  r_a, r_b = rng.normal(scale=1.5, size=n), rng.normal(scale=1.5, size=n)
  a_wins = rng.uniform(size=n) < _sigmoid(r_a - r_b)
  return np.where(a_wins, r_a, r_b), np.where(a_wins, r_b, r_a)


def test_pairwise_calibration_counts_each_pair_in_both_orders_and_matches_numpy():
  rc, rr = _pairs(0)
  cal = report.pairwise_calibration(rc, rr, num_bins=10)
  q = _sigmoid(np.concatenate([rc - rr, rr - rc]))
  y = np.concatenate([np.ones_like(rc), np.zeros_like(rc)])
  np.testing.assert_allclose(float(cal.ece), _np_ece(q, y, 10), rtol=1e-5, atol=1e-7)
  counts = np.asarray(cal.count)
  assert counts.sum() == 2 * rc.size
  np.testing.assert_array_equal(counts, counts[::-1])  # symmetric bins around 1/2
  bins = np.clip(np.floor(q * 10).astype(int), 0, 9)
  for b in range(10):
    np.testing.assert_allclose(np.asarray(cal.confidence)[b], q[bins == b].mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cal.accuracy)[b], y[bins == b].mean(), rtol=1e-6)


def test_symmetrised_ece_is_near_zero_for_a_calibrated_model_unlike_the_one_order_ece():
  rc, rr = _calibrated_pairs(1)
  assert float(report.pairwise_calibration(rc, rr).ece) < 0.02
  # With every pair as (chosen, rejected) the label is always 1: that ECE is mean(1 - q).
  one_order = float(metrics.expected_calibration_error(rc, rr).ece)
  np.testing.assert_allclose(one_order, np.mean(1 - _sigmoid(rc - rr)), rtol=1e-4)
  assert one_order > 0.2


def test_overconfident_rewards_give_a_large_ece():
  rc, rr = _calibrated_pairs(2)
  assert float(report.pairwise_calibration(4 * rc, 4 * rr).ece) > 0.1


def test_soft_labels_enter_both_orders():
  rc, rr = _pairs(3, n=50)
  labels = np.random.default_rng(4).uniform(size=50)
  cal = report.pairwise_calibration(rc, rr, labels=labels, num_bins=5)
  q = _sigmoid(np.concatenate([rc - rr, rr - rc]))
  y = np.concatenate([labels, 1 - labels])
  np.testing.assert_allclose(float(cal.ece), _np_ece(q, y, 5), rtol=1e-5, atol=1e-7)


def test_heldout_metrics_match_numpy():
  rc, rr = _pairs(5)
  rr[:10] = rc[:10]  # ties count one half
  got = report.heldout_metrics(rc, rr)
  d = rc - rr
  acc = np.mean((d > 0) + 0.5 * (d == 0))
  np.testing.assert_allclose(got["accuracy"], acc, rtol=1e-6)
  np.testing.assert_allclose(got["log_loss"], np.mean(np.log1p(np.exp(-d))), rtol=1e-5)
  np.testing.assert_allclose(got["brier"], np.mean((_sigmoid(d) - 1) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["accuracy_stderr"], np.sqrt(acc * (1 - acc) / rc.size), rtol=1e-5)
  q = _sigmoid(np.concatenate([d, -d]))
  np.testing.assert_allclose(
    got["ece"], _np_ece(q, np.r_[np.ones_like(d), np.zeros_like(d)], 10), rtol=1e-5
  )
  assert got["num_pairs"] == rc.size


def test_reward_statistics_match_numpy():
  rc, rr = _pairs(6)
  got = report.reward_statistics(rc, rr)
  both = np.concatenate([rc, rr])
  np.testing.assert_allclose(got["mean"], both.mean(), rtol=1e-12)
  np.testing.assert_allclose(got["std"], both.std(), rtol=1e-12)
  np.testing.assert_allclose(
    list(got["quantiles"].values()), np.quantile(both, report.REWARD_QUANTILES), rtol=1e-12
  )
  np.testing.assert_allclose(got["margin_quantiles"]["q50"], np.median(rc - rr), rtol=1e-12)
  assert list(got["quantiles"]) == ["q05", "q25", "q50", "q75", "q95"]


def test_length_bias_matches_numpy_and_detects_a_length_biased_model():
  rng = np.random.default_rng(7)
  lc, lr = rng.integers(5, 60, 200), rng.integers(5, 60, 200)
  rc, rr = 0.1 * lc + rng.normal(size=200), 0.1 * lr + rng.normal(size=200)
  got = report.length_bias(rc, rr, lc, lr)
  rewards, lengths = np.r_[rc, rr], np.r_[lc, lr]
  np.testing.assert_allclose(got["pearson"], np.corrcoef(rewards, lengths)[0, 1], rtol=1e-4)
  np.testing.assert_allclose(got["spearman"], stats.spearmanr(rewards, lengths)[0], rtol=1e-9)
  differ = lc != lr
  longer_c = lc > lr
  r_long = np.where(longer_c, rc, rr)[differ]
  r_short = np.where(longer_c, rr, rc)[differ]
  np.testing.assert_allclose(got["model_prefers_longer"], np.mean(r_long > r_short))
  np.testing.assert_allclose(got["chosen_longer"], np.mean(longer_c[differ]))
  assert got["pairs_with_length_difference"] == differ.sum()
  np.testing.assert_allclose(got["shorter_wins_accuracy"], np.mean((lc < lr) + 0.5 * (lc == lr)))
  assert got["pearson"] > 0.5 and got["model_prefers_longer"] > 0.75


def test_length_bias_of_constant_lengths_is_undefined_not_nan():
  rc, rr = _pairs(8, n=20)
  got = report.length_bias(rc, rr, np.full(20, 12), np.full(20, 12))
  assert got["constant_length"] and got["pearson"] is None and got["spearman"] is None
  assert got["model_prefers_longer"] is None and got["pairs_with_length_difference"] == 0
  assert got["shorter_wins_accuracy"] == 0.5


def test_subset_accuracy_matches_per_subset_numpy():
  rc, rr = _pairs(9)
  ids = np.random.default_rng(10).integers(0, 3, rc.size)
  ids[ids == 1] = 2  # subset 1 has no pairs and is left out
  rows = report.subset_accuracy(rc, rr, ids, ["a", "b", "c"])
  assert [r["name"] for r in rows] == ["a", "c"]
  for row, i in zip(rows, (0, 2)):
    assert row["num_pairs"] == np.sum(ids == i)
    np.testing.assert_allclose(row["accuracy"], np.mean(rc[ids == i] > rr[ids == i]))
  with pytest.raises(ValueError, match="subset_ids"):
    report.subset_accuracy(rc, rr, ids, ["a", "b"])


def test_gold_metrics_match_scipy():
  rng = np.random.default_rng(11)
  gc, gr = rng.normal(size=100), rng.normal(size=100)
  rc, rr = gc + 0.5 * rng.normal(size=100), gr + 0.5 * rng.normal(size=100)
  got = report.gold_metrics(rc, rr, gc, gr)
  np.testing.assert_allclose(
    got["pairwise_accuracy"], np.mean(np.sign(rc - rr) == np.sign(gc - gr)), rtol=1e-6
  )
  np.testing.assert_allclose(
    got["spearman"], stats.spearmanr(np.r_[rc, rr], np.r_[gc, gr])[0], rtol=1e-9
  )
  np.testing.assert_allclose(
    got["kendall_tau"], stats.kendalltau(np.r_[rc, rr], np.r_[gc, gr])[0], rtol=1e-9
  )
  np.testing.assert_allclose(got["labels_agree_with_gold"], np.mean(gc > gr))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rewards_chosen=np.ones((2, 3)), rewards_rejected=np.ones(3)), "rewards_chosen"),
    (dict(rewards_chosen=np.ones(3), rewards_rejected=np.ones(4)), "rewards_rejected"),
    (dict(rewards_chosen=np.array([1.0, np.nan]), rewards_rejected=np.ones(2)), "finite"),
    (
      dict(rewards_chosen=np.ones(3), rewards_rejected=np.ones(3), gold=(np.ones(2), np.ones(3))),
      "gold_chosen",
    ),
    (
      dict(
        rewards_chosen=np.ones(3),
        rewards_rejected=np.ones(3),
        response_lengths=(np.ones(3), np.ones(2)),
      ),
      "lengths_rejected",
    ),
  ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, message):
  with pytest.raises(ValueError, match=message):
    report.build_report(kwargs.pop("rewards_chosen"), kwargs.pop("rewards_rejected"), **kwargs)


def _full_report():
  rng = np.random.default_rng(12)
  rc, rr = rng.normal(size=64) + 0.3, rng.normal(size=64)
  rep = report.build_report(
    rc,
    rr,
    response_lengths=(rng.integers(3, 40, 64), rng.integers(3, 40, 64)),
    subset_ids=rng.integers(0, 2, 64),
    subset_names=("harmless", "helpful"),
    gold=(rc + rng.normal(size=64), rr + rng.normal(size=64)),
    sections={
      "run": {
        "workdir": "/tmp/run",
        "step": 40,
        "best_checkpoint_step": 35,
        "evaluated_on": "test",
      },
      "model": {"preset": "tiny", "num_params": 1234},
      "data": {"source": "jsonl", "splits": {"test": {"pairs": 64}}},
      "training": {"loss": "bradley_terry", "steps": 40},
    },
  )
  return rc, rr, rep


def test_build_report_is_strict_json_and_holds_every_section():
  rc, rr, rep = _full_report()
  text = json.dumps(rep, allow_nan=False)
  assert json.loads(text) == rep
  for key in (
    "run",
    "model",
    "data",
    "training",
    "heldout",
    "calibration",
    "rewards",
    "length",
    "subsets",
    "gold",
  ):
    assert rep[key] is not None, key
  assert rep["heldout"]["accuracy"] == pytest.approx(np.mean(rc > rr))
  assert [s["name"] for s in rep["subsets"]] == ["harmless", "helpful"]
  assert len(rep["calibration"]["bins"]) == 10


def test_single_subset_and_no_gold_leave_those_sections_out():
  rc, rr = _pairs(13, n=30)
  rep = report.build_report(rc, rr, subset_ids=np.zeros(30, int), subset_names=("only",))
  assert rep["subsets"] is None and rep["gold"] is None and rep["length"] is None
  md = report.render_markdown(rep)
  assert "per subset" not in md and "gold" not in md


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
  rc, rr, rep = _full_report()
  paths = report.write_report(rep, tmp_path / "out", rewards_chosen=rc, rewards_rejected=rr)
  assert set(paths) == {"json", "markdown", "reliability", "histogram"}
  for key in ("reliability", "histogram"):
    with open(paths[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(paths["json"]) as f:
    assert json.load(f) == rep
  with open(paths["markdown"]) as f:
    md = f.read()
  for heading in (
    "## Held-out preference accuracy",
    "## Calibration",
    "## Reward distribution",
    "## Reward and response length",
    "## Accuracy per subset",
    "## Agreement with the gold reward",
    f"]({report.RELIABILITY_PNG})",
    f"]({report.HISTOGRAM_PNG})",
  ):
    assert heading in md, heading
  assert f"{rep['heldout']['accuracy']:.4f}".rstrip("0") in md
  assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]


def test_to_json_replaces_non_finite_numbers_with_none():
  out = report.to_json(
    {"a": np.float32(np.nan), "b": [1.0, math.inf], "c": np.arange(2), "d": np.bool_(True)}
  )
  assert out == {"a": None, "b": [1.0, None], "c": [0, 1], "d": True}
