"""benchmarks/peer_trl.py without its optional packages: input errors, the install message,
the token ids handed to TRL and the medians of per-round ratios (no torch imported here)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peer_trl.py")
SAMPLE = os.path.join(ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")

sys.path.insert(0, ROOT)
from benchmarks import peer_trl  # noqa: E402


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT
  )


def test_bad_data_flag_is_named(tmp_path):
  proc = _run(f"--workdir={tmp_path}", f"--data={tmp_path / 'missing.jsonl'}")
  assert proc.returncode != 0
  assert "--data: no such file" in proc.stderr


def test_unknown_workload_is_named(tmp_path):
  proc = _run(f"--workdir={tmp_path}", f"--data={SAMPLE}", "--workloads=hh,gpt9")
  assert proc.returncode != 0
  assert "--workloads: unknown ['gpt9']" in proc.stderr


@pytest.mark.skipif(
  importlib.util.find_spec("torch") is not None, reason="the peer packages are installed"
)
def test_missing_peer_packages_name_the_install_command(tmp_path):
  proc = _run(f"--workdir={tmp_path}", f"--data={SAMPLE}", "--quick")
  assert proc.returncode != 0
  assert "pip install -e '.[peer]'" in proc.stderr


def _gpt2_style_tokenizer(path) -> str:
  """A byte-level BPE folder (benchmarks/gpt2_tokenizer.py) whose id 0 is a real token, the
  space, as GPT-2's id 0 is "!"; no pad token, so EOS pads."""
  import tokenizers

  from benchmarks import gpt2_tokenizer

  chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet(), key=lambda c: c != "Ġ")
  vocab = {c: i for i, c in enumerate([*chars, "<|endoftext|>"])}
  (path / "encoder.json").write_text(json.dumps(vocab))
  (path / "vocab.bpe").write_text("#version: 0.2\n")
  out = str(path / "tokenizer")
  gpt2_tokenizer.write_folder(str(path / "encoder.json"), str(path / "vocab.bpe"), out)
  return out


@pytest.mark.parametrize("subword", [False, True], ids=["bytes", "gpt2_style"])
def test_exported_token_ids_are_jaxrms_training_and_test_batches(tmp_path, subword):
  from jaxrm.data import pairs
  from jaxrm.data.run_tokenizer import RunTokenizer

  tokenizer = _gpt2_style_tokenizer(tmp_path) if subword else ""
  path, n = peer_trl.export_token_ids(SAMPLE, 48, str(tmp_path), tokenizer)
  run = peer_trl.load_run_data(peer_trl.data_config(SAMPLE, 48, tokenizer), str(tmp_path))
  tok = RunTokenizer.from_source(tokenizer)
  saw_zero = False
  for split, split_path, train in (
    (run.train, path, True),
    (run.test, peer_trl.heldout_ids_path(path), False),
  ):
    rows = [json.loads(line) for line in open(split_path)]
    assert len(rows) == len(split) > 0
    it = pairs.make_iterator(split, batch_size=4, seed=0, bucket=False, max_len=48, train=train)
    batch = next(it)
    for j, i in enumerate(batch["index"]):
      for key in ("chosen", "rejected"):
        ids = rows[i][key + "_ids"]
        assert 0 < len(ids) <= 48 and max(ids) < tok.vocab_size
        np.testing.assert_array_equal(batch[key][j][batch[key + "_mask"][j]], ids)
        saw_zero |= 0 in ids
  # Id 0 is the byte tokenizer's pad, never a token; here the subword vocabulary's space.
  assert saw_zero == subword
  assert n == len(run.train) and peer_trl.heldout_ids_path(path) != path
  with open(peer_trl.vocab_path(path)) as f:
    vocab = json.load(f)
  assert run.tokenizer == ("byte" if not subword else tok.name) and vocab == {
    "vocab_size": tok.vocab_size,
    "pad_id": tok.pad_id,
    "bos_id": tok.bos_id,
    "eos_id": tok.eos_id,
    "tokenizer": run.tokenizer,
  }
  assert (vocab["vocab_size"], vocab["pad_id"], vocab["eos_id"]) == (
    (257, 256, 256) if subword else (259, 0, 2)
  )


def test_bad_tokenizer_flag_is_named(tmp_path):
  proc = _run(f"--workdir={tmp_path}", f"--data={SAMPLE}", f"--tokenizer={tmp_path}")
  assert proc.returncode != 0
  assert "--tokenizer: " in proc.stderr and "not a folder with tokenizer.json" in proc.stderr


def test_trl_child_imports_neither_jax_nor_jaxrm(tmp_path):
  """TRL's timed process pays for its own imports only (jax's took about a second here). It
  stops at a missing ids file, or earlier without the peer packages."""
  proc = subprocess.run(
    [sys.executable, "-X", "importtime", SCRIPT, "--child=trl_train", f"--workdir={tmp_path}"]
    + [f"--out={tmp_path / 'out.json'}", f"--ids_file={tmp_path / 'missing.jsonl'}"]
    + [f"--data={SAMPLE}", "--layers=2", "--width=32", "--heads=2", "--seq_len=64"]
    + ["--batch_pairs=4", "--steps=6"],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
    cwd=ROOT,
  )
  assert proc.returncode != 0
  imported = {
    line.split("|")[-1].strip().split(".")[0]
    for line in proc.stderr.splitlines()
    if line.startswith("import time:")
  }
  assert "absl" in imported and not {"jax", "jaxlib", "jaxrm"} & imported


def test_trl_evaluates_at_jaxrms_evaluation_steps():
  w = peer_trl.WORKLOADS["hh"]
  assert peer_trl.trl_eval_steps(w) == 50  # the hh config's eval.every; 100 steps
  short = peer_trl.dataclasses.replace(w, steps=20)
  assert peer_trl.trl_eval_steps(short) == 20  # jaxrm evaluates at its last step only
  with pytest.raises(peer_trl.app.UsageError, match="--trl_evaluate: 120 steps"):
    peer_trl.trl_eval_steps(peer_trl.dataclasses.replace(w, steps=120))


def _rows(step_times, wall_times, side="trl"):
  rows = []
  for r, ((js, ts), (jw, tw)) in enumerate(zip(step_times, wall_times)):
    rows.append(dict(workload="w", round=r, side="jaxrm", kind="step", step_s=js, first_step_s=9.0))
    rows.append(dict(workload="w", round=r, side=side, kind="step", step_s=ts))
    rows.append(dict(workload="w", round=r, side="jaxrm", kind="e2e", wall_s=jw, exit_s=jw / 100))
    trl = dict(bf16=side == "trl", gradient_checkpointing=side == "trl")
    rows.append(
      dict(workload="w", round=r, side=side, kind="e2e", wall_s=tw, exit_s=tw / 10, **trl)
    )
  return rows


def test_summary_reports_medians_of_per_round_ratios(capsys):
  w = peer_trl.Workload(layers=2, width=32, heads=2, seq_len=64, batch_pairs=4, steps=10)
  # Per-round step ratios 4, 1, 1.5 -> median 1.5 (the ratio of the medians would be 4 / 2);
  # end to end 2, 0.5, 3 -> median 2 (the ratio of the medians would be 20 / 20).
  rows = _rows([(1.0, 4.0), (2.0, 2.0), (4.0, 6.0)], [(10.0, 20.0), (40.0, 20.0), (20.0, 60.0)])
  (s,) = peer_trl.summarise(rows, {"w": w}, peak=1e12)
  assert s["trl_step_ratio"] == pytest.approx(1.5)
  assert s["trl_e2e_ratio"] == pytest.approx(2.0)
  assert s["trl_step_ratios"] == pytest.approx([4.0, 1.0, 1.5])
  assert s["trl_e2e_ratios"] == pytest.approx([2.0, 0.5, 3.0])
  assert s["jaxrm_step_pairs_s"] == pytest.approx(4 / 2.0)
  assert s["jaxrm_e2e_pairs_s"] == pytest.approx(10 * 4 / 20.0)
  assert s["trl_e2e_pairs_s"] == pytest.approx(10 * 4 / 20.0)
  assert s["jaxrm_e2e_exit_s"] == pytest.approx(0.2) and s["trl_e2e_exit_s"] == pytest.approx(2.0)
  flops = peer_trl.rm_flops_per_pair(w)
  assert s["jaxrm_step_flop_util"] == pytest.approx(2.0 * flops / 1e12)
  assert s["jaxrm_first_step_s"] == 9.0
  assert s["trl_bf16"] is True and peer_trl.peer_sides(s) == ["trl"]
  # The table shows each median with the range of its rounds.
  peer_trl.print_table([s], [])
  table = capsys.readouterr().out
  assert "| 1.50x (rounds 1.00-4.00) |\n" in table
  assert "| **2.00x** (rounds 0.50-3.00) |" in table


def test_each_trl_setting_is_its_own_peer_with_its_own_ratios(capsys):
  w = peer_trl.Workload(layers=2, width=32, heads=2, seq_len=64, batch_pairs=4, steps=10)
  # The same jaxrm rounds against TRL's defaults (twice jaxrm's time) and float32 (half).
  rows = _rows([(1.0, 2.0)], [(10.0, 20.0)]) + [
    r for r in _rows([(1.0, 0.5)], [(10.0, 5.0)], side="trl_float32") if r["side"] != "jaxrm"
  ]
  (s,) = peer_trl.summarise(rows, {"w": w}, peak=1e12)
  assert peer_trl.peer_sides(s) == ["trl", "trl_float32"]
  assert s["trl_step_ratio"] == pytest.approx(2.0) and s["trl_e2e_ratio"] == pytest.approx(2.0)
  assert s["trl_float32_step_ratio"] == pytest.approx(0.5)
  assert s["trl_float32_e2e_ratio"] == pytest.approx(0.5)
  assert s["trl_float32_bf16"] is False and s["trl_float32_e2e_pairs_s"] == pytest.approx(8.0)
  sampler = dict(batch=64, jaxrm_tokens_per_s=6e3, hf_tokens_per_s=3e3)
  threads = dict(sampler, jaxrm_thread_groups=2, jaxrm_threads_tokens_per_s=9e3)
  peer_trl.print_table([s], [sampler, threads])
  table = capsys.readouterr().out
  assert "| trl | jaxrm / trl | trl_float32 | jaxrm / trl_float32 |" in table
  assert "**2.00x** |" in table and "**0.50x** |" in table
  assert "| sampler, batch 64 | tokens/s | 6,000 | HF generate 3,000 | 2.00x | | |" in table
  line = "| sampler, batch 64, 2 thread groups | tokens/s | 9,000 | HF generate 3,000 | 3.00x |"
  assert table.count(line) == 1
  peer_trl.print_table([s], [], "bfloat16")
  table = capsys.readouterr().out
  assert "| workload | measure | jaxrm (bfloat16 matmuls) | trl |" in table
  assert "without figures or report" not in table
  peer_trl.print_table([s], [], "bfloat16", "trl")
  assert "end to end, 10 steps, jaxrm without figures or report:" in capsys.readouterr().out


def test_bad_sampler_thread_groups_are_named(tmp_path):
  proc = _run(f"--workdir={tmp_path}", f"--data={SAMPLE}", "--sampler_thread_groups=0")
  assert proc.returncode != 0
  assert "--sampler_thread_groups must be >= 1, got 0" in proc.stderr


def test_bad_trl_precision_is_named(tmp_path):
  proc = _run(f"--workdir={tmp_path}", f"--data={SAMPLE}", "--trl_precisions=float32,bf17")
  assert proc.returncode != 0
  assert "--trl_precisions=float32,bf17: give distinct settings of ['defaults', 'float32']" in (
    proc.stderr
  )


def test_trl_step_time_drops_two_warmup_steps():
  assert peer_trl.trl_step_s([30.0, 5.0, 1.0, 2.0, 3.0]) == 2.0
  assert peer_trl.trl_step_s([4.0, 2.0]) == 3.0


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--jaxrm_cpu_devices=0", "--jaxrm_cpu_devices must be >= 1, got 0"),
    ("--jaxrm_cpu_devices=3", "--jaxrm_cpu_devices=3 must divide the pairs per step of ['hh']"),
    ("--jaxrm_pack_pairs=-1", "--jaxrm_pack_pairs must be >= 0, got -1"),
    ("--jaxrm_microbatch_size=-2", "--jaxrm_microbatch_size must be >= -1"),
    ("--batch_pairs=6", "--jaxrm_microbatch_size=-1 (slices of 4 pairs) must divide each"),
  ],
)
def test_bad_jaxrm_cpu_devices_and_packing_are_named(tmp_path, flag, message):
  proc = _run(f"--workdir={tmp_path}", f"--data={SAMPLE}", "--workloads=hh", flag)
  assert proc.returncode != 0
  assert message in proc.stderr


@pytest.mark.parametrize("outputs", ["trl", "full"])
def test_jaxrm_runs_write_what_jaxrm_outputs_names(tmp_path, outputs):
  """``--jaxrm_outputs=trl`` reaches jaxrm's timed process: its run writes metrics and the final
  checkpoint, as TRL's does, and no learning-curve figures or report; ``full`` writes both."""
  from absl.testing import flagsaver

  w = peer_trl.WORKLOADS["quick"]
  argv = ["peer_trl.py", f"--workdir={tmp_path}", f"--data={SAMPLE}", f"--jaxrm_outputs={outputs}"]
  with flagsaver.flagsaver():
    peer_trl.FLAGS(argv)
    wall, result = peer_trl.run_child("jaxrm_train", w, str(tmp_path), "run")
  run = tmp_path / "runs" / "run"
  assert result["step"] == w.steps
  assert 0 < result["exit_s"] < wall  # the interpreter's shutdown, after the child's JSON
  assert (run / "metrics.jsonl").is_file() and any((run / "checkpoints").iterdir())
  figures = sorted(p.name for p in run.glob("*.png"))
  if outputs == "trl":
    assert figures == [] and not (run / "rm_report.md").exists()
  else:
    assert "curves_train.png" in figures and (run / "rm_report.md").is_file()


def test_jaxrm_pack_pairs_and_microbatch_size_reach_the_timed_run(tmp_path):
  from absl.testing import flagsaver

  w = peer_trl.WORKLOADS["quick"]
  argv = ["peer_trl.py", f"--workdir={tmp_path}", f"--data={SAMPLE}", "--jaxrm_pack_pairs=16"]
  with flagsaver.flagsaver():
    peer_trl.FLAGS([*argv, "--jaxrm_microbatch_size=2"])
    _, result = peer_trl.run_child("jaxrm_train", w, str(tmp_path), "run")
  assert result["step"] == w.steps
  with open(tmp_path / "runs" / "run" / "config.json") as f:
    config = json.load(f)["config"]
  assert config["model"]["pack_pairs"] == 16 and config["microbatch_size"] == 2


def test_seed_sweep_rows_time_one_seed_and_the_seeds_per_round_and_thread_groups(tmp_path, capsys):
  from absl.testing import flagsaver

  argv = ["peer_trl.py", f"--workdir={tmp_path}", "--seed_sweep_seeds=2"]
  argv += ["--seed_sweep_proxy=1x8x2", "--seed_sweep_thread_groups=1,2", "--seed_sweep_steps=3"]
  with flagsaver.flagsaver():
    peer_trl.FLAGS(argv)
    peer_trl.check_seed_sweep_flags()
    rows = peer_trl.seed_sweep_rows(rounds=2)
  layouts = [(r["round"], r["thread_groups"], r["seed_batch"]) for r in rows]
  assert layouts == [(i, g, b) for i in (0, 1) for g in (1, 2) for b in (0, 1)]
  for r in rows:
    assert r["seeds"] == 2 and r["proxy"] == "1x8x2" and r["batch_pairs"] == 64
    # The baseline is one seed's faster layout: vmapped over an axis of one, or alone.
    one = min(r["one_seed_vmapped_step_s"], r["one_seed_alone_step_s"])
    assert r["one_seed_step_s"] == one
    assert r["ratio"] == pytest.approx(r["seeds_step_s"] / one)
  for i in (0, 4):  # one seed timed once per round
    assert len({rows[j]["one_seed_step_s"] for j in range(i, i + 4)}) == 1
  summary = peer_trl.summarise_seed_sweep(rows)
  assert [(s["thread_groups"], s["seed_batch"]) for s in summary] == [
    (1, 0),
    (1, 1),
    (2, 0),
    (2, 1),
  ]
  assert summary[0]["rounds"] == 2
  peer_trl.print_table([], [], seed_sweep=summary)
  table = capsys.readouterr().out
  head = "| seed sweep, 1x8x2 proxy, 64 pairs per seed, 2 seeds in 2 thread group(s)"
  assert f"{head}, vmapped |" in table and f"{head}, one after another |" in table


def test_seed_sweep_summary_is_the_median_of_per_round_ratios(capsys):
  rows = [
    dict(proxy="1x16x2", batch_pairs=64, seeds=8, thread_groups=2, seed_batch=1,
         one_seed_vmapped_step_s=o, one_seed_alone_step_s=o, one_seed_step_s=o,
         seeds_step_s=m, ratio=m / o)
    for o, m in ((1.0, 4.0), (2.0, 2.0), (4.0, 6.0))
  ]  # fmt: skip
  (s,) = peer_trl.summarise_seed_sweep(rows)
  # Per-round ratios 4, 1, 1.5 -> median 1.5 (the ratio of the medians would be 4 / 2).
  assert s["ratio"] == pytest.approx(1.5) and s["rounds"] == 3
  assert s["ratios"] == pytest.approx([4.0, 1.0, 1.5])
  peer_trl.print_table([], [], seed_sweep=[s])
  assert "| 1.50x (rounds 1.00-4.00) one seed's time |" in capsys.readouterr().out
  assert s["one_seed_step_s"] == 2.0 and s["seeds_step_s"] == 4.0


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--seed_sweep_seeds=-1", "--seed_sweep_seeds must be >= 0, got -1"),
    ("--seed_sweep_steps=0", "--seed_sweep_steps must be >= 1, got 0"),
    ("--seed_sweep_proxy=1x16", "--seed_sweep_proxy=1x16: give layers x width x heads"),
    ("--seed_sweep_proxy=1x10x4", "--seed_sweep_proxy=1x10x4: heads must divide width"),
    ("--seed_sweep_thread_groups=3", "--seed_sweep_thread_groups=3: give counts >= 1 that divide"),
    ("--seed_sweep_seed_batches=-1", "--seed_sweep_seed_batches=-1: give seed batches >= 0"),
  ],
)
def test_bad_seed_sweep_flags_are_named(tmp_path, flag, message):
  from absl.testing import flagsaver

  with flagsaver.flagsaver():
    peer_trl.FLAGS(["peer_trl.py", f"--workdir={tmp_path}", flag])
    with pytest.raises(peer_trl.app.UsageError, match=re.escape(message)):
      peer_trl.check_seed_sweep_flags()
