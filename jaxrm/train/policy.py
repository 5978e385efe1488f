"""Policy-optimisation loop: PPO, REINFORCE, RLOO or GRPO (:mod:`jaxrm.steps.rl`) against a reward.

:func:`train_and_evaluate` builds a run from a :class:`PolicyTrainConfig` (:func:`build_run`:
policy, reference, reward and prompt sources of :mod:`jaxrm.train.sources`, compiled step)
and trains it (:func:`train`), writing under ``workdir`` (:mod:`jaxrm.io.rundir`):

* ``config.json``; ``metrics.jsonl`` with one row per step (``step`` is the number of steps
  done, 1-based; the metrics of :mod:`jaxrm.steps.rl` plus ``time``) and its learning curves;
* ``checkpoints/<step>``: the :class:`jaxrm.steps.rl_lib.RLState` (policy and value head,
  optimizer, KL controller, baseline, PRNG key, step) every ``log.checkpoint_every`` steps and
  at the end; the JSON extra holds the config and the last metrics row.

Re-running resumes from the last checkpoint and ends with the parameters of an uninterrupted
run; only ``steps``, the ``log`` section and ``parallel`` may differ from the checkpointed
config (:data:`CHANGEABLE_ON_RESUME`, :func:`jaxrm.io.rundir.check_resumable`).

Policies: ``'synthetic'`` (``pi_init`` of the synthetic world of ``world``/``world_seed``, the
same world as the reward-model loop's, :func:`jaxrm.data.pairs.world_for_seed`) or a preset
name (a randomly initialised byte-level policy). The steps take the policy's functions
(:func:`jaxrm.models.policy.transformer_policy`).
"""

from collections.abc import Callable
import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrm.data import pairs, synthetic, tokenizer
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.models import presets
from jaxrm.models.policy import PolicyModel, transformer_policy
from jaxrm.steps import parallel
from jaxrm.steps import rl as rl_lib
from jaxrm.train import sources

PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap")
CHANGEABLE_ON_RESUME = ("steps", "log", "parallel", "max_consecutive_skips")


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
  max_consecutive_skips: int = 20

  def to_json(self) -> dict[str, Any]:
    return rundir.config_to_json(self)


def validate_config(c: PolicyTrainConfig, *, num_devices: int | None = None) -> None:
  """Checks every setting; raises :class:`jaxrm.io.rundir.ConfigError` naming the first bad
  one by its dotted path. Checks that need the reward model (tokenizer, lengths) are made by
  :func:`build_run`, with the same error type."""

  need = functools.partial(rundir.check, c)
  rundir.check_finite_fields(c)  # no inf/NaN hyperparameter, whatever its name

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  need(c.algo in rl_lib.ALGORITHMS, "algo", f"must be one of {list(rl_lib.ALGORITHMS)}")
  need(
    c.policy == "synthetic" or c.policy in presets.PRESETS,
    "policy",
    f"must be 'synthetic' or a preset: {sorted(presets.PRESETS)}",
  )
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


@dataclasses.dataclass
class Run:
  """Everything built from a config: models, reward, prompts and the compiled step."""

  config: PolicyTrainConfig
  tokenizer: str  # 'synthetic' or 'byte'
  init_params: Any  # policy (with the value head for PPO)
  ref_params: Any
  reward_fn: Callable[..., jax.Array]
  reward_params: Any
  optimizer: optax.GradientTransformation
  prompts: Callable[[int], dict[str, np.ndarray]]  # step -> batch
  pstep: parallel.ParallelStep
  state_key: jax.Array


def build_run(c: PolicyTrainConfig) -> Run:
  """Builds the models, the reward, the prompt source and the compiled step of a config.

  Raises:
    jaxrm.io.rundir.ConfigError: a bad setting, naming it.
  """
  validate_config(c)
  rl_config = dataclasses.replace(c.rl)  # a fresh (hashable) copy, checked
  state_key, init_key, data_key = jax.random.split(jax.random.key(c.seed), 3)
  world = world_cfg = None
  if c.policy == "synthetic":
    world_cfg = c.world
    world = pairs.world_for_seed(world_cfg, c.world_seed)
    policy_cfg = world_cfg.policy_config()
    prompt_len, tok = world_cfg.prompt_len, "synthetic"
    ref_params = world.policy_params
  else:
    prompt_len = 1 if c.prompts.source == "bos" else c.prompts.prompt_len
    policy_cfg = presets.preset(
      c.policy, vocab_size=tokenizer.VOCAB_SIZE, max_len=prompt_len + rl_config.max_new_tokens
    )
    dummy = jnp.zeros((1, policy_cfg.max_len), jnp.int32)
    ref_params = jax.jit(PolicyModel(policy_cfg).init)(init_key, dummy, jnp.ones(dummy.shape, bool))
    tok = "byte"
  reward_fn, reward_params = sources.make_reward(
    c.reward,
    tokenizer_name=tok,
    vocab_size=policy_cfg.vocab_size,
    seq_len=prompt_len + rl_config.max_new_tokens,
    prompt_len=prompt_len,
    world=world,
    world_cfg=world_cfg,
  )
  init_params = ref_params
  if rl_lib.uses_value_head(c.algo):
    init_params = rl_lib.init_value_head(ref_params, init_key, config=policy_cfg)
  optimizer = optax.chain(
    optax.clip_by_global_norm(c.optimizer.max_grad_norm), optax.adam(c.optimizer.learning_rate)
  )
  policy = transformer_policy(policy_cfg, value_head=rl_lib.uses_value_head(c.algo))
  step_fn = rl_lib.make_step(
    c.algo, policy=policy, config=rl_config, reward_fn=reward_fn, optimizer=optimizer
  )
  pstep = parallel.make_parallel_step(rl_lib.with_frozen_params(step_fn), mode=c.parallel)
  prompt_cfg = dataclasses.replace(c.prompts, prompt_len=prompt_len)
  prompts = sources.make_prompts(
    prompt_cfg, data_key, batch_size=c.batch_size, seed=c.seed, world_cfg=world_cfg
  )
  return Run(
    config=c,
    tokenizer=tok,
    init_params=init_params,
    ref_params=ref_params,
    reward_fn=reward_fn,
    reward_params=reward_params,
    optimizer=optimizer,
    prompts=prompts,
    pstep=pstep,
    state_key=state_key,
  )


def initial_state(run: Run) -> rl_lib.RLState:
  """The run's :class:`jaxrm.steps.rl_lib.RLState` at step 0 (also the checkpoint template)."""
  return rl_lib.create_rl_state(
    run.init_params, run.optimizer, run.state_key, kl_coef=run.config.kl_coef
  )


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
  keys = ("score", "kl", "entropy", "response_length", "kl_coef", "num_skipped")
  return {k: row.get(k) for k in keys if k in row}


def _check_resumable_before_restore(ckpt, c: PolicyTrainConfig, workdir: str) -> None:
  """The resume rule on the newest checkpoint's JSON, before any array is restored (a
  checkpoint of another algorithm or policy would fail inside orbax's restore)."""
  peek = ckpt.latest_extra()
  if peek is not None:
    rundir.check_resumable(
      peek[0].get("config", {}), c.to_json(), changeable=CHANGEABLE_ON_RESUME, workdir=workdir
    )


def _skip_monitor(c: PolicyTrainConfig, steps: int, *, state) -> rundir.SkipMonitor:
  skipped = int(np.asarray(jax.device_get(state.num_skipped)))
  return rundir.SkipMonitor(c.max_consecutive_skips, total_steps=steps, skipped=skipped)


def _count_skip(skips: rundir.SkipMonitor, row: dict[str, Any], ckpt, *, raise_nonfinite) -> None:
  """Feeds one metrics row to the skip monitor; raises :class:`jaxrm.io.rundir.RunStopped`
  (naming the last good checkpoint) in ``raise`` mode or when too many skipped in a row."""
  last = rundir.describe_checkpoint(ckpt.latest_step(), ckpt.directory)
  if raise_nonfinite and row["nonfinite"]:
    raise rundir.RunStopped(
      f"non-finite update at step {row['step']} (--config.rl.nonfinite=raise; the state "
      f"before it is that of step {row['step'] - 1}); last good checkpoint: {last}"
    )
  skips.update(row["step"], bool(row["nonfinite"]), last_checkpoint=last)


def train(run: Run, workdir: str | os.PathLike, *, steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) ``run`` in ``workdir`` until ``steps`` (default ``config.steps``).

  Returns:
    A summary: ``steps``, ``resumed_from``, ``steps_per_sec`` (without compilation),
    ``final`` (the last metrics row) and ``workdir``.

  Raises:
    jaxrm.io.rundir.ConfigError: ``workdir`` holds a checkpoint of another config.
    jaxrm.io.rundir.RunStopped: with ``rl.nonfinite='raise'`` at the first non-finite update,
      or after ``max_consecutive_skips`` skipped updates in a row (naming the last good
      checkpoint).
  """
  c = run.config
  steps = c.steps if steps is None else steps
  workdir = rundir.prepare(workdir)
  pstep = run.pstep
  state = initial_state(run)
  start, last_row = 0, None
  raise_nonfinite = c.rl.nonfinite == "raise"
  with checkpoint_lib.CheckpointManager(
    os.path.join(workdir, rundir.CHECKPOINT_DIR), max_to_keep=c.log.keep_checkpoints
  ) as ckpt:
    _check_resumable_before_restore(ckpt, c, workdir)
    restored = ckpt.restore_latest(template=state)
    if restored is not None:
      state, extra, start = restored
      rundir.check_resumable(
        extra.get("config", {}), c.to_json(), changeable=CHANGEABLE_ON_RESUME, workdir=workdir
      )
      last_row = extra.get("metrics")
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    rundir.truncate_metrics(os.path.join(workdir, rundir.METRICS_FILE), max_step=start)
    rundir.write_config(workdir, c, tokenizer=run.tokenizer)
    carry = pstep.put_state((state, run.reward_params, run.ref_params))
    del state
    progress = rundir.Progress(steps, items_per_step=c.batch_size)
    skips = _skip_monitor(c, steps, state=pstep.unreplicate(carry)[0])
    pending = []
    t_start = time.time()
    with rundir.MetricsWriter(workdir, log=c.log, config=c) as writer:
      for step in range(start, steps):
        carry, metrics = pstep(carry, pstep.shard_batch(run.prompts(step)))
        pending.append((step + 1, metrics))
        done = step + 1
        log_now = done % c.log.log_every == 0 or done == steps
        if raise_nonfinite or log_now or done % c.log.checkpoint_every == 0 or done == start + 1:
          for s, m in jax.device_get(pending):
            last_row = rundir.scalar_row(s, pstep.unreplicate(m))
            last_row["time"] = time.time() - t_start
            writer.write(last_row)
            _count_skip(skips, last_row, ckpt, raise_nonfinite=raise_nonfinite)
          pending.clear()
          progress.start(done)  # after the first (compiling) step of this process
          if log_now:
            logging.info("%s", progress.line(done, _fmt(last_row), unit="prompts"))
        if done % c.log.checkpoint_every == 0 or done == steps:
          t0 = time.perf_counter()
          host_state = pstep.unreplicate(carry)[0]
          ckpt.save(done, host_state, rundir.checkpoint_extra(c, metrics=last_row))
          progress.exclude(time.perf_counter() - t0)
  return {
    "steps": steps,
    "resumed_from": start,
    "steps_per_sec": progress.steps_per_sec(steps),
    "final": last_row,
    "skipped_updates": skips.total,
    "workdir": workdir,
  }


def train_and_evaluate(config: PolicyTrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Builds and trains ``config`` in ``workdir`` (resuming if it holds a checkpoint)."""
  return train(build_run(config), workdir)
