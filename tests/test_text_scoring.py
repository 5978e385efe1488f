"""score_texts: a text reward-model run scores strings exactly as its training path did."""

import gzip
import json
import os

import numpy as np
import pytest

from jaxrm.data import pairs, preferences
from jaxrm.data.run_tokenizer import RunTokenizer
from jaxrm.io import rundir, text_scoring
from jaxrm.models.reward_model import RewardModel
from jaxrm.train import reward_model as rm
from jaxrm.train import rm_eval

DATA = os.path.join(os.path.dirname(__file__), "data")
HH = os.path.join(DATA, "hh_rlhf_sample.jsonl.gz")
TOKENIZER = os.path.join(DATA, "hf", "tokenizer")


def tiny_hf_rm_config(**overrides) -> rm.TrainConfig:
  """A few steps of the tiny Llama fixture with the fixture BPE tokenizer on the HH sample."""
  config = rm.TrainConfig(
    data=pairs.DataConfig(files=(HH,), test_fraction=0.25, max_len=64, tokenizer=TOKENIZER),
    model=rm.ModelConfig(hf_checkpoint=os.path.join(DATA, "hf", "llama")),
    optimizer=rm.OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
    eval=rm.EvalConfig(every=100, report=False),
    log=rundir.LogConfig(log_every=2, checkpoint_every=100, plots=False),
    steps=2,
    batch_size=8,
    parallel="jit",
  )
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rm_hf"))
  rm.train_and_evaluate(tiny_hf_rm_config(), workdir)
  return workdir


def _lines(path):
  with gzip.open(path, "rt") as f:
    return [json.loads(line) for line in f]


def _run_pairs(workdir):
  """Both splits' examples (training-time tokens), their JSONL records and training scores."""
  run = rm_eval.restore_run(workdir)
  data = pairs.load_data(run.config.data, workdir, prepare=False)
  model = RewardModel(run.model_config, pooling=run.extra["pooling"])
  peval = rm_eval.make_eval_step(model.apply, mode="jit")
  records = _lines(HH)
  out = {}
  for split in ("train", "test"):
    source = getattr(data, split)
    examples = preferences.get_examples(source, range(len(source)))
    scores, _ = rm_eval.score_pairs(peval, run.state.params, source, run.config, data.max_len)
    out[split] = (examples, [records[e.line - 1] for e in examples], scores)
  return out


def test_run_stores_its_tokenizer_and_convention(rm_run):
  tok = RunTokenizer.load(rm_run)
  fixture = RunTokenizer.from_source(TOKENIZER)
  assert tok.name == fixture.name and tok.name.startswith("hf:")
  with open(os.path.join(rm_run, "tokenizer", "jaxrm_tokenizer.json")) as f:
    convention = json.load(f)
  assert convention["add_bos"] and convention["add_eos"]
  assert convention["bos_id"] == fixture.bos_id and convention["eos_id"] == fixture.eos_id
  with open(os.path.join(rm_run, "config.json")) as f:
    assert json.load(f)["tokenizer"] == tok.name


def test_encoding_reproduces_the_training_tokens_exactly(rm_run):
  tok = RunTokenizer.load(rm_run)
  untruncated = 0
  for examples, records, _ in _run_pairs(rm_run).values():
    chosen, rejected = text_scoring.encode_records(tok, records, max_len=64)
    for side, enc in (("chosen", chosen), ("rejected", rejected)):
      single = text_scoring.encode_texts(tok, [r[side] for r in records], max_len=64)
      for i, e in enumerate(examples):
        want = getattr(e, side)
        np.testing.assert_array_equal(enc.tokens[i, : len(want)], want)
        assert enc.mask[i].sum() == len(want) and enc.prompt_len[i] == e.prompt_len
        if not e.truncated:  # a lone string knows no partner to truncate against
          np.testing.assert_array_equal(single.tokens[i, : len(want)], want)
          assert single.mask[i].sum() == len(want)
          untruncated += 1
  assert untruncated >= 2  # the HH sample holds 2 pairs that fit in 64 fixture tokens


def test_score_texts_equals_the_training_time_scores(rm_run):
  for examples, records, scores in _run_pairs(rm_run).values():
    rc, rr = text_scoring.score_text_pairs(rm_run, records, batch_size=4)
    np.testing.assert_allclose(rc, scores["rewards_chosen"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rr, scores["rewards_rejected"], rtol=1e-5, atol=1e-6)
    keep = [i for i, e in enumerate(examples) if not e.truncated]
    if not keep:
      continue
    got = text_scoring.score_texts(rm_run, [records[i]["chosen"] for i in keep])
    np.testing.assert_allclose(got, scores["rewards_chosen"][keep], rtol=1e-5, atol=1e-6)
    # The prompt/response form of the same strings gives the same rewards.
    split = text_scoring.prompt_response_pairs([records[i]["chosen"] for i in keep])
    by_parts = text_scoring.score_texts(
      rm_run, prompts=[p for p, _ in split], responses=[r for _, r in split]
    )
    np.testing.assert_allclose(by_parts, got, rtol=1e-6, atol=1e-7)


def test_score_texts_rejects_ambiguous_or_malformed_input(rm_run):
  with pytest.raises(ValueError, match="either texts or prompts"):
    text_scoring.score_texts(rm_run, ["a"], prompts=["a"], responses=["b"])
  with pytest.raises(ValueError, match="same length"):
    text_scoring.score_texts(rm_run, prompts=["a", "b"], responses=["c"])
  with pytest.raises(TypeError, match="texts must be a list of strings"):
    text_scoring.score_texts(rm_run, "a single string")
  with pytest.raises(FileNotFoundError, match="not a reward-model run directory"):
    text_scoring.score_texts(os.path.dirname(rm_run), ["a"])
  with pytest.raises(ValueError, match=r"records\[0\]: .*rejected"):
    text_scoring.score_text_pairs(rm_run, [{"chosen": "a"}])


def test_reward_model_on_an_imported_checkpoint_keeps_its_family_for_export(rm_run):
  extra = rundir.read_checkpoint_extra(rm_run, 2)
  assert extra["hf"]["model_type"] == "llama"
  assert extra["model_config"]["norm"] == "rmsnorm"


def test_hf_checkpoint_with_a_too_small_vocabulary_or_too_long_max_len_is_a_config_error(tmp_path):
  config = tiny_hf_rm_config()
  config.model.hf_checkpoint = os.path.join(DATA, "hf", "gpt2")
  config.data.max_len = 128  # the GPT-2 fixture has 64 learned positions
  with pytest.raises(rundir.ConfigError, match="model.hf_checkpoint.*n_positions"):
    rm.train_and_evaluate(config, str(tmp_path / "long"))
  config = tiny_hf_rm_config()
  config.data.tokenizer = os.path.join(DATA, "hf", "llama")  # no tokenizer.json there
  with pytest.raises(rundir.ConfigError, match="data.tokenizer.*tokenizer.json"):
    rm.train_and_evaluate(config, str(tmp_path / "tok"))
