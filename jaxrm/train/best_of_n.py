"""Best-of-n sampling against a reward: n responses per prompt, the highest-reward one kept.

:func:`run_best_of_n` loads a policy (:func:`jaxrm.io.policy_io.load_policy`: a preset, a local
Hugging Face checkpoint with its tokenizer, or an SFT run), takes ``num_prompts`` prompts
(:func:`jaxrm.train.sources.make_prompts`, e.g. the prompts of JSONL preference files encoded
with the policy's tokenizer), samples ``n`` responses to each (KV-cached,
:func:`jaxrm.models.sampling.sample`, stopping at the tokenizer's EOS), scores every sequence
with the reward (:func:`jaxrm.train.sources.make_reward`: a reward-model run, an ensemble of
runs, or a rule) and keeps the best per prompt (Nakano et al. 2021; Gao et al. 2022). It writes
under ``workdir``:

* ``best_of_n.jsonl``: per prompt, the decoded prompt, the chosen response, its reward, and
  the mean and maximum reward of the ``n`` samples;
* ``samples.jsonl``: every sample (:mod:`jaxrm.train.samples` rows with ``prompt_index``,
  ``sample_index`` and ``chosen``), and a couple of chosen ones in the log;
* ``summary.json``: ``n``, the mean reward of the chosen and of all samples, and
  ``kl_bon = log n - (n - 1) / n`` (:func:`jaxrm.math.best_of_n.kl_bon`, the KL of best-of-n
  from the policy, an upper bound);
* ``config.json`` and ``tokenizer/`` (the run tokenizer).

Sampling keys: sample ``j`` of prompt ``i`` draws from its own key, ``fold_in(key(seed), i * n +
j)`` (:func:`jaxrm.models.sampling.sample` with per-example keys), so a run is a function of its
config, and a sample does not depend on ``batch_size`` or ``thread_groups``. ``thread_groups``
splits each sampling call's batch into groups sampled concurrently in host threads: on a CPU
one decode program keeps about one core busy, so 2 groups on 2 cores sample about 1.7x as many
tokens per second (BUILD_NOTES.md, "Issue 14, session 32").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from jaxrm.io import policy_io, rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.math.best_of_n import kl_bon
from jaxrm.models import sampling
from jaxrm.train import samples as samples_lib
from jaxrm.train import sources

BEST_FILE = "best_of_n.jsonl"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class BestOfNConfig:
  """Every setting of a best-of-n run.

  Attributes:
    policy: a preset, a Hugging Face checkpoint folder or an SFT run directory.
    tokenizer: a folder with ``tokenizer.json`` ('' : the policy's own).
    prompts: the prompt source (``'jsonl'`` files or ``'bos'``).
    reward: the reward (``source='rm'`` with ``rm_dirs``; several make an ensemble).
    num_prompts: prompts (the first of the seeded permutation of the files' prompts).
    n: samples per prompt.
    max_new_tokens: response length budget.
    temperature: sampling temperature.
    stop_at_eos: end a response at the tokenizer's EOS (else exactly ``max_new_tokens``).
    batch_size: sequences per sampling call.
    thread_groups: host threads per sampling call, each sampling ``batch_size /
      thread_groups`` of its sequences (the same samples; faster on a multi-core CPU).
    seed: seed of the prompt order and the samples.
    samples: how many chosen samples are logged (``samples.log``).
  """

  policy: str = "tiny"
  tokenizer: str = ""
  prompts: sources.PromptConfig = dataclasses.field(
    default_factory=lambda: sources.PromptConfig(source="jsonl", prompt_len=64)
  )
  reward: sources.RewardConfig = dataclasses.field(
    default_factory=lambda: sources.RewardConfig(source="rm")
  )
  num_prompts: int = 8
  n: int = 16
  max_new_tokens: int = 64
  temperature: float = 1.0
  stop_at_eos: bool = True
  batch_size: int = 64
  thread_groups: int = 1
  seed: int = 0
  samples: samples_lib.SamplesConfig = dataclasses.field(
    default_factory=lambda: samples_lib.SamplesConfig(every=1, log=2)
  )

  def to_json(self) -> dict[str, Any]:
    return rundir.config_to_json(self)


def validate_config(c: BestOfNConfig) -> None:
  """Raises :class:`ConfigError` naming the first bad setting."""
  need = functools.partial(rundir.check, c)
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  need(
    bool(policy_io.policy_kind(c.policy)),
    "policy",
    "must be a preset, a Hugging Face "
    "checkpoint folder (config.json) or an SFT run directory (checkpoints/)",
  )
  need(
    not c.tokenizer or os.path.isfile(os.path.join(c.tokenizer, "tokenizer.json")),
    "tokenizer",
    "must be '' or a folder with tokenizer.json",
  )
  need(c.prompts.source in ("jsonl", "bos"), "prompts.source", "must be 'jsonl' or 'bos'")
  need(
    c.prompts.source != "jsonl" or len(c.prompts.files) > 0,
    "prompts.files",
    "must name JSONL files for prompts.source='jsonl'",
  )
  need(is_int(c.prompts.prompt_len) and c.prompts.prompt_len >= 1, "prompts.prompt_len", ">= 1")
  sources.validate_reward_config(c.reward)
  need(c.reward.source != "synthetic_gold", "reward.source", "needs the synthetic policy")
  for name in ("num_prompts", "n", "max_new_tokens", "batch_size"):
    need(is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "must be an int >= 1")
  need(
    is_int(c.thread_groups) and c.thread_groups >= 1 and c.batch_size % c.thread_groups == 0,
    "thread_groups",
    f"must be an int >= 1 that divides batch_size={c.batch_size}",
  )
  need(c.temperature > 0, "temperature", "must be > 0")
  need(isinstance(c.stop_at_eos, bool), "stop_at_eos", "must be True or False")
  need(is_int(c.seed) and c.seed >= 0, "seed", "must be an int >= 0")
  samples_lib.validate_samples_config(c.samples)


def sample_keys(seed: int, num_samples: int) -> jax.Array:
  """``[num_samples]`` keys: row ``r`` (sample ``r % n`` of prompt ``r // n``) draws from
  ``fold_in(key(seed), r)``."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
    jax.random.key(seed), np.arange(num_samples, dtype=np.uint32)
  )


def _sample_all(policy, prompts, mask, c: BestOfNConfig, eos_id):
  """All ``[num_prompts * n]`` samples, prompt-major (row ``i * n + j``), in calls of
  ``batch_size`` sequences (the last one padded with copies of its first row)."""
  tokens = np.repeat(prompts, c.n, axis=0)
  masks = np.repeat(mask, c.n, axis=0)
  keys = sample_keys(c.seed, tokens.shape[0])
  calls = -(-tokens.shape[0] // c.batch_size)
  progress = rundir.Progress(calls, items_per_step=c.batch_size)
  outs = []
  for i, start in enumerate(range(0, tokens.shape[0], c.batch_size)):
    index = np.arange(start, start + c.batch_size)
    index = np.where(index < tokens.shape[0], index, start)  # one compiled shape
    out = sampling.sample(
      policy.variables,
      tokens[index],
      masks[index],
      keys[index],
      config=policy.config,
      max_new_tokens=c.max_new_tokens,
      temperature=c.temperature,
      eos_id=eos_id,
      thread_groups=c.thread_groups,
    )
    real = min(c.batch_size, tokens.shape[0] - start)
    outs.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], jax.device_get(out)))
    progress.start(1)  # the first call compiled
    logging.info("%s", progress.line(i + 1, unit="samples"))
  return sampling.SampleOutput(*(np.concatenate(xs) for xs in zip(*outs)))


def run_best_of_n(config: BestOfNConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs best-of-n (see the module docstring); returns the summary.

  Raises:
    ConfigError: a bad setting, a policy that cannot be loaded, or a reward model whose
      tokenizer or length does not fit the policy's sequences (naming the field).
  """
  validate_config(config)
  c = config
  workdir = rundir.prepare(workdir)
  prompt_len = 1 if c.prompts.source == "bos" else c.prompts.prompt_len
  seq_len = prompt_len + c.max_new_tokens
  try:
    policy = policy_io.load_policy(
      c.policy, max_len=seq_len, tokenizer=c.tokenizer, key=jax.random.key(c.seed)
    )
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise ConfigError("policy", c.policy, str(e)) from None
  tok = policy.tok
  tok.save(workdir)
  reward_fn, reward_params = sources.make_reward(
    c.reward,
    tokenizer_name=tok.name,
    vocab_size=policy.config.vocab_size,
    seq_len=seq_len,
    prompt_len=prompt_len,
  )
  prompt_cfg = dataclasses.replace(c.prompts, prompt_len=prompt_len)
  batch = sources.make_prompts(
    prompt_cfg,
    jax.random.key(c.seed),
    batch_size=c.num_prompts,
    seed=c.seed,
    tok=tok,
    distinct_field="num_prompts",  # each prompt once
  )(0)
  rundir.write_config(workdir, c, tokenizer=tok.name, policy_kind=policy.kind)
  eos_id = tok.eos_id if c.stop_at_eos else None
  logging.info(
    "Best-of-%d of %s (%s) on %d prompts: %d samples of up to %d tokens",
    c.n,
    c.policy,
    tok.name,
    c.num_prompts,
    c.num_prompts * c.n,
    c.max_new_tokens,
  )
  out = _sample_all(policy, batch["prompts"], batch["prompt_mask"], c, eos_id)
  score = jax.jit(reward_fn)
  rewards = np.concatenate(
    [
      np.asarray(
        score(reward_params, out.tokens[s : s + c.batch_size], out.mask[s : s + c.batch_size])
      )
      for s in range(0, out.tokens.shape[0], c.batch_size)
    ]
  )
  grid = rewards.reshape(c.num_prompts, c.n)
  best = grid.argmax(axis=1)
  rows = samples_lib.decode_samples(out.tokens, out.mask, out.response_mask, tok.decode)
  chosen = np.zeros(rewards.shape, bool)
  chosen[np.arange(c.num_prompts) * c.n + best] = True
  open(os.path.join(workdir, samples_lib.SAMPLES_FILE), "w").close()  # a run rewrites its files
  writer = samples_lib.SampleWriter(workdir, dataclasses.replace(c.samples, log=0))
  writer.write(
    0,
    rows,
    rewards=rewards,
    prompt_index=np.repeat(np.arange(c.num_prompts), c.n),
    sample_index=np.tile(np.arange(c.n), c.num_prompts),
    chosen=chosen,
  )
  best_rows = []
  for i in range(c.num_prompts):
    row = rows[i * c.n + int(best[i])]
    best_rows.append(
      {
        "prompt_index": i,
        "prompt": row["prompt"],
        "response": row["response"],
        "response_tokens": row["response_tokens"],
        "reward": float(grid[i, best[i]]),
        "mean_reward": float(grid[i].mean()),
        "n": c.n,
      }
    )
  rundir.atomic_write(
    os.path.join(workdir, BEST_FILE),
    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in best_rows),
  )
  for r in best_rows[: c.samples.log]:
    logging.info(
      "best of %d for prompt %d | reward %.4g (mean %.4g) | %d tokens\n  prompt: %r\n  "
      "response: %r",
      c.n,
      r["prompt_index"],
      r["reward"],
      r["mean_reward"],
      r["response_tokens"],
      samples_lib.shorten(r["prompt"], c.samples.max_chars),
      r["response"],
    )
  summary = {
    "n": c.n,
    "num_prompts": c.num_prompts,
    "mean_reward_best": float(grid.max(axis=1).mean()),
    "mean_reward_all": float(grid.mean()),
    "kl_bon": float(kl_bon(c.n)),
    "mean_response_tokens_best": float(np.mean([r["response_tokens"] for r in best_rows])),
    "mean_response_tokens_all": float(np.mean([r["response_tokens"] for r in rows])),
  }
  rundir.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  logging.info(
    "best-of-%d: mean reward %.4g (all samples %.4g), KL_bon <= %.3f nats; wrote %s",
    c.n,
    summary["mean_reward_best"],
    summary["mean_reward_all"],
    summary["kl_bon"],
    os.path.join(workdir, BEST_FILE),
  )
  return {**summary, "workdir": workdir, "best": best_rows}
