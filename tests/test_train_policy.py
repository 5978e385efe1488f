"""Tests for experiments/train_policy.py: config, rewards, resume, metrics, flag errors."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import train_policy as tp
from jaxrm.data import synthetic
from jaxrm.io import rm_io
from jaxrm.io.checkpoint import CheckpointManager
from jaxrm.models import ensemble
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train_policy.py")
WORLD = {"num_calibration": 256, "policy_layers": 1, "gold_layers": 1, "gold_width": 32}
RM_CFG = TransformerConfig(vocab_size=16, num_layers=1, width=8, num_heads=2, max_len=16)


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  """Compiles with XLA's backend optimisations off: about half the compile time, which
  dominates these tests (they check numbers, not speed). Restored after the module."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def base_config(**kw):
  base = dict(
    algo="ppo",
    reward="token_frequency:3",
    policy="synthetic",
    synthetic_world=WORLD,
    steps=4,
    batch_size=8,
    num_epochs=2,
    num_minibatches=2,
    learning_rate=1e-3,
    log_every=1,
    checkpoint_every=2,
    parallel="jit",
  )
  base.update(kw)
  return tp.PolicyRunConfig(**base)


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


def read_rows(workdir):
  with open(os.path.join(workdir, tp.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def restore_params(run, workdir):
  with CheckpointManager(os.path.join(workdir, tp.CHECKPOINT_DIR)) as ckpt:
    state, extra, step = ckpt.restore_latest(template=tp.initial_state(run))
  state = state._replace(key=jax.random.key_data(state.key))
  return jax.device_get(state), extra, step


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, rm_dirs):
  dirs, _ = rm_dirs
  config = base_config(
    reward=",".join(dirs),
    ensemble_objective="uncertainty_weighted",
    uncertainty_coef=0.3,
    target_kl=0.5,
    kl_horizon=50.0,
  )
  run = tp.build_run(config)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  summary = tp.train(run, straight)
  assert summary["steps"] == 4 and summary["resumed_from"] == 0
  tp.train(run, resumed, steps=3)  # "interrupted" after step 3 (checkpoints at 2 and 3)
  # A crash after step 3 could have left rows beyond the checkpoint; they are dropped.
  with open(os.path.join(resumed, tp.METRICS_FILE), "a") as f:
    f.write(json.dumps({"step": 4, "score": 123.0}) + "\n")
  summary = tp.train(run, resumed)
  assert summary["resumed_from"] == 3
  a, extra_a, step_a = restore_params(run, straight)
  b, _, step_b = restore_params(run, resumed)
  assert step_a == step_b == 4 and int(a.step) == 4
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, opt state, KL, key: bitwise
  rows_a, rows_b = read_rows(straight), read_rows(resumed)
  assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
  for ra, rb in zip(rows_a, rows_b):
    assert {k: v for k, v in ra.items() if k != "time"} == {
      k: v for k, v in rb.items() if k != "time"
    }
  for key in (
    "score",
    "kl",
    "kl_estimate",
    "entropy",
    "response_length",
    "clip_fraction",
    "value_loss",
    "kl_coef",
    "num_skipped",
  ):
    assert key in rows_a[-1], key
  assert extra_a["config"]["reward"] == config.reward
  # The adaptive KL coefficient moved and was checkpointed (it is part of the state above).
  assert rows_a[-1]["kl_coef"] != config.kl_coef
  assert all(np.isfinite(r["score"]) and r["response_length"] == 12 for r in rows_a)


def test_resuming_with_other_settings_names_the_changed_flags():
  saved = base_config().to_json()
  tp.check_resumable(saved, base_config(steps=100, log_every=5), "/w")  # allowed changes
  with pytest.raises(tp.ConfigError, match="--kl_coef: 0.05 -> 0.1"):
    tp.check_resumable(saved, base_config(kl_coef=0.1), "/w")


def test_ensemble_reward_applies_the_objective_to_the_member_rewards(rm_dirs):
  dirs, params = rm_dirs
  run = tp.build_run(base_config(reward=",".join(dirs), ensemble_objective="worst_case"))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 16, size=(5, 16)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  got = jax.jit(run.reward_fn)(run.reward_params, tokens, mask)
  apply = jax.jit(RewardModel(RM_CFG).apply)
  want = np.minimum(apply(params[0], tokens, mask), apply(params[1], tokens, mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert ensemble.ensemble_size(run.reward_params) == 2


def test_synthetic_gold_reward_is_the_worlds_gold_and_token_frequency_counts_the_response():
  gold_run = tp.build_run(base_config(reward="synthetic_gold"))
  world_cfg = synthetic.WorldConfig(**WORLD)
  world = synthetic.init_world(world_cfg, jax.random.key(0))
  prompts = synthetic.sample_prompts(world_cfg, jax.random.key(1), 6)
  tokens, mask = jax.jit(synthetic.sample_responses, static_argnums=1)(
    world, world_cfg, prompts, jax.random.key(2)
  )
  got = jax.jit(gold_run.reward_fn)(gold_run.reward_params, tokens, mask)
  want = jax.jit(synthetic.gold_reward, static_argnums=1)(world, world_cfg, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  tf_run = tp.build_run(base_config(reward="token_frequency:3"))
  want = (np.asarray(tokens)[:, world_cfg.prompt_len :] == 3).mean(1)
  np.testing.assert_allclose(jax.jit(tf_run.reward_fn)(None, tokens, mask), want, rtol=1e-6)
  # The prompt source depends on the step only (resumable) and has the world's shape.
  batch = tf_run.prompts(7)
  assert batch["prompts"].shape == (8, world_cfg.prompt_len)
  np.testing.assert_array_equal(batch["prompts"], tf_run.prompts(7)["prompts"])
  assert not np.array_equal(batch["prompts"], tf_run.prompts(8)["prompts"])


def test_flags_parse_into_the_run_config():
  fv = flags.FlagValues()
  tp.define_flags(fv)
  fv(
    [
      "train_policy.py",
      "--workdir=/tmp/w",
      "--algo=grpo",
      "--reward=token_frequency:5",
      "--target_kl=2.5",
      "--kl_estimator=k3",
      "--steps=7",
      "--batch_size=16",
      "--synthetic_world=num_calibration=512,policy_layers=1",
      "--parallel=pmap",
    ]
  )
  config = tp.config_from_flags(fv)
  assert config == dataclasses.replace(
    tp.PolicyRunConfig(),
    algo="grpo",
    reward="token_frequency:5",
    target_kl=2.5,
    kl_estimator="k3",
    steps=7,
    batch_size=16,
    parallel="pmap",
    synthetic_world={"num_calibration": 512, "policy_layers": 1},
  )
  tp.validate_config(config, num_devices=8)


@pytest.mark.parametrize(
  "overrides, flag",
  [
    (dict(reward="token_frequency:x"), "--reward=token_frequency:x"),
    (dict(reward="/no/such/run"), "--reward=/no/such/run"),
    (dict(batch_size=0), "--batch_size=0"),
    (dict(batch_size=12, parallel="shard_map"), "--batch_size=12"),
    (dict(num_minibatches=3), "--num_minibatches=3"),
    (dict(target_kl=-1.0), "--target_kl=-1.0"),
    (dict(policy="huge"), "--policy=huge"),
  ],
)
def test_bad_settings_raise_a_config_error_naming_the_flag(overrides, flag):
  with pytest.raises(tp.ConfigError) as e:
    tp.validate_config(base_config(**overrides), num_devices=8)
  assert e.value.flag_message().startswith(f"flag {flag}:")


def test_rewards_that_do_not_fit_the_policy_raise_naming_the_flag(tmp_path):
  with pytest.raises(tp.ConfigError, match="outside the policy's vocabulary"):
    tp.build_run(base_config(reward="token_frequency:16"))
  write_rm_run(str(tmp_path / "byte_rm"), 0, tokenizer="byte")
  with pytest.raises(tp.ConfigError, match="'byte' tokenizer, the policy 'synthetic'"):
    tp.build_run(base_config(reward=str(tmp_path / "byte_rm")))
  with pytest.raises(tp.ConfigError, match="synthetic_gold needs --policy=synthetic"):
    tp.build_run(base_config(reward="synthetic_gold", policy="tiny"))


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--algo=dpo"], "flag --algo=dpo: value should be one of"),
    (["--reward=token_frequency:x"], "flag --reward=token_frequency:x: token_frequency needs"),
  ],
)
def test_script_reports_a_bad_flag_in_one_line(tmp_path, args, expected):
  proc = subprocess.run(
    [sys.executable, SCRIPT, f"--workdir={tmp_path}"] + args,
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_prompt_files_give_left_padded_bos_prompts_in_a_new_order_each_pass(tmp_path):
  path = tmp_path / "prefs.jsonl"
  texts = ["Hi", "What is 2+2?", "A much longer prompt that gets truncated on the left"]
  path.write_text(
    "".join(json.dumps({"prompt": t, "chosen": " yes", "rejected": " no"}) + "\n" for t in texts)
  )
  run = tp.build_run(
    base_config(
      policy="tiny",
      prompts=(str(path),),
      prompt_len=8,
      max_new_tokens=4,
      batch_size=2,
      num_minibatches=1,
      reward="token_frequency:104",
    )
  )
  assert run.rl_config.eos_id == 2 and run.tokenizer == "byte"
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
  with pytest.raises(tp.ConfigError, match="prefs.jsonl:1"):
    tp.build_run(
      base_config(
        policy="tiny", prompts=(str(path),), prompt_len=8, max_new_tokens=4, num_minibatches=1
      )
    )
