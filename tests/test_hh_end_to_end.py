"""HH end to end with a subword tokenizer, on the committed tiny Llama checkpoint.

Reward model (few steps) -> its report -> SFT (few steps) -> best-of-n and PPO against the
reward model, with decoded samples -> export of both to Hugging Face format -> re-import
equal. Everything runs in-process with the fixture BPE tokenizer on the HH-RLHF sample.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxrm.data import pairs
from jaxrm.data.run_tokenizer import RunTokenizer
from jaxrm.io import hf, hf_runs, rm_io, rundir
from jaxrm.steps.rl import RLConfig
from jaxrm.train import best_of_n, policy, sft
from jaxrm.train import reward_model as rm
from jaxrm.train.samples import SAMPLES_FILE, SamplesConfig
from jaxrm.train.sources import PromptConfig, RewardConfig

DATA = os.path.join(os.path.dirname(__file__), "data")
HH = os.path.join(DATA, "hh_rlhf_sample.jsonl.gz")
LLAMA = os.path.join(DATA, "hf", "llama")
TOKENIZER = os.path.join(DATA, "hf", "tokenizer")
LOG = rundir.LogConfig(log_every=1, checkpoint_every=100, plots=False)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _bon_config(dirs, **overrides):
  """Best-of-4 of the SFT policy against the reward model on 3 of the sample's prompts."""
  fields = dict(num_prompts=3, n=4, max_new_tokens=16, batch_size=8) | overrides
  return best_of_n.BestOfNConfig(
    policy=dirs["sft"],
    prompts=PromptConfig(source="jsonl", files=(HH,), prompt_len=32),
    reward=RewardConfig(source="rm", rm_dirs=(dirs["rm"],)),
    **fields,
  )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp("hh")
  dirs = {k: str(root / k) for k in ("rm", "sft", "bon", "ppo", "rm_hf", "sft_hf")}
  rm_config = rm.TrainConfig(
    data=pairs.DataConfig(files=(HH,), test_fraction=0.25, max_len=64),
    model=rm.ModelConfig(hf_checkpoint=LLAMA, attention_query_block=16),  # 64 tokens: 4 blocks
    optimizer=rm.OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
    eval=rm.EvalConfig(every=100, report=True),
    log=LOG,
    steps=2,
    batch_size=8,
    parallel="jit",
  )
  rm_config.data.tokenizer = TOKENIZER
  rm_summary = rm.train_and_evaluate(rm_config, dirs["rm"])
  sft_config = sft.SFTConfig(
    policy=LLAMA,
    tokenizer=TOKENIZER,
    data=sft.SFTDataConfig(files=(HH,), test_fraction=0.25, max_len=64),
    optimizer=sft.OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
    steps=2,
    batch_size=4,
    parallel="jit",
    log=LOG,
  )
  sft.train_and_evaluate(sft_config, dirs["sft"])
  eos = RunTokenizer.from_source(TOKENIZER).eos_id
  bon = best_of_n.run_best_of_n(_bon_config(dirs), dirs["bon"])
  ppo_config = policy.PolicyTrainConfig(
    algo="ppo",
    policy=dirs["sft"],
    reference=LLAMA,
    tokenizer=TOKENIZER,
    prompts=PromptConfig(source="jsonl", files=(HH,), prompt_len=16),
    reward=RewardConfig(source="rm", rm_dirs=(dirs["rm"],)),
    rl=RLConfig(max_new_tokens=8, eos_id=eos, num_epochs=1, num_minibatches=1),
    steps=1,
    batch_size=2,
    parallel="jit",
    samples=SamplesConfig(every=1, num=2),
    log=LOG,
  )
  ppo = policy.train_and_evaluate(ppo_config, dirs["ppo"])
  run = policy.build_run(ppo_config)
  hf_runs.export_reward_model_run(dirs["rm"], dirs["rm_hf"])
  hf_runs.export_policy_run(dirs["sft"], dirs["sft_hf"])
  return {"dirs": dirs, "rm": rm_summary, "bon": bon, "ppo": ppo, "ppo_run": run}


def test_reward_model_trains_on_hh_with_the_checkpoint_and_writes_its_report(pipeline):
  d = pipeline["dirs"]["rm"]
  report = pipeline["rm"]["report"]
  assert os.path.isfile(report["markdown"])
  with open(os.path.join(d, "rm_report.json")) as f:
    content = json.load(f)
  assert content["model"]["tokenizer"] == RunTokenizer.from_source(TOKENIZER).name
  assert content["heldout"]["num_pairs"] == pipeline["rm"]["eval"]["num_pairs"] > 0


def test_best_of_n_keeps_the_highest_reward_sample_of_each_prompt(pipeline):
  d = pipeline["dirs"]["bon"]
  rows = _read_jsonl(os.path.join(d, SAMPLES_FILE))
  best = _read_jsonl(os.path.join(d, best_of_n.BEST_FILE))
  assert len(rows) == 12 and len(best) == 3
  for b in best:
    group = [r for r in rows if r["prompt_index"] == b["prompt_index"]]
    assert b["reward"] == max(r["reward"] for r in group)
    chosen = [r for r in group if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["response"] == b["response"]
    assert all(r["gold"] is None and r["prompt"] == b["prompt"] for r in group)
  summary = pipeline["bon"]
  assert summary["mean_reward_best"] >= summary["mean_reward_all"]
  np.testing.assert_allclose(summary["kl_bon"], np.log(4) - 3 / 4, rtol=1e-6)


def test_best_of_n_refuses_more_prompts_than_the_files_hold(pipeline, tmp_path):
  dirs = pipeline["dirs"]
  config = _bon_config(dirs, num_prompts=100_000)
  with pytest.raises(rundir.ConfigError, match=r"num_prompts=100000: exceeds the \d+ prompts"):
    best_of_n.run_best_of_n(config, str(tmp_path / "bon"))


def test_ppo_against_the_reward_model_writes_decoded_samples(pipeline):
  d = pipeline["dirs"]["ppo"]
  rows = _read_jsonl(os.path.join(d, SAMPLES_FILE))
  assert [r["step"] for r in rows] == [1, 1]
  for r in rows:
    assert isinstance(r["prompt"], str) and r["prompt"].endswith("Assistant:")
    assert isinstance(r["reward"], float) and r["gold"] is None
    assert 1 <= r["response_tokens"] <= 8
  metrics = rundir.read_metrics(os.path.join(d, rundir.METRICS_FILE))
  assert [m["step"] for m in metrics if m.get("split") != "eval"] == [1]
  assert [m["step"] for m in metrics if m.get("split") == "eval"] == [0, 1]  # eval_every rows
  assert pipeline["ppo"]["final"]["step"] == 1
  assert RunTokenizer.load(d).name == RunTokenizer.from_source(TOKENIZER).name


def test_ppo_starts_from_the_sft_policy_with_the_checkpoint_as_kl_reference(pipeline):
  run = pipeline["ppo_run"]
  _, sft_params, _ = hf_runs.load_policy_params(pipeline["dirs"]["sft"])
  start = {**run.init_params["params"]}
  assert "value_head" in start
  del start["value_head"]
  jax.tree.map(np.testing.assert_array_equal, {"params": start}, sft_params)
  reference = hf.import_policy(LLAMA, max_len=run.policy_config.max_len)
  jax.tree.map(np.testing.assert_array_equal, run.ref_params, reference.variables)


def test_exports_reimport_equal(pipeline):
  dirs = pipeline["dirs"]
  _, params, extra = rm_io.load_reward_model(dirs["rm"])
  back = hf.import_reward_model(dirs["rm_hf"], max_len=64)
  trained = rm_io.config_from_json(extra["model_config"])
  assert trained.attention_query_block == 16  # how it computed; the export holds what
  assert back.config == dataclasses.replace(trained, attention_query_block=None)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg, variables, _ = hf_runs.load_policy_params(dirs["sft"])
  back = hf.import_policy(dirs["sft_hf"], max_len=cfg.max_len)
  assert back.config == cfg
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for d, arch in (
    (dirs["rm_hf"], "LlamaForSequenceClassification"),
    (dirs["sft_hf"], "LlamaForCausalLM"),
  ):
    with open(os.path.join(d, "config.json")) as f:
      assert json.load(f)["architectures"] == [arch]
    assert RunTokenizer.from_source(d).name == RunTokenizer.from_source(TOKENIZER).name


def test_policy_rejects_an_eos_id_other_than_the_tokenizers_and_a_mismatched_reference(tmp_path):
  config = policy.PolicyTrainConfig(
    algo="rloo",
    policy=LLAMA,
    tokenizer=TOKENIZER,
    prompts=PromptConfig(source="bos"),
    reward=RewardConfig(source="token_frequency", token_id=5),
    rl=RLConfig(max_new_tokens=8, eos_id=2),
    batch_size=4,
    parallel="jit",
  )
  eos = RunTokenizer.from_source(TOKENIZER).eos_id
  with pytest.raises(rundir.ConfigError, match=f"rl.eos_id=2: .*--config.rl.eos_id={eos}"):
    policy.build_run(config)
  config.rl = RLConfig(max_new_tokens=8, eos_id=eos)
  config.reference = "tiny"  # a byte-level preset: another architecture and tokenizer
  config.tokenizer = TOKENIZER
  with pytest.raises(rundir.ConfigError, match="reference=.*architecture and tokenizer"):
    policy.build_run(config)


def test_the_readme_config_variants_are_valid_with_the_runs_they_name(pipeline):
  """The 'hf' variants the README runs: valid as written, given the runs they point at."""
  from experiments import cli  # noqa: PLC0415

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  load = lambda name: cli.load_config(os.path.join(root, "experiments", "configs", f"{name}.py:hf"))
  dirs = pipeline["dirs"]
  rm.validate_config(load("reward_model"), num_devices=1)
  sft.validate_config(load("sft"), num_devices=1)
  config = load("best_of_n")
  config.policy, config.reward.rm_dirs = dirs["sft"], (dirs["rm"],)
  best_of_n.validate_config(config)
  config = load("policy")
  config.policy, config.reward.rm_dirs = dirs["sft"], (dirs["rm"],)
  policy.validate_config(config, num_devices=1)
  assert config.rl.eos_id == RunTokenizer.from_source(TOKENIZER).eos_id
