"""The SFT loop: imported checkpoint + tokenizer, response-only loss, resume, export, errors."""

import dataclasses
import gzip
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from jaxrm.data import demonstrations
from jaxrm.data.preference_records import PreferenceDataError
from jaxrm.data.run_tokenizer import RunTokenizer
from jaxrm.io import hf, hf_runs, policy_io, rundir
from jaxrm.models.policy import PolicyModel
from jaxrm.train import policy_text, sft, sources
from tests import run_helpers

DATA = os.path.join(os.path.dirname(__file__), "data")
HH = os.path.join(DATA, "hh_rlhf_sample.jsonl.gz")
LLAMA = os.path.join(DATA, "hf", "llama")
TOKENIZER = os.path.join(DATA, "hf", "tokenizer")


def tiny_sft_config(**overrides) -> sft.SFTConfig:
  config = sft.SFTConfig(
    policy=LLAMA,
    tokenizer=TOKENIZER,
    data=sft.SFTDataConfig(files=(HH,), test_fraction=0.25, max_len=64),
    optimizer=sft.OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
    steps=4,
    batch_size=4,
    eval_every=100,
    parallel="jit",
    log=rundir.LogConfig(log_every=2, checkpoint_every=2, plots=False),
  )
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  summary = sft.train_and_evaluate(tiny_sft_config(), workdir)
  return workdir, summary


def _params(workdir):
  _, variables, _ = hf_runs.load_policy_params(workdir)
  return variables


def test_sft_lowers_the_heldout_response_loss_of_the_imported_checkpoint(sft_run):
  workdir, summary = sft_run
  c = tiny_sft_config()
  tok = RunTokenizer.from_source(TOKENIZER)
  demos = demonstrations.read_demonstrations((HH,), test_fraction=0.25)
  test = sft.encode_demonstrations(demos["test"], tok, c.data)
  start = hf.import_policy(LLAMA, max_len=64)
  before = sft.heldout_loss(start.config, start.variables, test, batch_size=4)
  assert summary["eval"]["num_tokens"] == before["num_tokens"] == int(test["response_mask"].sum())
  assert summary["eval"]["loss"] < before["loss"], (summary["eval"], before)
  rows = rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))
  assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4]
  assert [r["step"] for r in rows if r["split"] == "eval"] == [4]


def test_heldout_loss_counts_only_response_tokens():
  c = tiny_sft_config()
  tok = RunTokenizer.from_source(TOKENIZER)
  demos = demonstrations.read_demonstrations((HH,))["train"][:5]
  arrays = sft.encode_demonstrations(demos, tok, c.data)
  model = hf.import_policy(LLAMA, max_len=64)
  got = sft.heldout_loss(model.config, model.variables, arrays, batch_size=4)  # 4 + 1 (padded)
  logits, _ = PolicyModel(model.config).apply(model.variables, arrays["tokens"], arrays["mask"])
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
  nll, count = 0.0, 0
  for i in range(5):
    for t in range(1, 64):
      if arrays["response_mask"][i, t]:
        nll -= logp[i, t - 1, arrays["tokens"][i, t]]
        count += 1
  assert got["num_tokens"] == count
  np.testing.assert_allclose(got["loss"], nll / count, rtol=1e-5)


def test_resumed_sft_run_ends_bitwise_equal(sft_run, tmp_path):
  workdir, _ = sft_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, rundir.CHECKPOINT_DIR, "4"))  # crashed after step 2
  summary = sft.train_and_evaluate(tiny_sft_config(), resumed)
  assert summary["resumed_from"] == 2
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(resumed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = rundir.read_metrics(os.path.join(resumed, rundir.METRICS_FILE))
  assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4]


def test_a_run_saved_before_matmul_dtype_resumes_bitwise_equal(sft_run, tmp_path, monkeypatch):
  workdir, _ = sft_run
  old = str(tmp_path / "old")
  with run_helpers.saved_without(monkeypatch, "matmul_dtype"):
    sft.train_and_evaluate(tiny_sft_config(), old)
  saved = rundir.read_checkpoint_extra(old, 4)["config"]
  assert "matmul_dtype" not in saved and "dtype" in saved
  shutil.rmtree(os.path.join(old, rundir.CHECKPOINT_DIR, "4"))  # crashed after step 2
  with pytest.raises(rundir.ConfigError, match="matmul_dtype='bfloat16': differs.*<absent>"):
    sft.train_and_evaluate(tiny_sft_config(matmul_dtype="bfloat16"), old)
  summary = sft.train_and_evaluate(tiny_sft_config(), old)
  assert summary["resumed_from"] == 2
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(old))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_microbatched_run_trains_the_whole_batch_policy(sft_run, tmp_path, monkeypatch):
  """Slices of 2 of the 4 sequences: the same logged metrics and, after four Adam steps, the
  same parameters up to float rounding (1e-4, as the DPO and reward-model runs' tests). The
  field may change on resume."""
  workdir, _ = sft_run
  sizes = run_helpers.slice_sizes(monkeypatch)
  sliced = str(tmp_path / "sliced")
  sft.train_and_evaluate(tiny_sft_config(microbatch_size=2), sliced)
  assert sizes and set(sizes) == {2}
  rows = [rundir.read_metrics(os.path.join(d, rundir.METRICS_FILE)) for d in (workdir, sliced)]
  assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
  for want, got in zip(*rows):
    for k in ("loss", "perplexity", "num_tokens", "grad_norm"):
      if k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(sliced))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
  shutil.rmtree(os.path.join(sliced, rundir.CHECKPOINT_DIR, "4"))  # resumed with other slices
  assert sft.train_and_evaluate(tiny_sft_config(microbatch_size=4), sliced)["resumed_from"] == 2


def test_resume_with_another_policy_is_refused_before_any_restore(sft_run, tmp_path):
  workdir, _ = sft_run
  moved = str(tmp_path / "run")
  shutil.copytree(workdir, moved)
  qwen2 = os.path.join(os.path.dirname(LLAMA), "qwen2")
  with pytest.raises(rundir.ConfigError, match="differs from the checkpointed run") as e:
    sft.train_and_evaluate(tiny_sft_config(policy=qwen2), moved)
  assert e.value.field == "policy"


def test_sft_run_is_a_policy_source_and_exports_to_causal_lm_exactly(sft_run, tmp_path):
  workdir, _ = sft_run
  params = _params(workdir)
  loaded = policy_io.load_policy(workdir, max_len=64)
  assert loaded.kind == "run" and loaded.hf["model_type"] == "llama"
  assert loaded.tok.name == RunTokenizer.from_source(TOKENIZER).name
  out = hf_runs.export_policy_run(workdir, str(tmp_path / "export"))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert config["eos_token_id"] == loaded.tok.eos_id
  assert config["max_position_embeddings"] == 128  # the imported checkpoint's, kept
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  back = hf.import_policy(out, max_len=64)
  assert back.config == loaded.config
  for a, b, c in zip(
    jax.tree.leaves(params), jax.tree.leaves(back.variables), jax.tree.leaves(loaded.variables)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_mixed_precision_keeps_float32_parameters_and_the_setting_with_the_run(sft_run, tmp_path):
  workdir = str(tmp_path / "mixed")
  summary = sft.train_and_evaluate(tiny_sft_config(matmul_dtype="bfloat16"), workdir)
  loaded = policy_io.load_policy(workdir, max_len=64)
  assert loaded.config.dtype == jax.numpy.bfloat16
  assert loaded.config.param_dtype == jax.numpy.float32
  assert {np.asarray(x).dtype for x in jax.tree.leaves(_params(workdir))} == {np.dtype(np.float32)}
  # bfloat16 operands (8 mantissa bits) change the losses by rounding, not by more.
  reference = sft_run[1]
  for split in ("train", "eval"):
    assert summary[split]["loss"] == pytest.approx(reference[split]["loss"], rel=2e-2), split
    assert summary[split]["loss"] != reference[split]["loss"], split
  back = policy_io.load_policy(workdir, max_len=64, matmul_dtype=jax.numpy.float32)
  assert back.config == dataclasses.replace(loaded.config, dtype=jax.numpy.float32)
  # RL from the run keeps the float32 checkpoint it started from as its KL reference.
  rl_config = types.SimpleNamespace(
    policy=workdir, reference=LLAMA, tokenizer=TOKENIZER, rl=types.SimpleNamespace(eos_id=None)
  )
  text = policy_text.load_text_policy(rl_config, max_len=64, key=jax.random.key(0))
  assert text.policy.config.dtype == jax.numpy.bfloat16
  start = hf.import_policy(LLAMA, max_len=64).variables
  for a, b in zip(jax.tree.leaves(text.ref_params), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  qwen2 = types.SimpleNamespace(**{**vars(rl_config), "reference": LLAMA.replace("llama", "qwen2")})
  with pytest.raises(rundir.ConfigError, match="must have the policy's architecture"):
    policy_text.load_text_policy(qwen2, max_len=64, key=jax.random.key(0))


def test_demonstrations_read_both_forms_and_name_bad_lines(tmp_path):
  path = tmp_path / "demos.jsonl"
  lines = [
    {"prompt": "\n\nHuman: hi", "response": "\n\nAssistant: hello"},
    {"prompt": [{"role": "user", "content": "x"}], "response": "y"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
  ]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  demos = demonstrations.read_demonstrations([str(path)])["train"]
  assert [(d.prompt, d.response) for d in demos] == [
    ("\n\nHuman: hi\n\nAssistant:", " hello"),
    ("\n\nHuman: x", "y"),
    ("\n\nHuman: a\n\nAssistant:", " b"),
  ]
  path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "p", "response": 3}) + "\n")
  with pytest.raises(PreferenceDataError, match=r"demos.jsonl:2: .*response"):
    demonstrations.read_demonstrations([str(path)])
  # a truncated or mislabelled .gz names the file, not a gzip traceback
  data = gzip.compress(("\n".join([json.dumps(lines[0])] * 300) + "\n").encode())
  cut, fake = tmp_path / "cut.jsonl.gz", tmp_path / "fake.jsonl.gz"
  cut.write_bytes(data[: len(data) // 2])
  fake.write_text(json.dumps(lines[0]) + "\n")
  for bad, message in ((cut, "the gzip data is truncated"), (fake, "is not gzip data")):
    with pytest.raises(PreferenceDataError, match=f"{bad}: {message}"):
      demonstrations.read_demonstrations([str(bad)])
    with pytest.raises(rundir.ConfigError, match=message):
      sources.read_prompt_texts((str(bad),))


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("policy", "nonexistent/dir", "must be a preset"),
    ("tokenizer", LLAMA, "tokenizer.json"),
    ("batch_size", 0, "must be an int >= 1"),
    ("parallel", "tpu", "must be one of"),
    ("matmul_dtype", "float16", r"must be '' \(dtype\) or one of"),
    ("microbatch_size", 3, "must divide the 4 sequences of each device's batch"),
  ],
)
def test_bad_settings_are_config_errors_naming_the_field(tmp_path, field, value, message):
  with pytest.raises(rundir.ConfigError, match=message) as e:
    sft.train_and_evaluate(tiny_sft_config(**{field: value}), str(tmp_path))
  assert e.value.field == field


@pytest.mark.parametrize(
  "data, field, message",
  [
    (dict(max_len=2_000_000), "data.max_len", r"must be an int in \[8, 65536\]"),
    (dict(files=(HH, HH)), "data.files", "must not repeat a data file"),
  ],
)
def test_bad_data_settings_are_config_errors_naming_the_field(tmp_path, data, field, message):
  config = tiny_sft_config()
  config.data = sft.SFTDataConfig(**{"files": (HH,), "max_len": 64, **data})
  with pytest.raises(rundir.ConfigError, match=message) as e:
    sft.train_and_evaluate(config, str(tmp_path))
  assert e.value.field == field


def test_checkpoint_without_a_tokenizer_needs_one(tmp_path):
  with pytest.raises(rundir.ConfigError, match="no tokenizer.json; name a tokenizer folder"):
    sft.train_and_evaluate(tiny_sft_config(tokenizer=""), str(tmp_path))
