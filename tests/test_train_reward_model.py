"""Tests of the reward-model training loop (jaxrm.train.reward_model) and its scripts.

* smoke runs of the library loop on synthetic data under ``shard_map`` and ``pmap`` (8 forced
  host devices), and on the HH-RLHF sample through the TFDS builder;
* the training script killed with SIGKILL at random moments and restarted ends with
  parameters bitwise identical to an uninterrupted run (subprocesses, one CPU device);
* a damaged latest checkpoint makes the resumed run fall back to the previous one (the
  checkpoint manager's own cases are in tests/test_checkpoint.py, e.g.
  ``test_damaged_latest_checkpoint_falls_back_to_previous_with_warning``);
* bad settings, mistyped config fields and bad values stop the script with one line naming
  them; a nested field set on the command line reaches the run's config; ``rm_report.py``
  writes the report of an earlier checkpoint.
"""

import dataclasses
import functools
import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from flax import traverse_util
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxrm.data import pairs, preferences, synthetic
from jaxrm.io import program_cache, rm_io, rundir
from jaxrm.models import presets
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import train_state as train_state_lib
from jaxrm.train import reward_model as rm_train
from jaxrm.train import rm_config, rm_eval
from tests import run_helpers, script_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "experiments", "train_reward_model.py")
REPORT_SCRIPT = os.path.join(ROOT, "experiments", "rm_report.py")
SAMPLE = os.path.join(ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")
TINY_WORLD = {
  "policy_layers": 1,
  "policy_width": 16,
  "gold_layers": 1,
  "gold_width": 32,
  "num_calibration": 256,
}
WORLD_FLAGS = [f"--config.data.synthetic.world.{k}={v}" for k, v in TINY_WORLD.items()]


def _set(config, path, value):
  *parents, name = path.split(".")
  obj = config
  for part in parents:
    obj = getattr(obj, part)
  setattr(obj, name, value)


def _config(**overrides):
  """The tiny synthetic run; ``overrides`` by dotted path with ``__`` for ``.``."""
  config = rm_train.TrainConfig(
    data=pairs.DataConfig(
      test_fraction=0.25,
      synthetic=pairs.SyntheticConfig(world=synthetic.WorldConfig(**TINY_WORLD), pairs=256),
    ),
    batch_size=16,
    steps=8,
    optimizer=rm_train.OptimizerConfig(learning_rate=1e-3, warmup_steps=2),
    eval=rm_train.EvalConfig(every=4),
    log=rundir.LogConfig(log_every=2, checkpoint_every=4),
  )
  for key, value in overrides.items():
    _set(config, key.replace("__", "."), value)
  return config


def _rows(workdir):
  return rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))


def _leaves(state):
  return [
    np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    for x in jax.tree.leaves(state)
  ]


def _assert_bitwise_equal(state_a, state_b):
  a, b = _leaves(state_a), _leaves(state_b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def synthetic_npz(tmp_path_factory):
  """The tiny world's comparisons, made once and copied into each run's data directory."""
  workdir = tmp_path_factory.mktemp("synthetic_cache")
  pairs.synthetic_comparisons(_config().data.synthetic, workdir)
  return workdir / rundir.DATA_DIR / pairs.SYNTHETIC_FILE


def _seeded_workdir(path, synthetic_npz):
  os.makedirs(path / rundir.DATA_DIR)
  shutil.copy(synthetic_npz, path / rundir.DATA_DIR)
  return path


# ----------------------------------------------------------------------------- library loop


@pytest.fixture(scope="module")
def shard_map_run(tmp_path_factory, synthetic_npz):
  """The run, and how many pairs each ``score_pairs`` call of the run scored."""
  workdir = _seeded_workdir(tmp_path_factory.mktemp("shard_map_run"), synthetic_npz)
  scored = []

  def counting_score_pairs(*args, **kwargs):
    out = score_pairs(*args, **kwargs)
    scored.append(len(out[0]["rewards_chosen"]))
    return out

  score_pairs = rm_eval.score_pairs
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(rm_eval, "score_pairs", counting_score_pairs)
    summary = rm_train.train_and_evaluate(_config(parallel="shard_map"), workdir)
  return workdir, summary | {"scored": scored}


def test_shard_map_run_writes_metrics_checkpoints_and_report(shard_map_run, synthetic_npz):
  workdir, summary = shard_map_run
  assert summary["step"] == 8 and summary["resumed_from"] is None
  rows = _rows(workdir)
  assert [(r["split"], r["step"]) for r in rows] == [
    ("train", 2),
    ("train", 4),
    ("eval", 4),
    ("train", 6),
    ("train", 8),
    ("eval", 8),
  ]
  for row in rows[:2]:
    assert {"loss", "accuracy", "pairs_per_sec", "eta_sec", "learning_rate"} <= set(row)
  assert {"accuracy", "log_loss", "ece", "brier"} <= set(rows[-1])
  assert sorted(os.listdir(workdir / rundir.CHECKPOINT_DIR)) == ["4", "8"]
  # The cached comparisons were reused, not made again.
  assert (workdir / "data" / pairs.SYNTHETIC_FILE).read_bytes() == synthetic_npz.read_bytes()

  with open(workdir / "rm_report.json") as f:
    rep = json.load(f)
  model_config = presets.preset("tiny", vocab_size=16, max_len=16)
  assert rep["model"]["num_params"] == presets.param_count(model_config)
  assert rep["run"]["step"] == 8 and rep["run"]["evaluated_on"] == "test"
  assert rep["data"]["train_pairs"] == 192 and rep["heldout"]["num_pairs"] == 64
  assert rep["heldout"]["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1 / 64)
  assert rep["gold"]["pairwise_accuracy"] is not None
  assert rep["length"]["constant_length"] and rep["subsets"] is None
  for name in ("rm_report.md", "reliability.png", "reward_histogram.png", "curves_train.png"):
    assert (workdir / name).stat().st_size > 0
  assert (workdir / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_through_stored_programs_train_the_same_model(shard_map_run, tmp_path, synthetic_npz):
  """With the scripts' program cache (jaxrm.io.program_cache): the first run stores its step,
  evaluation and initial-state programs, the second runs them without tracing, and both train
  bit for bit the model of the plain-jit run."""
  program_cache.enable(str(tmp_path / "programs"))
  try:
    for i in range(2):
      rm_config._jitted_init.cache_clear()  # a fresh process's
      workdir = _seeded_workdir(tmp_path / f"run{i}", synthetic_npz)
      with pytest.MonkeyPatch.context() as patch:
        if i:  # nothing of the model is traced: it runs the stored programs
          patch.setattr(RewardModel, "__call__", lambda *a, **k: pytest.fail("traced"))
        rm_train.train_and_evaluate(_config(parallel="shard_map"), workdir)
      stored = sorted(name.split("-")[0] for name in os.listdir(tmp_path / "programs"))
      assert stored == ["rm_eval", "rm_init", "rm_step"]
      ref, got = rm_eval.restore_run(shard_map_run[0]), rm_eval.restore_run(workdir)
      _assert_bitwise_equal(ref.state, got.state)
      untimed = lambda rows: [  # noqa: E731
        {k: v for k, v in r.items() if k not in ("pairs_per_sec", "eta_sec")} for r in rows
      ]
      assert untimed(_rows(workdir)) == untimed(_rows(shard_map_run[0]))
  finally:
    program_cache.enable(None)
    rm_config._jitted_init.cache_clear()


def _same_model(reference, other_dir, other):
  """Asserts that the run in ``other_dir`` (summary ``other``) logged the ``reference`` run's
  losses and held-out metrics; returns both runs' final parameters by path."""
  workdir, summary = reference
  for row, want in zip(_rows(other_dir), _rows(workdir), strict=True):
    for key in ("loss", "accuracy", "log_loss"):
      if key in want:
        np.testing.assert_allclose(row[key], want[key], rtol=1e-4, err_msg=f"{key} {row}")
  assert other["eval"]["accuracy"] == summary["eval"]["accuracy"]
  a = traverse_util.flatten_dict(rm_eval.restore_run(workdir).state.params, sep="/")
  b = traverse_util.flatten_dict(rm_eval.restore_run(other_dir).state.params, sep="/")
  assert a.keys() == b.keys()
  return a, b


def _assert_close_but_the_bias(a, b):
  """The parameters within float rounding after 8 Adam steps, but the head's bias: it adds to
  both rewards of a pair, so the Bradley-Terry loss's gradient with respect to it is zero in
  exact arithmetic, and Adam turns rounding noise there into steps of up to the learning rate."""
  for name, x in a.items():
    if name != "params/head/bias":
      np.testing.assert_allclose(b[name], x, rtol=0, atol=1e-4, err_msg=name)


def test_a_packed_pairs_run_trains_the_two_row_model(shard_map_run, tmp_path, synthetic_npz):
  """``model.pack_pairs`` (jaxrm.data.packing) changes how the step lays out the pairs, not
  what it computes: the same logged losses and held-out metrics, and parameters within float
  rounding after 8 Adam steps, under shard_map on 8 devices."""
  packed_dir = _seeded_workdir(tmp_path / "packed", synthetic_npz)
  packed = rm_train.train_and_evaluate(
    _config(parallel="shard_map", model__pack_pairs=8), packed_dir
  )
  with open(packed_dir / rundir.CONFIG_FILE) as f:
    assert json.load(f)["config"]["model"]["pack_pairs"] == 8
  a, b = _same_model(shard_map_run, packed_dir, packed)
  _assert_close_but_the_bias(a, b)
  # Two rows' rounding noise moved the bias by 1.3e-4 after these 8 steps; in the packed step
  # a pair's two rewards share the head's output array, and their cotangents cancelled (0 here).
  assert np.abs(b["params/head/bias"]).max() <= 1e-4


def test_a_microbatched_run_trains_the_whole_batch_model(
  shard_map_run, tmp_path, synthetic_npz, monkeypatch
):
  """``microbatch_size`` changes how the step runs, not what it computes: the same logged
  losses and held-out metrics, and parameters within float rounding after 8 Adam steps, with
  each device's 2 pairs one at a time under shard_map on 8 devices."""
  sliced_dir = _seeded_workdir(tmp_path / "sliced", synthetic_npz)
  sizes = run_helpers.slice_sizes(monkeypatch)
  sliced = rm_train.train_and_evaluate(_config(parallel="shard_map", microbatch_size=1), sliced_dir)
  assert sizes and set(sizes) == {1}  # the step was traced in slices of one pair
  _assert_close_but_the_bias(*_same_model(shard_map_run, sliced_dir, sliced))


def test_microbatch_size_may_change_on_resume(tmp_path):
  saved = rm_train.TrainConfig().to_json()
  del saved["microbatch_size"]  # a run saved before the field
  rundir.check_resumable(
    saved,
    rm_train.TrainConfig(microbatch_size=4).to_json(),
    changeable=rm_config.CHANGEABLE_ON_RESUME,
    added=rm_config.ADDED_ON_RESUME,
    workdir=tmp_path,
  )


def test_a_run_saved_before_pack_pairs_resumes_only_unpacked(tmp_path):
  saved = rm_train.TrainConfig().to_json()
  del saved["model"]["pack_pairs"]
  check = functools.partial(
    rundir.check_resumable,
    saved,
    changeable=rm_config.CHANGEABLE_ON_RESUME,
    added=rm_config.ADDED_ON_RESUME,
    workdir=tmp_path,
  )
  check(rm_train.TrainConfig().to_json())
  packed = rm_train.TrainConfig(model=rm_train.ModelConfig(pack_pairs=32))
  with pytest.raises(rundir.ConfigError, match="model.pack_pairs"):
    check(packed.to_json())


def test_pack_pairs_needs_last_pooling():
  config = rm_train.TrainConfig(model=rm_train.ModelConfig(pooling="mean", pack_pairs=32))
  with pytest.raises(rm_train.ConfigError, match="needs model.pooling='last', got 'mean'") as e:
    rm_train.validate_config(config, num_devices=1)
  assert e.value.field == "model.pack_pairs"
  rm_train.validate_config(
    dataclasses.replace(config, model=rm_train.ModelConfig(pack_pairs=32)), num_devices=1
  )


def test_report_reuses_the_last_evaluation_and_matches_a_fresh_one(shard_map_run):
  workdir, summary = shard_map_run
  # The test split (64 pairs) is scored by the evaluations at steps 4 and 8 only: the report
  # of step 8 takes the second's scores instead of scoring the split again.
  assert summary["scored"] == [64, 64]
  with open(workdir / "rm_report.json") as f:
    rep = json.load(f)
  last_eval = _rows(workdir)[-1]
  for key in ("accuracy", "log_loss", "ece", "brier"):
    assert rep["heldout"][key] == last_eval[key], key
  fresh_paths = rm_eval.write_run_report(workdir, step=8)  # restores step 8 and scores afresh
  with open(fresh_paths["json"]) as f:
    fresh = json.load(f)
  for key in ("accuracy", "log_loss", "ece", "brier", "margin_mean"):
    assert rep["heldout"][key] == pytest.approx(fresh["heldout"][key], rel=1e-6, abs=1e-7), key
  assert rep["gold"] == pytest.approx(fresh["gold"], rel=1e-6, abs=1e-7)


def test_checkpoint_extra_follows_the_reward_model_format(shard_map_run):
  workdir, _ = shard_map_run
  extra = rundir.read_checkpoint_extra(workdir, 8)
  assert rm_io.config_from_json(extra["model_config"]) == presets.preset(
    "tiny", vocab_size=16, max_len=16
  )
  assert extra["pooling"] == "last" and extra["tokenizer"] == "synthetic"
  assert extra["data"]["epoch"] == 0 and extra["data"]["batch_in_epoch"] == 8
  assert extra["metrics"]["eval_accuracy"] == _rows(workdir)[-1]["accuracy"]
  assert rm_train.TrainConfig.from_json(extra["config"]) == _config(parallel="shard_map")
  apply_fn, params, _ = rm_io.load_reward_model(str(workdir))
  run = rm_eval.restore_run(workdir)
  _assert_bitwise_equal(params, run.state.params)
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 16
  mask = np.ones((2, 16), bool)
  np.testing.assert_array_equal(
    apply_fn(params, tokens, mask),
    RewardModel(run.model_config).apply(run.state.params, tokens, mask),
  )


def test_pmap_run_trains_the_same_model_as_shard_map(shard_map_run, tmp_path, synthetic_npz):
  workdir = _seeded_workdir(tmp_path / "pmap", synthetic_npz)
  summary = rm_train.train_and_evaluate(
    _config(parallel="pmap", eval__every=8, log__checkpoint_every=8, eval__report=False), workdir
  )
  assert summary["eval"]["num_pairs"] == 64
  reference = rm_eval.restore_run(shard_map_run[0])
  got = rm_eval.restore_run(workdir)
  # The final norm's bias and the head's bias move every reward by one constant, which the
  # pairwise loss cannot see: their gradients are rounding residues of cancelling terms, and
  # Adam turns those into steps of up to ~lr, so their trained values are rounding noise of
  # the program (BUILD_NOTES.md, "Test suite"). Every other parameter must agree, and so must
  # the rewards up to a constant.
  flat_got, flat_ref = (traverse_util.flatten_dict(r.state.params) for r in (got, reference))
  assert _REWARD_SHIFT <= flat_got.keys()
  for name in flat_got.keys() - _REWARD_SHIFT:
    np.testing.assert_allclose(flat_got[name], flat_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
  model = RewardModel(got.model_config, pooling=got.extra["pooling"])
  tokens = jax.random.randint(jax.random.key(3), (32, 12), 0, got.model_config.vocab_size)
  mask = np.arange(12) < np.arange(32)[:, None] % 12 + 1
  rewards = [np.asarray(model.apply(r.state.params, tokens, mask)) for r in (got, reference)]
  np.testing.assert_allclose(
    rewards[0] - rewards[0].mean(), rewards[1] - rewards[1].mean(), atol=1e-5
  )
  shifted = traverse_util.unflatten_dict(
    {k: v + 1.0 if k in _REWARD_SHIFT else v for k, v in flat_got.items()}
  )
  moved = np.asarray(model.apply(shifted, tokens, mask)) - rewards[0]
  np.testing.assert_allclose(moved, moved[0], atol=1e-5)  # the same shift for every sequence
  assert abs(moved[0]) > 0.1
  assert [r["step"] for r in _rows(workdir)] == [2, 4, 6, 8, 8]


_REWARD_SHIFT = {("params", "head", "bias"), ("params", "backbone", "ln_final", "bias")}


def test_report_of_an_earlier_checkpoint_goes_to_its_own_directory(shard_map_run):
  workdir, _ = shard_map_run
  paths = rm_eval.write_run_report(workdir, step=4)
  assert paths["json"] == str(workdir / "reports" / "step_4" / "rm_report.json")
  with open(paths["json"]) as f:
    rep = json.load(f)
  eval_4 = [r for r in _rows(workdir) if r["split"] == "eval" and r["step"] == 4][0]
  assert rep["run"]["step"] == 4
  assert rep["heldout"]["log_loss"] == pytest.approx(eval_4["log_loss"], rel=1e-4)
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 5"):
    rm_eval.write_run_report(workdir, step=5)


def test_resume_refuses_changed_settings_and_a_finished_run_only_reports(shard_map_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(shard_map_run[0], workdir)
  before = _rows(workdir)
  with pytest.raises(rm_train.ConfigError, match="learning_rate") as e:
    rm_train.train_and_evaluate(
      _config(parallel="shard_map", optimizer__learning_rate=2e-3), workdir
    )
  assert e.value.flag_message().startswith("--config.optimizer.learning_rate=0.002: differs")
  # A changed execution mode is allowed; the finished run is not trained again.
  summary = rm_train.train_and_evaluate(_config(parallel="jit", eval__report=False), workdir)
  assert summary["resumed_from"] == 8 and summary["step"] == 8
  assert _rows(workdir) == before


def test_a_run_saved_before_matmul_dtype_resumes(tmp_path, synthetic_npz, monkeypatch):
  workdir = _seeded_workdir(tmp_path / "old", synthetic_npz)
  config = _config(parallel="jit", steps=4, eval__report=False, log__checkpoint_every=2)
  summary = run_helpers.resume_after_the_field_was_added(
    monkeypatch,
    rm_train.train_and_evaluate,
    config,
    dataclasses.replace(config, model=rm_train.ModelConfig(matmul_dtype="bfloat16")),
    workdir,
    field="model.matmul_dtype",
    value="bfloat16",
    last_step=4,
  )
  assert summary["resumed_from"] == 2 and summary["step"] == 4


def test_hh_sample_trains_through_tfds_and_reports_without_the_source_files(tmp_path):
  with gzip.open(SAMPLE, "rt") as f:
    lines = f.readlines()
  files = [tmp_path / "helpful-base.jsonl", tmp_path / "harmless-base.jsonl"]
  files[0].write_text("".join(lines[:32]))
  files[1].write_text("".join(lines[32:]))
  workdir = tmp_path / "run"
  config = rm_train.TrainConfig(
    data=pairs.DataConfig(files=tuple(map(str, files)), test_fraction=0.25, max_len=128),
    model=rm_train.ModelConfig(matmul_dtype="bfloat16"),  # mixed precision, as TRL's default
    batch_size=8,
    steps=6,
    optimizer=rm_train.OptimizerConfig(warmup_steps=2, learning_rate=1e-3),
    eval=rm_train.EvalConfig(every=3),
    log=rundir.LogConfig(log_every=3, checkpoint_every=3),
    parallel="jit",
  )
  summary = rm_train.train_and_evaluate(config, workdir)
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
  builder = tfds.builder_from_directory(pairs.dataset_dir(workdir))
  stats = builder.info.metadata["splits"]
  with open(workdir / "rm_report.json") as f:
    rep = json.load(f)
  splits = rep["data"]["splits"]
  assert splits["train"]["pairs"] + splits["test"]["pairs"] == 64
  for split in ("train", "test"):
    assert splits[split]["truncated_pairs"] == stats[split]["truncated_pairs"]
    assert splits[split]["skipped"] == 0
    assert splits[split]["sequence_length"]["max"] <= 128
  assert splits["train"]["truncated_pairs"] > 0  # HH dialogues exceed 128 bytes
  assert rep["model"]["config"]["vocab_size"] == 259 and rep["model"]["tokenizer"] == "byte"
  assert (rep["model"]["config"]["dtype"], rep["model"]["config"]["param_dtype"]) == (
    "bfloat16",
    "float32",
  )
  _, params, _ = rm_io.load_reward_model(workdir)
  assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert not rep["length"]["constant_length"] and rep["length"]["pearson"] is not None
  test_subsets = {
    e.subset
    for e in preferences.get_examples(
      builder.as_data_source(split="test"), range(splits["test"]["pairs"])
    )
  }
  assert sorted(s["name"] for s in rep["subsets"] or []) == (
    sorted(test_subsets) if len(test_subsets) > 1 else []
  )
  # The report of a checkpoint reads the prepared dataset; the JSONL files are not needed.
  for path in files:
    path.unlink()
  paths = rm_eval.write_run_report(workdir, step=3)
  with open(paths["json"]) as f:
    assert json.load(f)["run"]["step"] == 3


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("batch_size", 0, "must be an int >= 1"),
    ("data.test_fraction", 1.0, "must be in \\[0, 1\\)"),
    ("data.files", ("/nonexistent/pairs.jsonl",), "file not found: /nonexistent/pairs.jsonl"),
    ("data.test_files", (SAMPLE,), "must be empty for the synthetic world"),
    ("model.preset", "huge", "must be one of"),
    ("model.matmul_dtype", "float16", "must be '' \\(model.dtype\\) or one of"),
    ("model.pack_pairs", -1, "must be an int >= 0"),
    ("model.pack_pairs", True, "must be an int >= 0"),
    ("microbatch_size", -1, "must be an int >= 0"),
    ("microbatch_size", 5, "must divide the 32 pairs of each device's batch"),
    ("loss.label_smoothing", 1.5, "must be in \\[0, 1\\]"),
    ("data.synthetic.world.vocab_size", 0, "vocab_size must be >= 1"),
    ("log.keep_checkpoints", 0, "must be an int >= 1"),
  ],
)
def test_validate_config_names_the_bad_setting(field, value, message):
  config = rm_train.TrainConfig()
  _set(config, field, value)
  with pytest.raises(rm_train.ConfigError, match=message) as e:
    rm_train.validate_config(config, num_devices=1)
  assert field.startswith(e.value.field)  # the world is named as a whole
  assert e.value.flag_message().startswith(f"--config.{e.value.field}=")


def test_config_round_trips_through_json():
  config = _config(data__files=("a.jsonl",), loss__margin=0.5)
  again = rm_train.TrainConfig.from_json(json.loads(json.dumps(config.to_json())))
  assert again == config and isinstance(again.data.synthetic.world, synthetic.WorldConfig)
  assert dataclasses.replace(again.data.synthetic.world) == config.data.synthetic.world


def test_batch_size_must_divide_among_the_devices_of_the_mode():
  rm_train.validate_config(rm_train.TrainConfig(batch_size=12, parallel="jit"), num_devices=8)
  with pytest.raises(rm_train.ConfigError, match="divisible by the 8 devices"):
    rm_train.validate_config(rm_train.TrainConfig(batch_size=12, parallel="auto"), num_devices=8)


def test_microbatch_size_must_divide_each_devices_batch_or_cover_it():
  def check(size, mode):
    config = rm_train.TrainConfig(batch_size=32, parallel=mode, microbatch_size=size)
    rm_train.validate_config(config, num_devices=8)

  for size in (1, 2, 4, 8, 100):  # 4 pairs on each device; 4 and more: the whole batch
    check(size, "shard_map")
  check(16, "jit")
  with pytest.raises(rm_train.ConfigError, match="divide the 32 pairs of each device's batch"):
    check(12, "jit")
  with pytest.raises(rm_train.ConfigError, match="divide the 4 pairs .*parallel mode pmap"):
    check(3, "pmap")


def test_init_state_and_schedule_equal_their_earlier_definitions():
  # init_state is one jitted program and the schedule a jitted function (session 36's startup
  # levers); the state must be the earlier definition's bit for bit (the model's jitted
  # initialiser: its initialisers round differently op by op; the optimizer state op by op),
  # the schedule the float64 formula's.
  config = _config(seed=7)
  model = RewardModel(rm_train.preset_backbone(config, vocab_size=16, max_len=12))
  optimizer, schedule = rm_train.make_optimizer(config)
  state = rm_train.init_state(config, model, optimizer, 12)
  root = jax.random.key(7)
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  params = jax.jit(model.init)(jax.random.fold_in(root, 0), tokens, tokens == 0)
  with jax.disable_jit():
    expected = train_state_lib.create_train_state(params, optimizer, jax.random.fold_in(root, 1))
  _assert_bitwise_equal(state, expected)
  steps = np.arange(10.0)  # warm-up over 2 steps to 1e-3, cosine to 1e-4 at step 8, flat after
  cosine = 0.5 * (1 + np.cos(np.pi * np.clip(steps - 2, 0, 6) / 6))
  expected_rates = np.where(steps < 2, 1e-3 * steps / 2, 1e-4 + (1e-3 - 1e-4) * cosine)
  np.testing.assert_allclose([float(schedule(s)) for s in range(10)], expected_rates, rtol=1e-6)
  # equal settings share the objects (and so the compiled initialiser); other settings do not
  again, again_schedule = rm_train.make_optimizer(_config(seed=3))
  assert again is optimizer and again_schedule is schedule
  assert rm_train.make_optimizer(_config(steps=9))[0] is not optimizer


def _env(cache_dir=None):
  env = script_runner.one_device_env()  # one CPU device, as a user's run
  if cache_dir is not None:  # persistent compilation cache shared by the runs of a test
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def test_bad_flags_stop_the_script_with_one_line_naming_the_flag(tmp_path):
  # More cases of the same checks run in-process in test_validate_config_names_the_bad_setting.
  cases = [
    (["--config.batch_size=0"], "--config.batch_size=0: must be an int >= 1"),
    (["--config.model.preset=huge"], "--config.model.preset=huge"),
    (
      [f"--config.data.files={tmp_path}/missing.jsonl"],
      f"--config.data.files={tmp_path}/missing.jsonl: file not found",
    ),
    # A mistyped nested field and a malformed value: one line, not a traceback.
    (["--config.optimizer.learnign_rate=1"], "no field 'learnign_rate' in optimizer"),
    (["--config.steps=many"], "--config.steps=many"),
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, TRAIN_SCRIPT, f"--workdir={tmp_path}/w", *args],
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for args, _ in cases
  ]
  missing_workdir = subprocess.run(
    [sys.executable, REPORT_SCRIPT], env=_env(), capture_output=True, text=True
  )
  for (args, flag), proc in zip(cases, procs):
    _, err = proc.communicate()
    assert proc.returncode == 2, (args, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "error" in lines[0], (args, err)
  assert missing_workdir.returncode == 2
  assert missing_workdir.stderr.strip().count("\n") == 0
  assert "--workdir" in missing_workdir.stderr
  assert not os.path.exists(tmp_path / "w" / rundir.CHECKPOINT_DIR)


def test_help_lists_every_config_field_and_helpful_is_accepted():
  proc = subprocess.run(
    [sys.executable, TRAIN_SCRIPT, "--help"],
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  assert "--config.optimizer.learning_rate=0.001" in proc.stdout
  assert "--config.data.synthetic.world.gold_width=64" in proc.stdout
  proc = subprocess.run(
    [sys.executable, TRAIN_SCRIPT, "--helpful"],
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert proc.returncode in (0, 1) and "--workdir" in proc.stdout + proc.stderr
  assert "Unknown command line flag" not in proc.stderr


# ----------------------------------------------------------------------------- SIGKILL


def _train_command(workdir):
  return [
    sys.executable,
    TRAIN_SCRIPT,
    f"--workdir={workdir}",
    "--config.data.synthetic.pairs=256",
    *WORLD_FLAGS,
    "--config.data.test_fraction=0.25",
    "--config.model.preset=tiny",
    "--config.batch_size=16",
    "--config.steps=40",
    "--config.optimizer.learning_rate=1e-3",
    "--config.optimizer.warmup_steps=5",
    "--config.eval.every=10",
    "--config.log.log_every=5",
    "--config.log.checkpoint_every=5",
    "--config.log.keep_checkpoints=2",
    "--config.parallel=jit",
    "--config.eval.report=False",
  ]


def _saved_steps(workdir):
  directory = workdir / rundir.CHECKPOINT_DIR
  if not directory.is_dir():
    return set()
  return {int(p.name) for p in directory.iterdir() if p.name.isdigit()}


@pytest.fixture(scope="module")
def killed_and_reference_runs(tmp_path_factory, synthetic_npz):
  """An uninterrupted run and a run SIGKILLed three times at random moments, then finished."""
  base = tmp_path_factory.mktemp("sigkill")
  env = _env(cache_dir=base / "jax_cache")
  reference = _seeded_workdir(base / "reference", synthetic_npz)
  proc = subprocess.run(_train_command(reference), env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]

  killed = _seeded_workdir(base / "killed", synthetic_npz)
  rng = np.random.default_rng(0)
  kills = []
  for _ in range(3):
    before = _saved_steps(killed)
    proc = subprocess.Popen(
      _train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill at a random moment after this process has written its first checkpoint (or ended:
    # no wall-clock limit, which a loaded machine's compile could exceed).
    while not (_saved_steps(killed) - before) and proc.poll() is None:
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.4))
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append((alive, sorted(_saved_steps(killed))))
  assert sum(alive for alive, _ in kills) >= 2, kills  # most kills hit a running process
  proc = subprocess.run(_train_command(killed), env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return reference, killed, env, kills, proc.stderr


def test_run_killed_with_sigkill_resumes_to_bitwise_identical_state(killed_and_reference_runs):
  reference, killed, _, _, stderr = killed_and_reference_runs
  assert "Resuming from the checkpoint at step" in stderr
  ref, got = rm_eval.restore_run(reference), rm_eval.restore_run(killed)
  # The nested fields set on the command line reached the run's config.
  assert got.config == ref.config
  assert got.config.data.synthetic.world == synthetic.WorldConfig(**TINY_WORLD)
  assert got.config.log.keep_checkpoints == 2 and got.config.eval.report is False
  with open(reference / rundir.CONFIG_FILE) as f:
    assert json.load(f)["config"]["data"]["synthetic"]["world"]["gold_width"] == 32
  assert ref.step == got.step == 40
  _assert_bitwise_equal(got.state, ref.state)  # params, Adam moments, step, key
  assert got.extra["data"] == ref.extra["data"]


def test_resumed_run_metrics_hold_each_step_once_with_the_uninterrupted_values(
  killed_and_reference_runs,
):
  reference, killed, _, _, _ = killed_and_reference_runs
  ref_rows, got_rows = _rows(reference), _rows(killed)
  assert [(r["split"], r["step"]) for r in got_rows] == [(r["split"], r["step"]) for r in ref_rows]
  timing = {"pairs_per_sec", "eta_sec"}
  for a, b in zip(got_rows, ref_rows):
    assert {k: v for k, v in a.items() if k not in timing} == {
      k: v for k, v in b.items() if k not in timing
    }


def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(
  killed_and_reference_runs, tmp_path
):
  reference, killed, env, _, _ = killed_and_reference_runs
  workdir = tmp_path / "damaged"
  shutil.copytree(killed, workdir)
  data_files = [
    p
    for p in (workdir / rundir.CHECKPOINT_DIR / "40" / "state").rglob("*")
    if p.is_file() and p.parent.name == "d"
  ]
  assert data_files
  for path in data_files:
    path.unlink()
  proc = subprocess.run(_train_command(workdir), env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Could not restore the checkpoint at step 40" in proc.stderr
  assert "Resuming from the checkpoint at step 35" in proc.stderr
  assert (workdir / rundir.CHECKPOINT_DIR / "40.corrupt").is_dir()
  _assert_bitwise_equal(rm_eval.restore_run(workdir).state, rm_eval.restore_run(reference).state)


def test_rm_report_script_writes_the_report_of_an_earlier_checkpoint(killed_and_reference_runs):
  reference, _, env, _, _ = killed_and_reference_runs
  assert 35 in _saved_steps(reference)
  proc = subprocess.run(
    [sys.executable, REPORT_SCRIPT, f"--workdir={reference}", "--step=35"],
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out_dir = reference / "reports" / "step_35"
  with open(out_dir / "rm_report.json") as f:
    rep = json.load(f)
  assert rep["run"]["step"] == 35 and rep["gold"] is not None
  assert str(out_dir / "rm_report.md") in proc.stdout
  assert pathlib.Path(out_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"
