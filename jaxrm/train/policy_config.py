"""The settings of a policy-optimisation run (:class:`PolicyTrainConfig`) and their checks.

The loop (:mod:`jaxrm.train.policy`, which re-exports these names) builds and trains a run from
them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from jaxrm.data import pairs, synthetic
from jaxrm.io import rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.models import presets
from jaxrm.steps import rl as rl_lib
from jaxrm.train import samples as samples_lib
from jaxrm.train import sources
from jaxrm.train.policy_text import is_text_policy_source, validate_text_policy
from jaxrm.train.rm_config import DTYPES

PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap")
CHANGEABLE_ON_RESUME = (
  "steps",
  "log",
  "parallel",
  "samples",
  "eval_every",
  "eval_batch_size",
  "max_consecutive_skips",
)
# Fields added after runs were saved without them, with the value those runs computed with
# (:func:`jaxrm.io.rundir.check_resumable`).
ADDED_ON_RESUME = {"matmul_dtype": ""}


def _default_rl() -> rl_lib.RLConfig:
  # The synthetic world's fixed-length responses (12 tokens, no EOS).
  return rl_lib.RLConfig(max_new_tokens=12, eos_id=None, num_minibatches=4)


@dataclasses.dataclass
class AdamConfig:
  """Adam with global-norm gradient clipping."""

  learning_rate: float = 3e-4
  max_grad_norm: float = 1.0


@dataclasses.dataclass
class PolicyTrainConfig:
  """Every setting of a policy-optimisation run.

  Attributes:
    algo: ``'ppo'``, ``'reinforce'``, ``'rloo'`` or ``'grpo'``.
    policy: ``'synthetic'`` or a preset (:data:`jaxrm.models.presets.PRESETS`).
    world: the synthetic world (synthetic policy, synthetic prompts and gold).
    world_seed: its seed (:func:`jaxrm.data.pairs.world_for_seed`).
    reward: the reward source (:class:`jaxrm.train.sources.RewardConfig`).
    prompts: the prompt source (:class:`jaxrm.train.sources.PromptConfig`).
    rl: the algorithms' hyperparameters (:class:`jaxrm.steps.rl_lib.RLConfig`).
    kl_coef: (initial) KL coefficient.
    optimizer: Adam.
    steps: RL iterations (one rollout each).
    batch_size: prompts per step.
    seed: seed of the run (policy init, sampling, prompts).
    parallel: ``'auto'``, ``'jit'``, ``'shard_map'`` or ``'pmap'``.
    log: metrics, checkpoints, plots, TensorBoard / W&B.
    tokenizer: text policies: a folder with ``tokenizer.json`` ('' : the checkpoint's own, the
      SFT run's, or the byte tokenizer of a preset; :func:`jaxrm.io.policy_io.load_policy`).
    reference: the KL reference policy ('' : the starting policy), a source as ``policy``
      with the same architecture and tokenizer.
    samples: decoded samples written to ``samples.jsonl`` and the log
      (:mod:`jaxrm.train.samples`).
    eval_every: period (steps) of the ``split='eval'`` rows on a fixed prompt batch (also at
      step 0 and at ``steps``); 0: never.
    eval_batch_size: prompts of the evaluation batch.
    matmul_dtype: ``''`` (the policy's own compute dtype) or ``'float32'`` / ``'bfloat16'``:
      the dtype the policy's backbone computes in, its parameters' dtype unchanged
      (``'bfloat16'`` with float32 parameters is mixed precision, :mod:`jaxrm.models.precision`;
      an SFT run trained with it keeps it unless this says otherwise). The reference's
      log-probabilities are computed the same way.
    max_consecutive_skips: stop the run (:class:`jaxrm.io.rundir.RunStopped`, naming the last
      good checkpoint) once this many consecutive updates were skipped as non-finite, or
      every update of a shorter run; 0 never stops.
  """

  algo: str = "ppo"
  policy: str = "synthetic"
  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  world_seed: int = 0
  reward: sources.RewardConfig = dataclasses.field(default_factory=sources.RewardConfig)
  prompts: sources.PromptConfig = dataclasses.field(default_factory=sources.PromptConfig)
  rl: rl_lib.RLConfig = dataclasses.field(default_factory=_default_rl)
  kl_coef: float = 0.05
  optimizer: AdamConfig = dataclasses.field(default_factory=AdamConfig)
  steps: int = 100
  batch_size: int = 64
  seed: int = 0
  parallel: str = "auto"
  log: rundir.LogConfig = dataclasses.field(default_factory=rundir.LogConfig)
  tokenizer: str = ""
  reference: str = ""
  samples: samples_lib.SamplesConfig = dataclasses.field(default_factory=samples_lib.SamplesConfig)
  eval_every: int = 50
  eval_batch_size: int = 64
  matmul_dtype: str = ""
  max_consecutive_skips: int = 20

  def to_json(self) -> dict[str, Any]:
    return rundir.config_to_json(self)


def validate_config(c: PolicyTrainConfig, *, num_devices: int | None = None) -> None:
  """Checks every setting; raises :class:`jaxrm.io.rundir.ConfigError` naming the first bad
  one by its dotted path. Checks that need the reward model (tokenizer, lengths) are made by
  :func:`build_run`, with the same error type."""

  need = functools.partial(rundir.check, c)
  rundir.check_finite_fields(c)  # no inf/NaN hyperparameter, whatever its name

  is_int = rundir.is_int
  need(c.algo in rl_lib.ALGORITHMS, "algo", f"must be one of {list(rl_lib.ALGORITHMS)}")
  need(
    c.policy == "synthetic" or c.policy in presets.PRESETS or is_text_policy_source(c.policy),
    "policy",
    f"must be 'synthetic', a preset {sorted(presets.PRESETS)}, a Hugging Face checkpoint "
    "folder or an SFT run directory",
  )
  validate_text_policy(c)
  pairs.validate_world(c.world, field="world")
  need(is_int(c.world_seed) and c.world_seed >= 0, "world_seed", "must be an int >= 0")
  sources.validate_reward_config(c.reward)
  need(
    c.prompts.source in sources.PROMPT_SOURCES,
    "prompts.source",
    f"must be one of {list(sources.PROMPT_SOURCES)}",
  )
  synthetic_policy = c.policy == "synthetic"
  need(
    (c.prompts.source == "synthetic") == synthetic_policy,
    "prompts.source",
    "must be 'synthetic' exactly when the policy is (byte-level policies: 'jsonl' or 'bos')",
  )
  need(
    c.prompts.source != "jsonl" or len(c.prompts.files) > 0,
    "prompts.files",
    "must name JSONL files for prompts.source='jsonl'",
  )
  need(is_int(c.prompts.prompt_len) and c.prompts.prompt_len >= 1, "prompts.prompt_len", ">= 1")
  try:
    dataclasses.replace(c.rl)
  except (TypeError, ValueError) as e:
    raise ConfigError("rl", c.rl, str(e)) from None
  if synthetic_policy:
    need(c.rl.eos_id is None, "rl.eos_id", "must be None for the synthetic policy (fixed length)")
    need(
      c.rl.max_new_tokens <= c.world.response_len,
      "rl.max_new_tokens",
      f"the synthetic world's sequences end after {c.world.response_len} response tokens",
    )
  need(c.kl_coef >= 0, "kl_coef", "must be >= 0")
  need(c.optimizer.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
  need(c.optimizer.max_grad_norm > 0, "optimizer.max_grad_norm", "must be > 0")
  for name in ("steps", "batch_size"):
    need(is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "must be an int >= 1")
  need(is_int(c.seed) and c.seed >= 0, "seed", "must be an int >= 0")
  need(
    is_int(c.max_consecutive_skips) and c.max_consecutive_skips >= 0,
    "max_consecutive_skips",
    "must be an int >= 0 (0: never stop)",
  )
  need(c.parallel in PARALLEL_MODES, "parallel", f"must be one of {list(PARALLEL_MODES)}")
  need(
    c.matmul_dtype in ("", *DTYPES),
    "matmul_dtype",
    f"must be '' (the policy's own) or one of {list(DTYPES)}",
  )
  need(is_int(c.eval_every) and c.eval_every >= 0, "eval_every", "must be an int >= 0")
  need(is_int(c.eval_batch_size) and c.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
  rundir.validate_log_config(c.log)
  devices = jax.device_count() if num_devices is None else num_devices
  shards = 1 if c.parallel == "jit" or (c.parallel == "auto" and devices == 1) else devices
  need(
    c.batch_size % shards == 0,
    "batch_size",
    f"must be divisible by the number of devices ({shards}) in --config.parallel={c.parallel} "
    "mode (or set --config.parallel=jit)",
  )
  if c.algo in ("ppo", "grpo"):
    local = c.batch_size // shards * (c.rl.num_samples if c.algo == "grpo" else 1)
    need(
      local % c.rl.num_minibatches == 0,
      "rl.num_minibatches",
      f"must divide the sequences per device per step ({local})",
    )
