"""The policy loop's diagnostics (jaxrm.train.policy, jaxrm.train.sources): a PPO run against a
synthetic proxy (an ensemble of two reward models) logs gold next to the proxy, member
disagreement, KLs named by estimator and response length, on the training rollouts and on a
fixed evaluation batch, and writes the curves; the logged values equal ones recomputed from
the same samples with the world's gold function and the members' own apply."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.data import pairs, synthetic
from jaxrm.io import rm_io, rundir
from jaxrm.io.checkpoint import CheckpointManager
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import rl, rollout, train_state
from jaxrm.train import policy as tp
from jaxrm.train.sources import RewardConfig

WORLD = {"num_calibration": 256, "policy_layers": 1, "gold_layers": 1, "gold_width": 32}
RM_CFG = TransformerConfig(vocab_size=16, num_layers=1, width=8, num_heads=2, max_len=16)


def write_rm_run(workdir, seed):
  """A tiny synthetic-tokenizer reward-model run directory (the RM script's format)."""
  tokens = jnp.zeros((1, RM_CFG.max_len), jnp.int32)
  params = RewardModel(RM_CFG).init(jax.random.key(seed), tokens, jnp.ones(tokens.shape, bool))
  state = train_state.create_train_state(params, optax.adam(1e-3), jax.random.key(seed))
  extra = {
    "model_config": rm_io.config_to_json(RM_CFG),
    "pooling": "last",
    "tokenizer": "synthetic",
    "data": {},
    "metrics": {},
  }
  with CheckpointManager(os.path.join(workdir, "checkpoints")) as ckpt:
    ckpt.save(10, state, extra)
  return params


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
  """A 3-step PPO run against a 2-member proxy ensemble, eval every 2 steps."""
  root = tmp_path_factory.mktemp("diag")
  dirs = [str(root / f"rm{i}") for i in range(2)]
  rm_params = [write_rm_run(d, i) for i, d in enumerate(dirs)]
  config = tp.PolicyTrainConfig(
    algo="ppo",
    reward=RewardConfig(source="rm", rm_dirs=tuple(dirs), ensemble_objective="mean"),
    world=synthetic.WorldConfig(**WORLD),
    rl=rl.RLConfig(max_new_tokens=12, eos_id=None, num_epochs=1, num_minibatches=2),
    steps=3,
    batch_size=8,
    parallel="jit",
    eval_every=2,
    eval_batch_size=8,
    log=rundir.LogConfig(log_every=1, checkpoint_every=10, plots=True),
  )
  config.optimizer.learning_rate = 1e-2
  run = tp.build_run(config)
  workdir = str(root / "run")
  tp.train(run, workdir)
  with open(os.path.join(workdir, rundir.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  return run, workdir, rows, rm_params


def test_a_ppo_run_against_a_proxy_logs_gold_disagreement_kl_and_length(proxy_run):
  _, _, rows, _ = proxy_run
  train = [r for r in rows if r.get("split", "train") == "train"]
  evals = [r for r in rows if r.get("split") == "eval"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert [r["step"] for r in evals] == [0, 2, 3]  # step 0, every eval_every, the last step
  for row in train + evals:
    for key in ("score", "gold", "ensemble_std", "kl_k1", "kl_exact", "response_length"):
      assert isinstance(row[key], float) or key == "response_length", (key, row)
    assert "kl" not in row and "kl_estimate" not in row
    assert row["response_length"] == 12
  # At step 0 the policy is the reference: every KL of the evaluation is exactly 0.
  assert evals[0]["kl_k1"] == 0.0 and evals[0]["kl_exact"] == 0.0
  assert evals[-1]["kl_exact"] > 0.0 and train[-1]["ensemble_std"] > 0.0


def test_the_run_writes_the_diagnostic_curves(proxy_run):
  _, workdir, _, _ = proxy_run
  for name in (tp.RL_CURVES_FILE, "curves_train.png", "curves_eval.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_logged_gold_and_disagreement_equal_a_recomputation_from_the_same_samples(proxy_run):
  """Step 1 redone outside the loop (same state, prompts, reward): its samples' gold by the
  world's gold function and its members' std by their own apply equal the logged row."""
  run, _, rows, rm_params = proxy_run
  c = run.config
  state = tp.initial_state(run)
  policy = tp.transformer_policy(c.world.policy_config(), value_head=True)
  step = jax.jit(
    functools.partial(
      rl.ppo_step,
      policy=policy,
      config=c.rl,
      reward_fn=run.reward_fn,
      optimizer=run.optimizer,
      return_rollout=True,
    )
  )
  _, metrics, ro = step(state, run.prompts(0), run.reward_params, run.ref_params)
  world = pairs.world_for_seed(c.world, c.world_seed)
  gold = jax.jit(synthetic.gold_reward, static_argnums=1)(world, c.world, ro["tokens"], ro["mask"])
  apply = jax.jit(RewardModel(RM_CFG).apply)
  members = np.stack([apply(p, ro["tokens"], ro["mask"]) for p in rm_params])
  row = next(r for r in rows if r["step"] == 1 and r.get("split", "train") == "train")
  np.testing.assert_allclose(row["gold"], np.mean(gold), rtol=1e-5)
  np.testing.assert_allclose(row["ensemble_std"], members.std(0).mean(), rtol=1e-4)
  np.testing.assert_allclose(row["score"], members.mean(0).mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(row["kl_k1"], metrics["kl_k1"], rtol=1e-5)
  assert abs(row["gold"] - row["score"]) > 1e-3  # gold is not the proxy


def test_the_eval_row_is_the_gold_of_the_policy_on_the_fixed_batch(proxy_run):
  """The step-0 evaluation: pi_init sampled on the evaluation prompts (drawn and sampled
  with the keys of ``EVAL_STREAM``), scored by the world's gold function."""
  run, _, rows, _ = proxy_run
  c = run.config
  prompt_key, sample_key = jax.random.split(
    jax.random.fold_in(jax.random.key(c.seed), tp.EVAL_STREAM)
  )
  # The prompt source's step-0 batch under the evaluation prompt key (sources.make_prompts).
  prompts = synthetic.sample_prompts(c.world, jax.random.fold_in(prompt_key, 0), c.eval_batch_size)
  world = pairs.world_for_seed(c.world, c.world_seed)
  ro = rollout.rollout(
    world.policy_params,
    world.policy_params,
    None,
    prompts,
    jnp.ones(prompts.shape, bool),
    sample_key,
    policy=tp.transformer_policy(c.world.policy_config()),
    reward_fn=lambda p, t, m: jnp.zeros(t.shape[0]),
    max_new_tokens=c.rl.max_new_tokens,
    eos_id=None,
  )
  gold = synthetic.gold_reward(world, c.world, ro.tokens, ro.mask)
  row = next(r for r in rows if r["step"] == 0 and r.get("split") == "eval")
  np.testing.assert_allclose(row["gold"], np.mean(gold), rtol=1e-5)


def test_gold_is_logged_for_any_reward_of_the_synthetic_policy_but_not_for_byte_policies():
  base = tp.PolicyTrainConfig(world=synthetic.WorldConfig(**WORLD), parallel="jit")
  tf = tp.build_run(dataclasses.replace(base, reward=RewardConfig(source="token_frequency")))
  assert tf.reward.diagnostics_fn is not None
  fn, diag, params = tf.reward.for_step()
  tokens = jnp.zeros((2, base.world.seq_len), jnp.int32)
  assert set(diag(params, tokens, jnp.ones(tokens.shape, bool))) == {"gold"}
  byte = tp.PolicyTrainConfig(
    policy="tiny",
    reward=RewardConfig(source="token_frequency"),
    prompts=dataclasses.replace(base.prompts, source="bos", prompt_len=1),
    rl=rl.RLConfig(max_new_tokens=4),
    parallel="jit",
  )
  assert tp.build_run(byte).reward.diagnostics_fn is None


def test_plot_overlays_draws_the_panels_with_data_and_skips_the_others(tmp_path):
  with rundir.MetricsWriter(tmp_path, log=rundir.LogConfig(plots=False)) as w:
    for step in range(3):
      w.write({"step": step, "score": step * 1.0, "gold": 0.5 * step})
      w.write({"step": step, "split": "eval", "gold": 0.1})
  path = rundir.plot_overlays(tmp_path, "x.png", {"reward": ("score", "gold"), "none": ("kl",)})
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert rundir.plot_overlays(tmp_path, "y.png", {"none": ("kl",)}) is None
  assert not os.path.exists(tmp_path / "y.png")
