"""Policy-optimisation loop: PPO, REINFORCE, RLOO or GRPO (:mod:`jaxrm.steps.rl`) against a reward.

:func:`train_and_evaluate` builds a run from a :class:`PolicyTrainConfig` (:func:`build_run`:
policy, reference, reward and prompt sources of :mod:`jaxrm.train.sources`, compiled step)
and trains it (:func:`train`), writing under ``workdir`` (:mod:`jaxrm.io.rundir`):

* ``config.json``; ``metrics.jsonl`` with one row per step (``step`` is the number of steps
  done, 1-based; the metrics of :mod:`jaxrm.steps.rl` plus ``time``) and its learning curves;
* diagnostics (:mod:`jaxrm.steps.rl_diagnostics`, :func:`jaxrm.train.sources.make_reward_source`):
  every row has ``score`` (the reward optimised), ``gold`` (the synthetic world's gold reward
  of the same samples, whenever the policy is the synthetic world's), ``ensemble_std`` (member
  disagreement, ensemble rewards), ``kl_k1`` / ``kl_<estimator>`` / ``kl_exact`` (the KL to
  the reference, the estimator in the key) and ``response_length``. Every ``eval_every``
  steps, at step 0 and at ``steps``, a row with ``split='eval'`` holds the same metrics on a
  fixed prompt batch (``eval_batch_size`` prompts drawn with their own key, sampled with a
  fixed key); ``rl_curves.png`` plots score and gold, the KLs, the response length (and
  ``ensemble_std``) of both splits against the step;
* ``checkpoints/<step>``: the :class:`jaxrm.steps.rl_lib.RLState` (policy and value head,
  optimizer, KL controller, baseline, PRNG key, step) every ``log.checkpoint_every`` steps and
  at the end; the JSON extra holds the config and the last metrics row.

Re-running resumes from the last checkpoint and ends with the parameters of an uninterrupted
run; only ``steps``, the ``log`` and ``samples`` sections and ``parallel`` may differ from the
checkpointed config (:data:`CHANGEABLE_ON_RESUME`, :func:`jaxrm.io.rundir.check_resumable`).

Policies: ``'synthetic'`` (``pi_init`` of the synthetic world of ``world``/``world_seed``, the
same world as the reward-model loop's, :func:`jaxrm.data.pairs.world_for_seed`), a preset
name (a randomly initialised byte-level policy), a local Hugging Face checkpoint folder or an
SFT run directory (text policies with their tokenizer, :mod:`jaxrm.train.policy_text`; the
KL reference is ``reference`` or the starting policy). The steps take the policy's functions
(:func:`jaxrm.models.policy.transformer_policy`).

Samples: every ``samples.every`` steps and at the end, decoded responses (prompt, response,
reward, gold where known) go to ``samples.jsonl`` and a couple to the log
(:mod:`jaxrm.train.samples`).
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

from jaxrm.data import pairs, run_tokenizer, tokenizer
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.models import presets
from jaxrm.models.policy import PolicyModel, transformer_policy
from jaxrm.steps import parallel, rl_diagnostics
from jaxrm.steps import rl as rl_lib
from jaxrm.train import sources
from jaxrm.train.policy_config import (  # noqa: F401  (the config types live beside the loop)
  ADDED_ON_RESUME,
  CHANGEABLE_ON_RESUME,
  PARALLEL_MODES,
  AdamConfig,
  PolicyTrainConfig,
  validate_config,
)
from jaxrm.train.policy_text import PolicySampler, load_text_policy
from jaxrm.train.rm_config import with_matmul_dtype

RL_CURVES_FILE = "rl_curves.png"


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
  policy_config: Any = None  # the policy's TransformerConfig
  text_tokenizer: Any = None  # RunTokenizer of text policies (None: synthetic)
  world: Any = None  # the synthetic world (gold of the samples), or None
  prompt_len: int = 0
  policy_hf: Any = None  # the Hugging Face family the policy descends from, or None
  reward: sources.RewardSource | None = None  # the reward with its diagnostics (gold, ...)
  evaluate: Callable[[Any], dict[str, Any]] | None = None  # policy params -> eval metrics


def build_run(c: PolicyTrainConfig) -> Run:
  """Builds the models, the reward, the prompt source and the compiled step of a config.

  Raises:
    jaxrm.io.rundir.ConfigError: a bad setting, naming it.
  """
  validate_config(c)
  rl_config = dataclasses.replace(c.rl)  # a fresh (hashable) copy, checked
  state_key, init_key, data_key = jax.random.split(jax.random.key(c.seed), 3)
  world = world_cfg = text = None
  text_tok = run_tokenizer.RunTokenizer.from_source(None)
  if c.policy == "synthetic":
    world_cfg = c.world
    world = pairs.world_for_seed(world_cfg, c.world_seed)
    policy_cfg = world_cfg.policy_config()
    prompt_len, tok = world_cfg.prompt_len, "synthetic"
    ref_params = world.policy_params
  elif c.tokenizer or c.reference or c.policy not in presets.PRESETS:
    prompt_len = 1 if c.prompts.source == "bos" else c.prompts.prompt_len
    text = load_text_policy(c, max_len=prompt_len + rl_config.max_new_tokens, key=init_key)
    policy_cfg, ref_params, tok = text.policy.config, text.ref_params, text.policy.tok.name
    text_tok = text.policy.tok
  else:
    prompt_len = 1 if c.prompts.source == "bos" else c.prompts.prompt_len
    policy_cfg = presets.preset(
      c.policy, vocab_size=tokenizer.VOCAB_SIZE, max_len=prompt_len + rl_config.max_new_tokens
    )
    dummy = jnp.zeros((1, policy_cfg.max_len), jnp.int32)
    ref_params = jax.jit(PolicyModel(policy_cfg).init)(init_key, dummy, jnp.ones(dummy.shape, bool))
    tok = "byte"
  policy_cfg = with_matmul_dtype(policy_cfg, c.matmul_dtype)
  eos_id = rl_config.eos_id
  if eos_id is not None and not 0 <= eos_id < policy_cfg.vocab_size:
    raise ConfigError(
      "rl.eos_id", eos_id, f"is outside the policy's vocabulary [0, {policy_cfg.vocab_size})"
    )
  reward = sources.make_reward_source(
    c.reward,
    tokenizer_name=tok,
    vocab_size=policy_cfg.vocab_size,
    seq_len=prompt_len + rl_config.max_new_tokens,
    prompt_len=prompt_len,
    world=world,
    world_cfg=world_cfg,
  )
  reward_fn, reward_params = reward.fn, reward.params
  step_reward_fn, diagnostics_fn, step_reward_params = reward.for_step()
  init_params = ref_params if text is None else text.policy.variables
  if rl_lib.uses_value_head(c.algo):
    init_params = rl_lib.init_value_head(init_params, init_key, config=policy_cfg)
  optimizer = optax.chain(
    optax.clip_by_global_norm(c.optimizer.max_grad_norm), optax.adam(c.optimizer.learning_rate)
  )
  policy = transformer_policy(policy_cfg, value_head=rl_lib.uses_value_head(c.algo))
  step_fn = rl_lib.make_step(
    c.algo,
    policy=policy,
    config=rl_config,
    reward_fn=step_reward_fn,
    optimizer=optimizer,
    diagnostics_fn=diagnostics_fn,
  )
  pstep = parallel.make_parallel_step(rl_lib.with_frozen_params(step_fn), mode=c.parallel)
  prompt_cfg = dataclasses.replace(c.prompts, prompt_len=prompt_len)
  prompts = sources.make_prompts(
    prompt_cfg,
    data_key,
    batch_size=c.batch_size,
    seed=c.seed,
    world_cfg=world_cfg,
    tok=None if world is not None else text_tok,
  )
  evaluate = _make_evaluate(
    c,
    prompt_cfg,
    world_cfg=world_cfg,
    policy=policy,
    rl_config=rl_config,
    reward_fn=step_reward_fn,
    diagnostics_fn=diagnostics_fn,
    reward_params=step_reward_params,
    ref_params=ref_params,
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
    policy_config=policy_cfg,
    text_tokenizer=None if world is not None else text_tok,
    world=world,
    prompt_len=prompt_len,
    policy_hf=None if text is None else text.policy.hf,
    reward=reward,
    evaluate=evaluate,
  )


# split(fold_in(key(seed), EVAL_STREAM)) -> (prompt key, sampling key) of the evaluation: its
# prompts are batch 0 of the run's prompt source under the prompt key (``seed + 1`` orders
# file prompts), sampled with the sampling key at every evaluation.
EVAL_STREAM = 0x5EED


def _make_evaluate(
  c,
  prompt_cfg,
  *,
  world_cfg,
  policy,
  rl_config,
  reward_fn,
  diagnostics_fn,
  reward_params,
  ref_params,
):
  """``evaluate(policy_params) -> metrics`` on the fixed evaluation batch (``eval_*``)."""
  prompt_key, sample_key = jax.random.split(jax.random.fold_in(jax.random.key(c.seed), EVAL_STREAM))
  batch = sources.make_prompts(
    prompt_cfg, prompt_key, batch_size=c.eval_batch_size, seed=c.seed + 1, world_cfg=world_cfg
  )(0)
  fn = jax.jit(
    functools.partial(
      rl_diagnostics.evaluate,
      policy=policy,
      config=rl_config,
      reward_fn=reward_fn,
      diagnostics_fn=diagnostics_fn,
    )
  )
  return lambda params: fn(params, ref_params, reward_params, batch, sample_key)


def initial_state(run: Run) -> rl_lib.RLState:
  """The run's :class:`jaxrm.steps.rl_lib.RLState` at step 0 (also the checkpoint template)."""
  return rl_lib.create_rl_state(
    run.init_params, run.optimizer, run.state_key, kl_coef=run.config.kl_coef
  )


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
  keys = ("score", "gold", "kl_k1", "entropy", "response_length", "kl_coef", "num_skipped")
  return {k: row.get(k) for k in keys if k in row}


def _check_resumable_before_restore(ckpt, c: PolicyTrainConfig, workdir: str) -> None:
  """The resume rule on the newest checkpoint's JSON, before any array is restored (a
  checkpoint of another algorithm or policy would fail inside orbax's restore)."""
  peek = ckpt.latest_extra()
  if peek is not None:
    rundir.check_resumable(
      peek[0].get("config", {}),
      c.to_json(),
      changeable=CHANGEABLE_ON_RESUME,
      added=ADDED_ON_RESUME,
      workdir=workdir,
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
        extra.get("config", {}),
        c.to_json(),
        changeable=CHANGEABLE_ON_RESUME,
        added=ADDED_ON_RESUME,
        workdir=workdir,
      )
      last_row = extra.get("metrics")
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    rundir.truncate_metrics(os.path.join(workdir, rundir.METRICS_FILE), max_step=start)
    rundir.write_config(workdir, c, tokenizer=run.tokenizer)
    if run.text_tokenizer is not None:  # the policy's tokenizer and convention, for readers
      run.text_tokenizer.save(workdir)
    sampler = PolicySampler(run, workdir)
    sampler.writer.truncate(start)
    step_reward_params = run.reward.for_step()[2] if run.reward else run.reward_params
    carry = pstep.put_state((state, step_reward_params, run.ref_params))
    del state
    progress = rundir.Progress(steps, items_per_step=c.batch_size)
    skips = _skip_monitor(c, steps, state=pstep.unreplicate(carry)[0])
    pending = []
    t_start = time.time()
    with rundir.MetricsWriter(workdir, log=c.log, config=c) as writer:
      if start == 0:
        _write_eval(run, writer, 0, pstep.unreplicate(carry)[0].params)
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
        if sampler.writer.due(done, steps):
          t0 = time.perf_counter()
          sampler.write(pstep.unreplicate(carry)[0].params, step=done)
          progress.exclude(time.perf_counter() - t0)
        if c.eval_every and (done % c.eval_every == 0 or done == c.steps):
          t0 = time.perf_counter()
          _write_eval(run, writer, done, pstep.unreplicate(carry)[0].params)
          progress.exclude(time.perf_counter() - t0)
        if done % c.log.checkpoint_every == 0 or done == steps:
          t0 = time.perf_counter()
          host_state = pstep.unreplicate(carry)[0]
          ckpt.save(done, host_state, rundir.checkpoint_extra(c, metrics=last_row))
          progress.exclude(time.perf_counter() - t0)
  if c.log.plots:
    plot_rl_curves(workdir)
  return {
    "steps": steps,
    "resumed_from": start,
    "steps_per_sec": progress.steps_per_sec(steps),
    "final": last_row,
    "skipped_updates": skips.total,
    "workdir": workdir,
  }


def _write_eval(run: Run, writer: rundir.MetricsWriter, step: int, params: Any) -> None:
  """Writes the ``split='eval'`` row of ``step`` (:func:`jaxrm.steps.rl_diagnostics.evaluate`)."""
  if not run.config.eval_every or run.evaluate is None:
    return
  row = rundir.scalar_row(step, jax.device_get(run.evaluate(params)))
  writer.write({**row, "split": "eval"})
  logging.info("eval at step %d: %s", step, _fmt(row))


def plot_rl_curves(workdir: str | os.PathLike) -> str | None:
  """Writes ``rl_curves.png``: score and gold, the KLs, response length (and ensemble_std),
  train and eval splits, against the step (:func:`jaxrm.io.rundir.plot_overlays`)."""
  panels = {
    "reward (score = optimised, gold)": ("score", "gold"),
    "KL to the reference (estimator in key)": ("kl_k1", "kl_k2", "kl_k3", "kl_exact"),
    "response_length": ("response_length",),
    "ensemble_std (member disagreement)": ("ensemble_std",),
  }
  return rundir.plot_overlays(workdir, RL_CURVES_FILE, panels)


def train_and_evaluate(config: PolicyTrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Builds and trains ``config`` in ``workdir`` (resuming if it holds a checkpoint)."""
  return train(build_run(config), workdir)
