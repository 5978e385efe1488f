"""The best-of-n run: per-sample keys, thread groups and bad settings
(:mod:`jaxrm.train.best_of_n`)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxrm.io import policy_io, rundir
from jaxrm.models import sampling
from jaxrm.train import best_of_n
from jaxrm.train.samples import SAMPLES_FILE
from jaxrm.train.sources import PromptConfig, RewardConfig


def _config(**overrides):
  """Best-of-4 of a random byte-level policy on 3 BOS prompts, rewarded for the letter 'e'."""
  fields = dict(num_prompts=3, n=4, max_new_tokens=6, batch_size=8, stop_at_eos=False)
  return best_of_n.BestOfNConfig(
    policy="tiny",
    prompts=PromptConfig(source="bos"),
    reward=RewardConfig(source="token_frequency", token_id=ord("e") + 3),
    **(fields | overrides),
  )


def _samples(workdir):
  with open(os.path.join(workdir, SAMPLES_FILE)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bon_one_thread"))
  return workdir, best_of_n.run_best_of_n(_config(), workdir)


def test_samples_do_not_depend_on_batch_size_or_thread_groups(one_thread, tmp_path):
  workdir, summary = one_thread
  # 12 samples in 3 calls of 4 (the last padded), each call in 2 host threads of 2 samples.
  other = best_of_n.run_best_of_n(_config(batch_size=5, thread_groups=1), str(tmp_path / "a"))
  threads = best_of_n.run_best_of_n(_config(batch_size=4, thread_groups=2), str(tmp_path / "b"))
  want = _samples(workdir)
  assert len(want) == 12 and len({r["response"] for r in want}) > 1
  for run in (other, threads):
    got = _samples(run["workdir"])
    assert [r["response"] for r in got] == [r["response"] for r in want]
    np.testing.assert_allclose([r["reward"] for r in got], [r["reward"] for r in want], atol=1e-6)
    assert [b["response"] for b in run["best"]] == [b["response"] for b in summary["best"]]


def test_each_sample_draws_from_its_own_key(one_thread):
  workdir, _ = one_thread
  rows = _samples(workdir)
  policy = policy_io.load_policy("tiny", max_len=7, key=jax.random.key(0))
  prompt = np.full((1, 1), policy.tok.bos_id, np.int32)
  for r in (0, 5, 11):  # sample r % 4 of prompt r // 4
    out = sampling.sample(
      policy.variables,
      prompt,
      np.ones((1, 1), bool),
      jax.random.fold_in(jax.random.key(0), r)[None],
      config=policy.config,
      max_new_tokens=6,
    )
    response = policy.tok.decode(np.asarray(out.tokens)[0, 1:])
    assert rows[r]["response"] == response, r
    assert (rows[r]["prompt_index"], rows[r]["sample_index"]) == (r // 4, r % 4)


@pytest.mark.parametrize("groups", [0, 3, 2.0])
def test_thread_groups_must_divide_the_batch(groups, tmp_path):
  with pytest.raises(rundir.ConfigError, match=rf"thread_groups={groups}: must be an int >= 1"):
    best_of_n.run_best_of_n(_config(thread_groups=groups), str(tmp_path))
