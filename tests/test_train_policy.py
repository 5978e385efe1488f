"""Tests of the policy loop (jaxrm.train.policy, jaxrm.train.sources) and its script: config,
rewards, prompts, resume, metrics, one-line errors, a nested field set on the command line."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.data import synthetic
from jaxrm.io import rm_io, rundir
from jaxrm.io.checkpoint import CheckpointManager
from jaxrm.models import ensemble
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import train_state
from jaxrm.steps.rl import RLConfig
from jaxrm.train import policy as tp
from jaxrm.train.sources import PromptConfig, RewardConfig
from tests import run_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train_policy.py")
WORLD = {"num_calibration": 256, "policy_layers": 1, "gold_layers": 1, "gold_width": 32}
RM_CFG = TransformerConfig(vocab_size=16, num_layers=1, width=8, num_heads=2, max_len=16)


def _set(config, path, value):
  *parents, name = path.split(".")
  obj = config
  for part in parents:
    obj = getattr(obj, part)
  setattr(obj, name, value)


def base_config(**kw):
  """The tiny synthetic run; ``kw`` by dotted path with ``__`` for ``.``."""
  config = tp.PolicyTrainConfig(
    algo="ppo",
    reward=RewardConfig(source="token_frequency", token_id=3),
    world=synthetic.WorldConfig(**WORLD),
    rl=RLConfig(max_new_tokens=12, eos_id=None, num_epochs=2, num_minibatches=2),
    steps=4,
    batch_size=8,
    parallel="jit",
    log=rundir.LogConfig(log_every=1, checkpoint_every=2, plots=False),
  )
  config.optimizer.learning_rate = 1e-3
  for key, value in kw.items():
    _set(config, key.replace("__", "."), value)
  return config


@functools.cache
def rm_init():
  return jax.jit(RewardModel(RM_CFG).init)


def write_rm_run(workdir, seed, *, tokenizer="synthetic"):
  """A tiny reward-model run directory in the format of the reward-model script."""
  tokens = jnp.zeros((1, RM_CFG.max_len), jnp.int32)
  params = rm_init()(jax.random.key(seed), tokens, jnp.ones(tokens.shape, bool))
  state = train_state.create_train_state(params, optax.adam(1e-3), jax.random.key(seed))
  with CheckpointManager(os.path.join(workdir, "checkpoints")) as ckpt:
    ckpt.save(
      10,
      state,
      {
        "model_config": rm_io.config_to_json(RM_CFG),
        "pooling": "last",
        "tokenizer": tokenizer,
        "data": {},
        "metrics": {},
      },
    )
  return params


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("rms")
  dirs = [str(root / f"rm{i}") for i in range(2)]
  params = [write_rm_run(d, i) for i, d in enumerate(dirs)]
  return dirs, params


def read_rows(workdir, split="train"):
  """The metrics rows of ``split`` (None: all rows; evaluation rows have split='eval')."""
  with open(os.path.join(workdir, rundir.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if split is None or r.get("split", "train") == split]


def restore_params(run, workdir):
  with CheckpointManager(os.path.join(workdir, rundir.CHECKPOINT_DIR)) as ckpt:
    state, extra, step = ckpt.restore_latest(template=tp.initial_state(run))
  state = state._replace(key=jax.random.key_data(state.key))
  return jax.device_get(state), extra, step


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, rm_dirs):
  dirs, _ = rm_dirs
  config = base_config(
    reward=RewardConfig(
      source="rm",
      rm_dirs=tuple(dirs),
      ensemble_objective="uncertainty_weighted",
      uncertainty_coef=0.3,
    ),
    rl__target_kl=0.5,
    rl__kl_horizon=50.0,
  )
  run = tp.build_run(config)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  summary = tp.train(run, straight)
  assert summary["steps"] == 4 and summary["resumed_from"] == 0
  tp.train(run, resumed, steps=3)  # "interrupted" after step 3 (checkpoints at 2 and 3)
  # A crash after step 3 could have left rows beyond the checkpoint; they are dropped.
  with open(os.path.join(resumed, rundir.METRICS_FILE), "a") as f:
    f.write(json.dumps({"step": 4, "score": 123.0}) + "\n")
  summary = tp.train(run, resumed)
  assert summary["resumed_from"] == 3
  a, extra_a, step_a = restore_params(run, straight)
  b, _, step_b = restore_params(run, resumed)
  assert step_a == step_b == 4 and int(a.step) == 4
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, opt state, KL, key: bitwise
  rows_a, rows_b = read_rows(straight), read_rows(resumed)
  assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
  all_a, all_b = read_rows(straight, None), read_rows(resumed, None)
  assert [(r["step"], r.get("split")) for r in all_a if r.get("split")] == [
    (0, "eval"),
    (4, "eval"),
  ]
  assert len(all_a) == len(all_b)
  for ra, rb in zip(all_a, all_b):
    assert {k: v for k, v in ra.items() if k != "time"} == {
      k: v for k, v in rb.items() if k != "time"
    }
  for key in (
    "score",
    "gold",
    "ensemble_std",
    "kl_k1",
    "kl_exact",
    "entropy",
    "response_length",
    "clip_fraction",
    "value_loss",
    "kl_coef",
    "num_skipped",
  ):
    assert key in rows_a[-1], key
  assert extra_a["config"]["reward"]["rm_dirs"] == list(config.reward.rm_dirs)
  # The adaptive KL coefficient moved and was checkpointed (it is part of the state above).
  assert rows_a[-1]["kl_coef"] != config.kl_coef
  assert all(np.isfinite(r["score"]) and r["response_length"] == 12 for r in rows_a)


def test_a_run_saved_before_matmul_dtype_resumes(tmp_path, monkeypatch):
  config = base_config(steps=2, log__checkpoint_every=1, eval_every=0)
  summary = run_helpers.resume_after_the_field_was_added(
    monkeypatch,
    tp.train_and_evaluate,
    config,
    dataclasses.replace(config, matmul_dtype="bfloat16"),
    str(tmp_path),
    field="matmul_dtype",
    value="bfloat16",
    last_step=2,
  )
  assert summary["resumed_from"] == 1


def test_resuming_with_other_settings_names_the_changed_field():
  saved = base_config().to_json()
  allowed = base_config(steps=100, log__log_every=5, parallel="auto").to_json()
  rundir.check_resumable(saved, allowed, changeable=tp.CHANGEABLE_ON_RESUME, workdir="/w")
  with pytest.raises(rundir.ConfigError) as e:
    rundir.check_resumable(
      saved,
      base_config(rl__clip_eps=0.1).to_json(),
      changeable=tp.CHANGEABLE_ON_RESUME,
      workdir="/w",
    )
  assert e.value.flag_message().startswith("--config.rl.clip_eps=0.1: differs")


def test_ensemble_reward_applies_the_objective_to_the_member_rewards(rm_dirs):
  dirs, params = rm_dirs
  run = tp.build_run(
    base_config(
      reward=RewardConfig(source="rm", rm_dirs=tuple(dirs), ensemble_objective="worst_case")
    )
  )
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 16, size=(5, 16)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  got = jax.jit(run.reward_fn)(run.reward_params, tokens, mask)
  apply = jax.jit(RewardModel(RM_CFG).apply)
  want = np.minimum(apply(params[0], tokens, mask), apply(params[1], tokens, mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert ensemble.ensemble_size(run.reward_params) == 2


def test_synthetic_gold_reward_is_the_worlds_gold_and_token_frequency_counts_the_response():
  gold_run = tp.build_run(base_config(reward__source="synthetic_gold"))
  world_cfg = synthetic.WorldConfig(**WORLD)
  world = synthetic.init_world(world_cfg, jax.random.key(0))
  prompts = synthetic.sample_prompts(world_cfg, jax.random.key(1), 6)
  tokens, mask = jax.jit(synthetic.sample_responses, static_argnums=1)(
    world, world_cfg, prompts, jax.random.key(2)
  )
  got = jax.jit(gold_run.reward_fn)(gold_run.reward_params, tokens, mask)
  want = jax.jit(synthetic.gold_reward, static_argnums=1)(world, world_cfg, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  tf_run = tp.build_run(base_config())
  want = (np.asarray(tokens)[:, world_cfg.prompt_len :] == 3).mean(1)
  np.testing.assert_allclose(jax.jit(tf_run.reward_fn)(None, tokens, mask), want, rtol=1e-6)
  # The prompt source depends on the step only (resumable) and has the world's shape.
  batch = tf_run.prompts(7)
  assert batch["prompts"].shape == (8, world_cfg.prompt_len)
  np.testing.assert_array_equal(batch["prompts"], tf_run.prompts(7)["prompts"])
  assert not np.array_equal(batch["prompts"], tf_run.prompts(8)["prompts"])


def test_matmul_dtype_sets_how_the_policy_computes_and_keeps_float32_parameters(tmp_path):
  plain = tp.build_run(base_config(steps=2))
  mixed = tp.build_run(base_config(steps=2, matmul_dtype="bfloat16"))
  assert plain.policy_config.dtype == jnp.float32
  assert mixed.policy_config == dataclasses.replace(plain.policy_config, dtype=jnp.bfloat16)
  tp.train(mixed, str(tmp_path))
  state, _, step = restore_params(mixed, str(tmp_path))
  assert step == 2
  assert {np.asarray(x).dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
  rows = read_rows(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and not r["nonfinite"] for r in rows), rows
  assert rows[-1]["num_skipped"] == 0 and rows[-1]["kl_k1"] != 0.0  # the policy moved


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(matmul_dtype="float16"), "matmul_dtype"),
    (dict(reward__source="token_freq"), "reward.source"),
    (dict(reward__source="rm", reward__rm_dirs=("/no/such/run",)), "reward.rm_dirs"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=12, parallel="shard_map"), "batch_size"),
    (dict(rl__num_minibatches=3), "rl.num_minibatches"),
    (dict(rl__target_kl=-1.0), "rl"),
    (dict(policy="huge"), "policy"),
    (dict(rl__max_new_tokens=13), "rl.max_new_tokens"),
  ],
)
def test_bad_settings_raise_a_config_error_naming_the_field(overrides, field):
  with pytest.raises(rundir.ConfigError) as e:
    tp.validate_config(base_config(**overrides), num_devices=8)
  assert e.value.field == field
  assert e.value.flag_message().startswith(f"--config.{field}=")


def test_rewards_that_do_not_fit_the_policy_raise_naming_the_field(tmp_path):
  with pytest.raises(rundir.ConfigError, match="outside the policy's vocabulary"):
    tp.build_run(base_config(reward__token_id=16))
  write_rm_run(str(tmp_path / "byte_rm"), 0, tokenizer="byte")
  with pytest.raises(rundir.ConfigError, match="'byte' tokenizer, the policy 'synthetic'"):
    tp.build_run(
      base_config(reward=RewardConfig(source="rm", rm_dirs=(str(tmp_path / "byte_rm"),)))
    )
  with pytest.raises(rundir.ConfigError, match="synthetic_gold needs the synthetic policy"):
    tp.build_run(
      base_config(
        reward__source="synthetic_gold",
        policy="tiny",
        prompts=PromptConfig(source="bos"),
        rl=RLConfig(max_new_tokens=4, num_minibatches=2),
      )
    )


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--config.algo=dpo"], "--config.algo=dpo: must be one of"),
    (["--config.reward.tokn_id=3"], "no field 'tokn_id' in reward (RewardConfig)"),
    (["--config.rl.kl_coef=0.1"], "no field 'kl_coef' in rl (RLConfig)"),
  ],
)
def test_script_reports_a_bad_setting_in_one_line(tmp_path, args, expected):
  proc = subprocess.run(
    [sys.executable, SCRIPT, f"--workdir={tmp_path}"] + args,
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_script_sets_a_nested_field_from_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  world = [f"--config.world.{k}={v}" for k, v in WORLD.items()]
  proc = subprocess.run(
    [
      sys.executable,
      SCRIPT,
      f"--workdir={workdir}",
      *world,
      "--config.steps=1",
      "--config.batch_size=4",
      "--config.rl.num_minibatches=2",
      "--config.rl.num_epochs=1",
      "--config.rl.clip_eps=0.3",
      "--config.parallel=jit",
      "--config.log.plots=False",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / rundir.CONFIG_FILE) as f:
    config = json.load(f)["config"]
  assert config["rl"]["clip_eps"] == 0.3 and config["world"]["gold_width"] == 32
  assert [r["step"] for r in read_rows(workdir)] == [1]


def test_prompt_files_give_left_padded_bos_prompts_in_a_new_order_each_pass(tmp_path):
  path = tmp_path / "prefs.jsonl"
  texts = ["Hi", "What is 2+2?", "A much longer prompt that gets truncated on the left"]
  path.write_text(
    "".join(json.dumps({"prompt": t, "chosen": " yes", "rejected": " no"}) + "\n" for t in texts)
  )
  byte = dict(policy="tiny", rl=RLConfig(max_new_tokens=4, num_minibatches=1))
  run = tp.build_run(
    base_config(
      prompts=PromptConfig(source="jsonl", files=(str(path),), prompt_len=8),
      batch_size=2,
      reward__token_id=104,
      **byte,
    )
  )
  assert run.tokenizer == "byte"
  batches = [run.prompts(step) for step in range(3)]  # 6 prompts: two passes over 3
  seen = [tuple(row) for b in batches for row in b["prompts"]]
  assert len(set(seen[:3])) == 3 and set(seen[:3]) == set(seen[3:])
  for b in batches:
    first = np.argmax(b["prompt_mask"], axis=1)
    np.testing.assert_array_equal(b["prompts"][np.arange(2), first], [1, 1])  # BOS first
    assert np.all(b["prompt_mask"][:, -1])  # left padding
  hi = [row for row in seen if list(row[-2:]) == [ord("H") + 3, ord("i") + 3]]
  assert hi and list(hi[0][:5]) == [0, 0, 0, 0, 0]
  path.write_text(json.dumps({"prompt": "x", "chosen": 1}) + "\n")
  with pytest.raises(rundir.ConfigError, match="prefs.jsonl:1"):
    tp.build_run(
      base_config(prompts=PromptConfig(source="jsonl", files=(str(path),), prompt_len=8), **byte)
    )
