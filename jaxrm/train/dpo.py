"""DPO-family training loop: preference pairs in; a policy, its implicit reward model's report
and (synthetic world) best-of-n gold out.

:func:`train_and_evaluate` trains a policy with a direct preference loss (DPO, conservative
DPO, IPO, SimPO or KTO; :class:`jaxrm.train.dpo_config.DPOTrainConfig`) on the pairs of the
reward-model loop (:func:`jaxrm.data.pairs.load_data`: the synthetic world's gold-labelled
comparisons, or JSONL files tokenised into a TFDS dataset with the byte tokenizer), batched by
the same resumable :class:`jaxrm.data.BatchIterator`, with :func:`jaxrm.steps.dpo.dpo_step`
launched by :func:`jaxrm.steps.parallel.make_parallel_step`. The reference log-probs are
computed in the step from the frozen reference parameters (the initial policy).

Sequences are ``[prompt, response]`` right-padded, the prompt the first ``prompt_len`` tokens
(the data's per-pair ``prompt_len``); the losses sum log-probs over the response tokens. KTO
turns each pair into a desirable example (its chosen sequence) and an undesirable one (its
rejected sequence); the KL reference point uses each example's prompt with the previous
example's response (:func:`mismatched_completions`, truncated to the batch length).

Everything about a run lives under ``workdir`` (:mod:`jaxrm.io.rundir`, as the reward-model
loop): ``config.json``; ``metrics.jsonl`` with ``split='train'`` rows every ``log.log_every``
steps (means since the previous row of the step's metrics: loss, implicit-reward accuracy and
margin, ...) and ``split='eval'`` rows every ``eval.every`` steps, at every checkpoint and at
the end (the held-out metrics of the implicit reward model
``beta * log pi / pi_ref``, :func:`jaxrm.io.report.heldout_metrics`); learning curves;
``checkpoints/<step>`` (the :class:`jaxrm.steps.train_state.TrainState` and the data
position); at the end the reward-model report of the implicit reward model
(:mod:`jaxrm.io.report`: accuracy against the labels, calibration, reward statistics, length
bias, accuracy against gold on the synthetic world) and ``results.json`` (the final held-out
metrics and, on the synthetic world, best-of-n against the implicit reward: the expected gold
of best-of-n of ``pi_init`` samples for each n, and the gold of the DPO policy's own samples).

Resuming: re-running in a workdir with a checkpoint restores it and continues with the batch
an uninterrupted run would take next; the parameters end bitwise equal to an uninterrupted
run's. Only ``eval``, ``log``, ``parallel``, ``microbatch_size`` and ``nonfinite`` may differ
from the checkpointed config (:data:`jaxrm.train.dpo_config.CHANGEABLE_ON_RESUME`).

Randomness: a preset policy is initialised from ``fold_in(key(seed), 0)``; step keys from
``fold_in(key(seed), 1)``; the data order from ``seed``; best-of-n from
``fold_in(key(seed), BON_STREAM)``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxrm.data import pairs, synthetic
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import report as report_lib
from jaxrm.io import rm_io, rundir
from jaxrm.math import best_of_n as bon_lib
from jaxrm.models import presets
from jaxrm.models.policy import PolicyModel
from jaxrm.steps import dpo as dpo_steps
from jaxrm.steps import microbatch, parallel
from jaxrm.steps import train_state as train_state_lib
from jaxrm.train import rm_config, rm_eval
from jaxrm.train.dpo_config import (  # noqa: F401  (the config types live beside the loop's API)
  ADDED_ON_RESUME,
  CHANGEABLE_ON_RESUME,
  LOSSES,
  DPOEvalConfig,
  DPOLossConfig,
  DPOTrainConfig,
  validate_config,
)

RESULTS_FILE = "results.json"
BON_STREAM = 0xB0B


# ----------------------------------------------------------------------------- batches
def response_mask(mask: np.ndarray, prompt_len: np.ndarray) -> np.ndarray:
  """``[b, s]`` bool: the real tokens at positions ``>= prompt_len`` of each row."""
  return np.asarray(mask, bool) & (np.arange(mask.shape[1])[None, :] >= prompt_len[:, None])


def mismatched_completions(
  tokens: np.ndarray, mask: np.ndarray, prompt_len: np.ndarray
) -> dict[str, np.ndarray]:
  """KTO's mismatched pairs for right-padded ``[prompt, response]`` rows: row ``i``'s prompt
  followed by row ``i - 1``'s response (cyclic), truncated to the row length.

  Returns:
    ``{'kl_tokens', 'kl_mask', 'kl_response_mask'}``, each ``[b, s]``.
  """
  b, s = tokens.shape
  lengths = np.asarray(mask, bool).sum(1)
  kl_tokens = np.zeros_like(tokens)
  kl_mask = np.zeros((b, s), bool)
  kl_resp = np.zeros((b, s), bool)
  for i in range(b):
    j = (i - 1) % b
    seq = np.concatenate([tokens[i, : prompt_len[i]], tokens[j, prompt_len[j] : lengths[j]]])[:s]
    kl_tokens[i, : len(seq)] = seq
    kl_mask[i, : len(seq)] = True
    kl_resp[i, prompt_len[i] : len(seq)] = True
  return {"kl_tokens": kl_tokens, "kl_mask": kl_mask, "kl_response_mask": kl_resp}


def step_batch(batch: dict[str, np.ndarray], loss: str) -> dict[str, np.ndarray]:
  """The :func:`jaxrm.steps.dpo.dpo_step` batch (without reference log-probs) of an iterator
  batch of pairs: paired with response masks, or (``'kto'``) unpaired: the ``b`` chosen
  sequences (desirable) then the ``b`` rejected ones, with their mismatched completions."""
  prompt_len = np.asarray(batch["prompt_len"], np.int32)
  rc = response_mask(batch["chosen_mask"], prompt_len)
  rr = response_mask(batch["rejected_mask"], prompt_len)
  if loss != "kto":
    return {
      "chosen": batch["chosen"],
      "chosen_mask": batch["chosen_mask"],
      "rejected": batch["rejected"],
      "rejected_mask": batch["rejected_mask"],
      "chosen_response_mask": rc,
      "rejected_response_mask": rr,
    }
  b = prompt_len.shape[0]
  tokens = np.concatenate([batch["chosen"], batch["rejected"]])
  mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]]).astype(bool)
  both_prompt_len = np.concatenate([prompt_len, prompt_len])
  return {
    "tokens": tokens,
    "mask": mask,
    "response_mask": np.concatenate([rc, rr]),
    "desirable": np.arange(2 * b) < b,
    **mismatched_completions(tokens, mask, both_prompt_len),
  }


def _train_step(
  carry,
  batch,
  *,
  apply_fn,
  config: dpo_steps.DPOConfig,
  optimizer,
  microbatch_size: int = 0,
  axis_name=None,
):
  """``((state, ref_params), batch) -> ((state, ref_params), metrics)``: the reference
  log-probs of the batch, then :func:`jaxrm.steps.dpo.dpo_step`. ``microbatch_size`` pairs
  (0: the whole batch) per slice of both (KTO: twice as many examples)."""
  state, ref_params = carry
  kto = config.loss == "kto"
  size = microbatch_size * (2 if kto else 1) or None
  if config.loss != "simpo":
    add = functools.partial(
      dpo_steps.add_reference_logps, ref_params=ref_params, apply_fn=apply_fn, loss=config.loss
    )
    b = jnp.shape(batch["tokens" if kto else "chosen"])[0]
    k = microbatch.num_slices(size, b, unit="examples" if kto else "pairs")
    batch = add(batch) if k == 1 else microbatch.join(lax.map(add, microbatch.split(batch, k)))
  state, metrics = dpo_steps.dpo_step(
    state,
    batch,
    apply_fn=apply_fn,
    config=config,
    optimizer=optimizer,
    axis_name=axis_name,
    microbatch_size=size,
  )
  return (state, ref_params), metrics


# ----------------------------------------------------------------------------- the run
def _policy(c: DPOTrainConfig, data: pairs.RunData):
  """``(apply_fn, params, model_config, world, prompt_len)``; ``world`` and ``prompt_len``
  (the fixed prompt length) are None for JSONL data."""
  if c.data.is_synthetic:
    s = c.data.synthetic
    world = pairs.world_for_seed(s.world, s.seed)
    model_config = rm_config.with_matmul_dtype(s.world.policy_config(), c.matmul_dtype)
    return (
      PolicyModel(model_config).apply,
      world.policy_params,
      model_config,
      world,
      s.world.prompt_len,
    )
  model_config = presets.preset(c.policy, vocab_size=data.vocab_size, max_len=data.max_len)
  model_config = rm_config.with_matmul_dtype(model_config, c.matmul_dtype)
  model = PolicyModel(model_config)
  dummy = jnp.zeros((1, min(data.max_len, 8)), jnp.int32)
  key = jax.random.fold_in(jax.random.key(c.seed), 0)
  params = jax.jit(model.init)(key, dummy, jnp.ones(dummy.shape, bool))
  return model.apply, params, model_config, None, None


def bon_ns(num_samples: int) -> np.ndarray:
  """``1, 2, 4, ...`` up to ``num_samples`` (and ``num_samples`` itself)."""
  ns = [1 << k for k in range(num_samples.bit_length()) if 1 << k <= num_samples]
  return np.unique(np.asarray(ns + [num_samples]))


def best_of_n_gold(
  params: Any,
  ref_params: Any,
  *,
  world: synthetic.World,
  world_cfg: synthetic.WorldConfig,
  reward_fn: Any,
  num_prompts: int,
  num_samples: int,
  key: jax.Array,
) -> dict[str, Any]:
  """Best-of-n of ``pi_init`` samples ranked by the implicit reward, scored by gold.

  ``num_prompts`` world prompts, ``num_samples`` ``pi_init`` samples each; for each ``n`` in
  :func:`bon_ns` the unbiased estimate of best-of-n's expected gold and implicit reward
  (:func:`jaxrm.math.best_of_n.batched_best_of_n_expected_reward`), ``kl_bon(n)``, and the mean
  gold of ``num_samples`` samples per prompt from the trained policy itself.
  """
  kp, ks, kd = jax.random.split(key, 3)
  prompts = synthetic.sample_prompts(world_cfg, kp, num_prompts)
  prompts = jnp.repeat(prompts, num_samples, axis=0)
  sample = jax.jit(
    lambda p, k, pp: synthetic.sample_responses(world, world_cfg, p, k, policy_params=pp)
  )
  gold_fn = jax.jit(lambda t, m: synthetic.gold_reward(world, world_cfg, t, m))
  tokens, mask = sample(prompts, ks, world.policy_params)
  implicit = jax.jit(reward_fn)((params, ref_params), tokens, mask)
  gold = gold_fn(tokens, mask)
  shape = (num_prompts, num_samples)
  ns = bon_ns(num_samples)
  gold_n, implicit_n = bon_lib.batched_best_of_n_expected_reward(
    implicit.reshape(shape), gold.reshape(shape), ns
  )
  policy_tokens, policy_mask = sample(prompts, kd, params)
  return rundir.to_json(
    {
      "ns": ns,
      "kl_bon": np.asarray(bon_lib.kl_bon(ns)),
      "gold": np.asarray(gold_n),
      "implicit_reward": np.asarray(implicit_n),
      "pi_init_gold": float(jnp.mean(gold)),
      "policy_gold": float(jnp.mean(gold_fn(policy_tokens, policy_mask))),
      "num_prompts": num_prompts,
      "samples_per_prompt": num_samples,
    }
  )


def _mean_row(fetched: list[dict[str, Any]]) -> dict[str, Any]:
  row = {}
  for k in fetched[0]:
    values = [np.asarray(m[k]) for m in fetched]
    if k == "nonfinite":
      row["nonfinite_steps"] = int(sum(bool(v) for v in values))
    elif k == "num_skipped":
      row[k] = int(values[-1])
    else:
      row[k] = float(np.mean(values))
  return row


def train_and_evaluate(
  config: DPOTrainConfig, workdir: str | os.PathLike, *, until: int | None = None
) -> dict[str, Any]:
  """Trains (or resumes) a DPO-family run; see the module docstring.

  Args:
    config: the run's settings (validated with :func:`validate_config`).
    workdir: the run directory (created if needed).
    until: stop after this step with a checkpoint, as an interrupted run would (the
      schedule stays that of ``config.steps``; no report, best-of-n or results); re-running
      resumes. Default: ``config.steps``.

  Returns:
    A summary: ``step``, ``resumed_from`` (or None), ``train`` (the last training row),
    ``eval`` (the last held-out implicit-reward metrics or None), ``pairs_per_sec``,
    ``report`` (the written report paths or None), ``best_of_n`` (or None) and ``workdir``.

  Raises:
    jaxrm.io.rundir.ConfigError: a bad setting, naming it.
    jaxrm.data.PreferenceDataError: a malformed data line (file, line, field).
    FloatingPointError: with ``nonfinite='raise'``, at the first non-finite step.
  """
  c = config
  validate_config(c)
  until = c.steps if until is None else until
  if not (isinstance(until, int) and 1 <= until <= c.steps):
    raise ValueError(f"until must be an int in [1, steps={c.steps}], got {until!r}")
  workdir = rundir.prepare(workdir)
  data = pairs.load_data(c.data, workdir)
  apply_fn, ref_params, model_config, world, prompt_len = _policy(c, data)
  optimizer, schedule = rm_config.make_optimizer(c)
  step_config = c.loss.step_config(c.nonfinite)
  train_iter = pairs.train_iterator(c, data)
  host_state = train_state_lib.create_train_state(
    ref_params, optimizer, jax.random.fold_in(jax.random.key(c.seed), 1)
  )
  description = {
    "model_config": rm_io.config_to_json(model_config),
    "tokenizer": data.tokenizer,
    "policy": c.policy,
    "dataset": {k: v for k, v in data.info.items() if k != "read_stats"},
  }
  implicit = dpo_steps.implicit_reward_fn(apply_fn, beta=c.loss.beta, prompt_len=prompt_len)
  has_test = data.test is not None
  log = c.log
  with checkpoint_lib.CheckpointManager(
    os.path.join(workdir, rundir.CHECKPOINT_DIR), max_to_keep=log.keep_checkpoints
  ) as ckpt:
    restored = ckpt.restore_latest(template=host_state)
    start, last_eval, last_row = 0, None, None
    if restored is not None:
      host_state, extra, start = restored
      rundir.check_resumable(
        extra.get("config", {}),
        c.to_json(),
        changeable=CHANGEABLE_ON_RESUME,
        added=ADDED_ON_RESUME,
        workdir=workdir,
      )
      train_iter.set_state(extra["data"])
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    rundir.truncate_metrics(os.path.join(workdir, rundir.METRICS_FILE), max_step=start)
    rundir.write_config(workdir, c, **description)

    step_fn = functools.partial(
      _train_step,
      apply_fn=apply_fn,
      config=step_config,
      optimizer=optimizer,
      microbatch_size=c.microbatch_size,
    )
    pstep = parallel.make_parallel_step(step_fn, mode=c.parallel)
    peval = rm_eval.make_eval_step(implicit, mode=pstep.mode)
    carry = pstep.put_state((host_state, ref_params))
    del host_state
    logging.info(
      "Training %s (%s) with %s (beta %g) for %d steps on %d pairs, batch %d, mode %s; %s",
      c.policy,
      f"{presets.param_count(model_config):,} parameters",
      c.loss.name,
      c.loss.beta,
      c.steps,
      pairs.num_examples(data.train),
      c.batch_size,
      pstep.mode,
      workdir,
    )

    def evaluate(split_data):
      params = (carry[0].params, carry[1])
      return rm_eval.score_pairs(peval, params, split_data, c, data.max_len)

    progress = rundir.Progress(c.steps, items_per_step=c.batch_size)
    step, pending = start, []
    with rundir.MetricsWriter(workdir, log=log, config=c) as writer:
      while step < until:
        batch = step_batch(next(train_iter), c.loss.name)
        carry, metrics = pstep(carry, pstep.shard_batch(batch))
        step += 1
        pending.append(metrics)
        if step == start + 1:
          jax.block_until_ready(metrics)
          progress.start(step)
        if c.nonfinite == "raise":
          train_state_lib.raise_if_nonfinite(pstep.unreplicate(metrics), step=step - 1)
        if step % log.log_every == 0 or step == c.steps:
          fetched = jax.device_get([pstep.unreplicate(m) for m in pending])
          last_row = {"split": "train", "step": step, **_mean_row(fetched)}
          last_row["learning_rate"] = float(schedule(step - 1))
          last_row["pairs_per_sec"] = progress.items_per_sec(step)
          writer.write(last_row)
          shown = {k: last_row.get(k) for k in ("loss", "accuracy", "margin")}
          logging.info("%s", progress.line(step, shown, unit="pairs"))
          pending = []
        checkpoint_now = step % log.checkpoint_every == 0 or step in (until, c.steps)
        if has_test and (step % c.eval.every == 0 or checkpoint_now):
          t0 = time.perf_counter()
          scores, _ = evaluate(data.test)
          last_eval = report_lib.heldout_metrics(
            scores["rewards_chosen"], scores["rewards_rejected"]
          )
          writer.write({"split": "eval", "step": step, **last_eval})
          logging.info(
            "eval at step %d | implicit-reward accuracy %.4f (± %.4f) | log-loss %.4f",
            step,
            last_eval["accuracy"],
            last_eval["accuracy_stderr"],
            last_eval["log_loss"],
          )
          progress.exclude(time.perf_counter() - t0)
        if checkpoint_now:
          t0 = time.perf_counter()
          host = rm_eval.to_host(pstep.unreplicate(carry)[0])
          saved = {"step": step, **{f"eval_{k}": v for k, v in (last_eval or {}).items()}}
          extra = rundir.checkpoint_extra(
            c, metrics=saved, data=train_iter.get_state(), **description
          )
          ckpt.save(step, host, extra)
          progress.exclude(time.perf_counter() - t0)

    summary = {
      "workdir": workdir,
      "step": step,
      "resumed_from": start if restored else None,
      "train": last_row,
      "eval": last_eval,
      "pairs_per_sec": progress.items_per_sec(step),
      "report": None,
      "best_of_n": None,
    }
    if step < c.steps:
      return summary
    if c.eval.report:
      eval_data = data.test if has_test else data.train
      scores, subset_names = evaluate(eval_data)
      sections = {
        "run": {
          "workdir": workdir,
          "step": step,
          "evaluated_on": "test" if has_test else "train",
          "reward": f"implicit reward beta * log pi / pi_ref of the {c.loss.name} policy",
        },
        "model": {**description, "num_params": presets.param_count(model_config)},
        "data": description["dataset"],
        "training": {"loss": rundir.config_to_json(c.loss), "steps": c.steps, "seed": c.seed},
      }
      summary["report"] = rm_eval.write_scores_report(
        scores, workdir, subset_names=subset_names, sections=sections
      )[1]
    if world is not None and c.eval.bon_prompts:
      final_state, ref = pstep.unreplicate(carry)
      summary["best_of_n"] = best_of_n_gold(
        final_state.params,
        ref,
        world=world,
        world_cfg=c.data.synthetic.world,
        reward_fn=implicit,
        num_prompts=c.eval.bon_prompts,
        num_samples=c.eval.bon_samples,
        key=jax.random.fold_in(jax.random.key(c.seed), BON_STREAM),
      )
      bon = summary["best_of_n"]
      logging.info(
        "best-of-n vs the implicit reward: gold %s for n = %s (pi_init %.4f, DPO policy %.4f)",
        np.round(bon["gold"], 4).tolist(),
        bon["ns"],
        bon["pi_init_gold"],
        bon["policy_gold"],
      )
  rundir.write_json(
    os.path.join(workdir, RESULTS_FILE),
    {"step": step, "heldout": last_eval, "best_of_n": summary["best_of_n"]},
  )
  return summary
