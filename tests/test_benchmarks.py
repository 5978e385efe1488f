"""Smoke tests of the benchmark scripts: they run and print their tables (no timing asserted)."""

import glob
import json
import os
import re
import subprocess
import sys
import types

import pytest

from tests import script_runner


def _run(script, *args):
  proc = script_runner.run_subprocess(f"benchmarks/{script}", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_model_throughput_quick_prints_mfu_table():
  out = _run("model_throughput.py", "--quick", "--sampler_batches=1,4")
  assert "matmul ceiling" in out and "MFU" in out and "sampler tok/s" in out
  lines = out.strip().splitlines()
  assert lines[-1].split("|")[0].strip() == "tiny" and len(lines[-1].split("|")) == 3
  assert lines[-2] == "preset | batch 1 | batch 4"


def test_seed_sweep_prints_one_row_per_seed_count():
  # One seed runs in one thread, two seeds in two threads of one seed each (one compiled sweep).
  out = _run("seed_sweep.py", "--steps=3", "--width=8", "--heads=4", "--batch_size=16",
             "--seeds=1,2", "--thread_groups=2", "--seed_batch=1")  # fmt: skip
  rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
  assert [int(r.split("|")[0]) for r in rows] == [1, 2]
  assert "proxy 1x8x4 |" in out and "seeds in up to 2 thread(s), 1 vmapped at a time" in out
  for args, message in (
    (["--seeds=3", "--thread_groups=2"], "--seeds=3 with --thread_groups=2: seed counts must be"),
    (["--seed_batch=-1"], "--seed_batch must be >= 0 (0: all seeds vmapped), got -1"),
    (["--width=10", "--heads=4"], "width must be divisible by num_heads"),
  ):
    proc = script_runner.run_subprocess("benchmarks/seed_sweep.py", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_rl_chunk_compile_prints_one_row_per_opt_level():
  out = _run(
    "rl_chunk_compile.py", "--opt_levels=0", "--members=1", "--noevaluate", "--run_chunks=1"
  )
  rows = [line.split("|") for line in out.splitlines() if line.strip()[:1] in "-0123456789"]
  assert [int(r[0]) for r in rows] == [0] and float(rows[0][2]) > 0


def test_attention_share_blocked_attention_gives_the_full_loss():
  names = ("full", "block4", "identity", "block4+noguard", "block4+remat", "block4+autodiff")
  names += ("block4+micro0",)
  out = _run(
    "attention_share.py",
    "--layers=1",
    "--width=16",
    "--heads=2",
    "--seq_len=16",
    "--batch_pairs=2",
    "--reps=2",
    "--rounds=2",
    f"--variants={','.join(names)}",
    # An embedding of 4,200 x 16 > 2^16 elements: the guard's lax.cond path (train_state).
    "--vocab_size=4200",
    "--microbatch_size=1",  # each variant's step over its two pairs one at a time but micro0's
  )
  assert "microbatches of 1 |" in out and "median of 2 x 2 steps" in out
  assert "vocabulary 4,200" in out
  rows = {r[0].strip(): r for r in (line.split("|") for line in out.splitlines()) if len(r) == 8}
  assert set(rows) == {"variant", *names}
  loss = {k: float(rows[k][6]) for k in names}
  last = {k: float(rows[k][7]) for k in names}
  assert abs(loss["block4"] - loss["full"]) <= 1e-5 and abs(last["block4"] - last["full"]) <= 1e-5
  assert last["block4"] != loss["block4"]  # four updates were applied
  # Without the non-finite guard the (finite) updates are the same; so are they when the
  # attention is recomputed in the backward pass, and for the whole batch at once.
  for other in ("block4+noguard", "block4+remat", "block4+micro0"):
    assert abs(loss[other] - loss["block4"]) <= 1e-6 and abs(last[other] - last["block4"]) <= 1e-6
  # The attention's own backward against autodiff's: the same loss after four updates.
  assert abs(loss["block4+autodiff"] - loss["block4"]) <= 1e-6
  assert abs(last["block4+autodiff"] - last["block4"]) <= 1e-6
  assert loss["identity"] != loss["full"]  # the lower bound is not the model
  for name in names[1:]:  # each variant's speed-up over the first, round by round
    assert f"\n{name} over full: " in out and "x per round (rounds " in out
  proc = script_runner.run_subprocess(
    "benchmarks/attention_share.py",
    "--batch_pairs=6",
    "--microbatch_size=0",
    "--variants=block4+micro4",
  )
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "'micro4' in 'block4+micro4' must divide the 6 of --batch_pairs" in proc.stderr


def _op_tables(out: str) -> dict[str, dict[str, float]]:
  """op_profile.py's two tables: row name -> share of op time (a fraction)."""
  tables, rows = {}, None
  for line in out.splitlines():
    cells = [c.strip() for c in line.split(" | ")]
    if len(cells) == 4 and cells[1] == "ms per call":
      rows = tables[cells[0]] = {}
    elif len(cells) == 4 and rows is not None:
      rows[cells[0]] = float(cells[3].rstrip("%")) / 100
  return tables


def test_op_profile_accounts_for_the_rm_step_op_by_op():
  out = _run(
    "op_profile.py",
    "--target=rm_step",
    "--layers=1",
    "--width=16",
    "--seq_len=16",
    "--batch_pairs=2",
    "--reps=2",
    "--top=100000",
  )
  tables = _op_tables(out)
  assert set(tables) == {"op kind", "JAX operation"} and out.startswith("rm_step: median wall")
  for rows in tables.values():  # every op is in both tables, once
    assert abs(sum(rows.values()) - 1) < 0.01
  assert any("dot_general" in name for name in tables["JAX operation"])


def test_op_profile_sampler_reads_each_layers_cache_without_slicing_it():
  out = _run(
    "op_profile.py",
    "--target=sampler",
    "--preset=tiny",
    "--batch=2",
    "--prompt_len=4",
    "--new_tokens=4",
    "--reps=2",
    "--top=100000",
  )
  ops = _op_tables(out)["JAX operation"]
  assert any("PolicyModel/backbone/block_N/dynamic_update_slice" in name for name in ops)
  # A stacked [layers, ...] cache was sliced (copied) per layer on every decode step.
  assert not [name for name in ops if name.endswith("PolicyModel/backbone/block_N/slice")]


def test_op_profile_seed_sweep_draws_permutations_per_chunk_not_per_step():
  steps = 16
  out = _run(
    "op_profile.py",
    "--target=seed_sweep",
    "--layers=1",
    "--width=8",
    "--batch=4",
    "--seeds=2",
    f"--steps={steps}",
    "--reps=2",
    "--top=100000",
  )
  assert out.startswith("seed_sweep: median wall")
  ops = {}  # JAX operation -> ops per call
  for line in out[out.index("JAX operation |") :].splitlines()[1:]:
    cells = line.split(" | ")
    if len(cells) == 4:
      ops[cells[0]] = float(cells[2])
  assert any(name.startswith("vmap()/while/body/") for name in ops)  # seeds vmapped over a scan
  # The chunk's epoch permutations are sorts outside the scan: fewer per call than its steps.
  sorts = sum(n for name, n in ops.items() if "_shuffle" in name and name.endswith("/sort"))
  assert 1 <= sorts < steps


def test_op_profile_names_a_bad_flag_in_one_line():
  for args, message in (
    (["--batch=0"], "--batch must be >= 1, got 0"),
    (["--target=sampler", "--preset=nope"], "name must be one of"),
    (["--target=seed_sweep", "--seeds=0"], "--seeds must be >= 1, got 0"),
  ):
    proc = script_runner.run_subprocess("benchmarks/op_profile.py", *args)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_suite_time_tabulates_what_the_jax_time_plugin_recorded(tmp_path):
  rows_dir = tmp_path / "rows"
  test = "tests/test_kl.py::test_k1_and_k3_are_unbiased_monte_carlo"
  scripts = "tests/test_peer_benchmark.py::test_unknown_workload_is_named"  # runs a script
  plugin = ["-p", "tests.jax_time", f"--jax_time={rows_dir}", "-p", "no:cacheprovider"]
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-n0", "-q", *plugin, test, scripts],
    capture_output=True,
    text=True,
    cwd=script_runner.ROOT,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  (path,) = glob.glob(os.path.join(rows_dir, "*.jsonl"))
  with open(path) as f:
    row, row_scripts = [json.loads(line) for line in f]
  assert row["test"] == test and row["compiles"] >= 1  # the test jits its estimators
  assert 0 < row["compile_s"] < row["wall_s"] and row["trace_s"] > 0
  # Its CPU time is in this process; the other test's is in the script it runs (a Python
  # process), not in the process that waits for it.
  assert row["cpu_s"] > row["compile_s"] / 2 and row["children_cpu_s"] == 0
  assert row_scripts["test"] == scripts
  assert row_scripts["children_cpu_s"] > row_scripts["cpu_s"] >= 0
  out = _run("suite_time.py", f"--rows={rows_dir}", "--top=1")
  lines = out.splitlines()
  assert lines[1].split("|")[-1].strip() == "all tests"
  total = {k.strip(): v.strip() for k, v in zip(lines[0].split("|"), lines[1].split("|"))}
  expected = row["children_cpu_s"] + row_scripts["children_cpu_s"]
  assert abs(float(total["subprocess cpu s"]) - expected) <= 0.051
  assert lines[-1].split("|")[-1].strip() in (test, scripts)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "gw0.jsonl").write_text(json.dumps(row) + "\nnot json\n")
  proc = script_runner.run_subprocess("benchmarks/suite_time.py", f"--rows={bad}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert f"{bad / 'gw0.jsonl'}:2: not a JSON row" in proc.stderr


def test_run_phases_times_every_phase_of_a_hh_run_within_the_run(tmp_path):
  sample = os.path.join(os.path.dirname(__file__), "data", "hh_rlhf_sample.jsonl.gz")
  out = _run(
    "run_phases.py",
    f"--workdir={tmp_path / 'run'}",
    f"--data={sample}",
    "--steps=2",
    "--max_len=64",
    "--shape=1x32x2",
    "--batch_size=8",
    "--microbatch_size=2",
  )
  with open(tmp_path / "run" / "run_phases.json") as f:
    seconds = json.load(f)
  assert "2 steps of 8 pairs in microbatches of 2, backbone 1x32x2" in out
  assert (seconds["shape"], seconds["batch_size"], seconds["microbatch_size"]) == ("1x32x2", 8, 2)
  with open(tmp_path / "run" / "config.json") as f:
    config = f.read()
  assert '"phases_1x32x2"' in config and '"microbatch_size": 2' in config
  phases = ["data", "init", "evaluation", "checkpoints", "curves", "report", "first step", "steps"]
  for name in ["imports", *phases, "run"]:
    assert seconds[name] >= 0 and f"{name:>15} | {seconds[name]:6.2f} s" in out, name
  # every phase is inside the run, and "steps" (the rest) is what the others leave of it
  assert abs(sum(seconds[name] for name in phases) - seconds["run"]) < 1e-6
  collecting = seconds["garbage collection"]  # the collector's passes, within the phases
  assert 0 < collecting < seconds["run"] and f"garbage collection | {collecting:6.2f} s" in out
  proc = script_runner.run_subprocess(
    "benchmarks/run_phases.py", f"--workdir={tmp_path}", "--steps=0"
  )
  assert proc.returncode != 0 and "--steps must be >= 1, got 0" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = script_runner.run_subprocess(
    "benchmarks/run_phases.py", f"--workdir={tmp_path}", f"--data={sample}", "--shape=4x250x3"
  )
  assert proc.returncode != 0 and "--shape=4x250x3: give LAYERSxWIDTHxHEADS" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_packed_step_times_both_layouts_on_the_same_batches_with_the_same_losses(tmp_path):
  sample = os.path.join(os.path.dirname(__file__), "data", "hh_rlhf_sample.jsonl.gz")
  out = _run(
    "packed_step.py",
    f"--data={sample}",
    "--shape=1x32x2",
    "--batch_size=8",
    "--max_len=64",
    "--batches=3",
    "--rounds=2",
    "--pack_pairs=16",
  )
  assert "3 batches of 8 pairs, tokenizer byte, max_len 64 | two-row lengths [64]" in out
  rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if " | " in line}
  two, packed = rows["two rows"], rows["packed"]
  assert int(two[1].replace(",", "")) == 3 * 2 * 8 * 64  # three batches of 8 pairs in two rows
  packed_slots = int(packed[1].replace(",", ""))
  assert packed_slots % (8 * 16) == 0 and packed_slots < int(two[1].replace(",", ""))
  assert len(two[2].split()) == len(packed[2].split()) == 2 and two[5] == "1.00x"
  gap = float(out.rsplit("largest difference over the batches ", 1)[1].split()[0])
  assert gap < 1e-5
  proc = script_runner.run_subprocess("benchmarks/packed_step.py", "--pack_pairs=0")
  assert proc.returncode != 0 and "--pack_pairs must be >= 1, got 0" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_program_size_reports_the_step_program_and_runs_the_loaded_one():
  out = _run(
    "program_size.py",
    "--layers=1",
    "--width=16",
    "--heads=2",
    "--seq_len=16",
    "--batch_pairs=2",
    "--loads=2",
    "--reps=1",
  )
  header, row = out.strip().splitlines()[-2:]
  values = dict(zip(header.split(" | "), row.split(" | ")))
  assert int(values["instructions"]) > 100
  assert int(values["executable bytes"]) > int(values["instructions"])
  assert float(values["compile s"]) > 0 and float(values["load s"]) > 0
  compiled_loss, loaded_loss = values["loss (compiled / loaded)"].split(" / ")
  assert compiled_loss == loaded_loss and 0 < float(loaded_loss) < 5, values


def test_program_size_names_a_bad_flag_in_one_line():
  for args, message in (
    (["--loads=0"], "--loads must be >= 1, got 0"),
    (["--width=10", "--heads=4"], "heads"),
    (
      ["--microbatch_size=3", "--batch_pairs=4"],
      "--microbatch_size=3: pairs per slice must divide the 4 of --batch_pairs",
    ),
  ):
    proc = script_runner.run_subprocess("benchmarks/program_size.py", *args)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "value, batch_pairs, want",
  [
    (-1, 32, 4),  # the hh config's
    (0, 6, 0),
    (3, 6, 3),
    (8, 6, 8),  # at least the batch: the whole batch
    (-1, 6, "--microbatch_size=-1 (the hh config's 4): pairs per slice must divide the 6 of"),
    (4, 6, "--microbatch_size=4: pairs per slice must divide the 6 of --batch_pairs"),
    (-2, 6, "--microbatch_size must be >= -1 (-1: the hh config's), got -2"),
  ],
)
def test_the_benchmarks_microbatch_flag_is_resolved_or_named(value, batch_pairs, want):
  from absl import app

  from benchmarks import shapes

  flag = types.SimpleNamespace(name="microbatch_size", value=value)
  if isinstance(want, int):
    assert shapes.microbatch_size(flag, batch_pairs) == want
  else:
    with pytest.raises(app.UsageError, match=re.escape(want)):
      shapes.microbatch_size(flag, batch_pairs)
