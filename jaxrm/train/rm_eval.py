"""Evaluation, restore and report of reward-model runs (:mod:`jaxrm.train.reward_model`).

:func:`score_pairs` scores every pair of a split in data order with a compiled evaluation
step (:func:`make_eval_step`); :func:`write_report` turns the scores, the run's config and
its ``metrics.jsonl`` into the report of :mod:`jaxrm.io.report`; :func:`restore_run` and
:func:`write_run_report` do the same for any saved checkpoint, from the run directory alone.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

from jaxrm.data import pairs
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import report as report_lib
from jaxrm.io import rm_io, rundir
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import parallel, rm_step
from jaxrm.steps import train_state as train_state_lib
from jaxrm.train import rm_config

SCORE_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")


def to_host(state: Any) -> Any:
  """NumPy copy of a state (typed PRNG keys as their key data) for a fast checkpoint write.

  Replicated multi-device arrays are slow to hand to orbax (seconds for the first save);
  the checkpoint manager restores key data into typed keys from the template.
  """

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(leaf, state)


def _eval_body(params, batch, *, apply_fn, axis_name):
  return rm_step.reward_model_eval_step(params, batch, apply_fn=apply_fn, axis_name=axis_name)


def make_eval_step(apply_fn, *, mode: str, jit_fn=jax.jit) -> parallel.ParallelStep:
  """``peval(params, batch) -> {'rewards_chosen', 'rewards_rejected'}`` for ``mode``
  (``jit_fn``: :func:`jaxrm.steps.parallel.make_parallel_step`'s)."""
  return parallel.make_parallel_step(
    functools.partial(_eval_body, apply_fn=apply_fn), mode=mode, donate=False, jit_fn=jit_fn
  )


def score_pairs(
  peval: parallel.ParallelStep, params: Any, data: Any, config: rm_config.TrainConfig, max_len: int
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
  """Rewards of every pair of ``data``, in data order.

  Args:
    peval: from :func:`make_eval_step`.
    params: placed for ``peval``'s mode (e.g. the train state's params).
    data: arrays or a record source.
    config: gives the batch size and bucketing.
    max_len: the longest batch.

  Returns:
    ``(arrays, subset_names)``: ``arrays`` holds ``rewards_chosen``, ``rewards_rejected``
    ``[n]`` float32; ``chosen_len``, ``rejected_len``, ``prompt_len`` ``[n]`` int; and, when
    the data has them, ``subset_id`` (into ``subset_names``), ``gold_chosen``,
    ``gold_rejected`` ``[n]``.
  """
  parts: dict[str, list[np.ndarray]] = {}
  iterator = pairs.make_iterator(
    data,
    batch_size=config.batch_size,
    seed=config.seed,
    bucket=config.data.bucket,
    max_len=max_len,
    train=False,
  )
  # A batch's rewards are fetched once the next batch is dispatched, so the host builds a
  # batch while the device scores the one before; at most two batches are in flight.
  pending = None  # the last dispatched batch: (its columns, its rewards on device, valid rows)

  def collect(cols, out, valid):
    out = jax.device_get(peval.unreplicate(out))
    cols.update(rewards_chosen=out["rewards_chosen"], rewards_rejected=out["rewards_rejected"])
    for key, value in cols.items():
      parts.setdefault(key, []).append(np.asarray(value)[valid])

  for batch in iterator:
    out = peval(params, peval.shard_batch({k: batch[k] for k in SCORE_KEYS}))
    cols = {
      "index": batch["index"],
      "chosen_len": batch["chosen_mask"].sum(1),
      "rejected_len": batch["rejected_mask"].sum(1),
    }
    for key in ("prompt_len", "subset_id", "gold_chosen", "gold_rejected"):
      if key in batch:
        cols[key] = batch[key]
    if pending is not None:
      collect(*pending)
    pending = (cols, out, batch["index"] >= 0)
  if pending is not None:
    collect(*pending)
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  order = np.argsort(arrays.pop("index"), kind="stable")
  arrays = {k: v[order] for k, v in arrays.items()}
  arrays.setdefault("prompt_len", np.zeros_like(arrays["chosen_len"]))
  return arrays, iterator.subset_names


MIN_EVAL_PAIRS = 20  # fewer held-out pairs make an accuracy too noisy to report as a number


def check_finite_rewards(scores: dict[str, np.ndarray], *, step: int, last_checkpoint: str) -> None:
  """Raises :class:`jaxrm.io.rundir.RunStopped` if a held-out reward is NaN or infinite.

  A model whose rewards overflow has diverged (a learning rate or coefficient far too large);
  the run stops before the diverged parameters are checkpointed, naming the last good
  checkpoint.
  """
  rewards = np.concatenate([scores["rewards_chosen"], scores["rewards_rejected"]])
  bad = int(np.sum(~np.isfinite(rewards)))
  if bad:
    raise rundir.RunStopped(
      f"stopped at step {step}: {bad} of the {rewards.size} held-out rewards are not finite, "
      "so the model has diverged (learning rate or a coefficient too large?); last good "
      f"checkpoint: {last_checkpoint}"
    )


def evaluation_problem(scores: dict[str, np.ndarray]) -> str | None:
  """Why a held-out accuracy from ``scores`` would mislead as a plain number, or None.

  Too few pairs (< :data:`MIN_EVAL_PAIRS`), or most pairs scored exactly equal (chosen and
  rejected identical after truncation, or a model that gives every input the same reward:
  ties count as errors, so such an accuracy says nothing about the model).
  """
  rc, rr = np.asarray(scores["rewards_chosen"]), np.asarray(scores["rewards_rejected"])
  n = rc.size
  if n < MIN_EVAL_PAIRS:
    return f"only {n} held-out pair(s) (fewer than {MIN_EVAL_PAIRS}): give more held-out data"
  ties = int(np.sum(rc == rr))
  if 2 * ties > n:
    return (
      f"{ties} of {n} held-out pairs score exactly equal (pairs identical after truncation "
      "to data.max_len, or a constant model)"
    )
  return None


def _training_section(config: rm_config.TrainConfig, workdir: str, step: int) -> dict[str, Any]:
  rows = [
    r for r in rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE)) if r["step"] <= step
  ]
  train = [r for r in rows if r.get("split") == "train"]
  evals = [r for r in rows if r.get("split") == "eval"]
  rates = [r["pairs_per_sec"] for r in train if r.get("pairs_per_sec") is not None]
  # Ties go to the later step, as in the checkpoint manager's choice of the best.
  best = max(evals, key=lambda r: (r["accuracy"], r["step"])) if evals else None
  loss_kwargs = {"margin": config.loss.margin} if config.loss.margin is not None else {}
  return {
    "loss": config.loss.name,
    "margin": loss_kwargs.get("margin", "loss default"),
    "label_smoothing": config.loss.label_smoothing,
    "center_coef": config.loss.center_coef,
    "optimizer": "AdamW, linear warm-up, cosine decay to 10%",
    "learning_rate": config.optimizer.learning_rate,
    "warmup_steps": config.optimizer.warmup_steps,
    "weight_decay": config.optimizer.weight_decay,
    "grad_clip": config.optimizer.grad_clip,
    "batch_size": config.batch_size,
    "steps": config.steps,
    "seed": config.seed,
    "parallel": config.parallel,
    "bucket": config.data.bucket,
    "final_train_loss": train[-1]["loss"] if train else None,
    "final_train_accuracy": train[-1]["accuracy"] if train else None,
    "pairs_per_sec_median": float(np.median(rates)) if rates else None,
    "best_eval_step": best["step"] if best else None,
    "best_eval_accuracy": best["accuracy"] if best else None,
    "skipped_updates": train[-1].get("num_skipped") if train else None,
  }


def write_report(
  workdir: str,
  out_dir: str,
  *,
  config: rm_config.TrainConfig,
  data: pairs.RunData,
  model_config,
  params: Any,
  num_params: int,
  peval: parallel.ParallelStep,
  step: int,
  best_step: int | None,
  checkpoint_steps: Sequence[int],
  scored: tuple[dict[str, np.ndarray], tuple[str, ...]] | None = None,
) -> dict[str, str]:
  """Scores the held-out pairs with ``params`` (placed for ``peval``) and writes the report.

  ``scored``: :func:`score_pairs`'s output for these ``params`` on the split the report
  describes (the test split, else the train split), when the caller already has it (the
  training loop's evaluation at its last step); the pairs are then not scored again.
  """
  eval_data, split = (data.test, "test") if data.test is not None else (data.train, "train")
  if scored is None:
    scored = score_pairs(peval, params, eval_data, config, data.max_len)
  scores, subset_names = scored
  read_stats = data.info.get("read_stats", {})
  splits = {"train": pairs.split_statistics(data.train, read_stats.get("train"))}
  if data.test is not None:
    splits["test"] = pairs.split_statistics(data.test, read_stats.get("test"))
  data_section = {k: v for k, v in data.info.items() if k != "read_stats"}
  data_section["splits"] = splits
  warnings = []
  problem = evaluation_problem(scores)
  if problem:
    warnings.append(f"the {split} accuracy below is unreliable: {problem}")
  training = _training_section(config, workdir, step)
  if training["skipped_updates"]:
    warnings.append(
      f"{training['skipped_updates']} of {step} updates were skipped (non-finite loss, "
      "gradient or update)"
    )
  sections = {
    "run": {
      "workdir": workdir,
      "step": step,
      "best_checkpoint_step": best_step,
      "checkpoint_steps": list(checkpoint_steps),
      "evaluated_on": split,
      "warnings": warnings,
    },
    "model": {
      "preset": config.model.preset,
      "hf_checkpoint": config.model.hf_checkpoint or None,
      "pooling": config.model.pooling,
      "tokenizer": data.tokenizer,
      "num_params": int(num_params),
      "config": rm_io.config_to_json(model_config),
    },
    "data": data_section,
    "training": training,
  }
  report, paths = write_scores_report(scores, out_dir, subset_names=subset_names, sections=sections)
  logging.info(
    "Wrote the report of step %d (%s split, accuracy %.4f) to %s",
    step,
    split,
    report["heldout"]["accuracy"],
    paths["markdown"],
  )
  return paths


class RestoredRun(NamedTuple):
  """A checkpoint of a run, from :func:`restore_run`."""

  config: rm_config.TrainConfig
  model_config: Any  # jaxrm.models.transformer.TransformerConfig
  state: train_state_lib.TrainState  # on the default device
  extra: dict[str, Any]  # the checkpoint's JSON extra
  step: int
  steps: list[int]  # every saved step


def restore_run(workdir: str | os.PathLike, *, step: int | None = None) -> RestoredRun:
  """Restores checkpoint ``step`` (default: the latest) of a :func:`train_and_evaluate` run.

  The model and optimizer are rebuilt from the checkpoint's own ``extra`` (``config``,
  ``model_config``, ``pooling``), so only the run directory is needed.

  Raises:
    FileNotFoundError: if the run has no checkpoint (at ``step``).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  ckpt_dir = os.path.join(workdir, rundir.CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir} holds no checkpoints ({ckpt_dir} does not exist)")
  # max_to_keep=None: opening the manager must never delete a checkpoint.
  with checkpoint_lib.CheckpointManager(ckpt_dir, max_to_keep=None) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoints")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir}; saved steps: {steps}")
    extra = rundir.read_checkpoint_extra(workdir, step)
    config = rm_config.TrainConfig.from_json(extra["config"])
    model_config = rm_io.config_from_json(extra["model_config"])
    model = RewardModel(model_config, pooling=extra["pooling"])
    optimizer, _ = rm_config.make_optimizer(config)
    template = rm_config.abstract_state(config, model, optimizer, model_config.max_len)
    state, extra = ckpt.restore(step, template)
  return RestoredRun(config, model_config, state, extra, step, steps)


def write_run_report(
  workdir: str | os.PathLike, *, step: int | None = None, out_dir: str | os.PathLike | None = None
) -> dict[str, str]:
  """Writes the report of a saved checkpoint of a run.

  Args:
    workdir: the run directory of :func:`train_and_evaluate`.
    step: the checkpoint (default: the latest).
    out_dir: where to write (default: ``workdir`` for the latest step, else
      ``<workdir>/reports/step_<step>``).

  Returns:
    The written paths (see :func:`jaxrm.io.report.write_report`).

  Raises:
    FileNotFoundError: if the run has no checkpoint (at ``step``).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  run = restore_run(workdir, step=step)
  data = pairs.load_data(run.config.data, workdir, prepare=False)
  evals = [
    r
    for r in rundir.read_metrics(os.path.join(workdir, rundir.METRICS_FILE))
    if r.get("split") == "eval" and r["step"] in run.steps
  ]
  best_step = max(evals, key=lambda r: (r["accuracy"], r["step"]))["step"] if evals else None
  if out_dir is None:
    out_dir = (
      workdir if run.step == run.steps[-1] else os.path.join(workdir, "reports", f"step_{run.step}")
    )
  model = RewardModel(run.model_config, pooling=run.extra["pooling"])
  return write_report(
    workdir,
    os.fspath(out_dir),
    config=run.config,
    data=data,
    model_config=run.model_config,
    params=run.state.params,
    num_params=sum(np.size(x) for x in jax.tree.leaves(run.state.params)),
    peval=make_eval_step(model.apply, mode="jit"),
    step=run.step,
    best_step=best_step,
    checkpoint_steps=run.steps,
  )


def write_scores_report(
  scores: dict[str, Any], out_dir: str, *, subset_names: Any, sections: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
  """Builds and writes the report (:func:`jaxrm.io.report.build_report`) of scored pairs.

  Args:
    scores: ``rewards_chosen``/``rewards_rejected`` ``[n]``, ``chosen_len``/``rejected_len``/
      ``prompt_len`` ``[n]`` and optionally ``subset_id`` and ``gold_chosen``/
      ``gold_rejected`` ``[n]`` (as :func:`score_pairs` returns them).
    out_dir: where ``rm_report.json``/``.md`` and the plots go.
    subset_names: names of the ``subset_id`` values, or None.
    sections: extra report sections (run, model, data, training).

  Returns:
    ``(report, paths)``.
  """
  gold = (scores["gold_chosen"], scores["gold_rejected"]) if "gold_chosen" in scores else None
  report = report_lib.build_report(
    scores["rewards_chosen"],
    scores["rewards_rejected"],
    response_lengths=(
      scores["chosen_len"] - scores["prompt_len"],
      scores["rejected_len"] - scores["prompt_len"],
    ),
    subset_ids=scores.get("subset_id"),
    subset_names=subset_names,
    gold=gold,
    sections=sections,
  )
  paths = report_lib.write_report(
    report,
    out_dir,
    rewards_chosen=scores["rewards_chosen"],
    rewards_rejected=scores["rewards_rejected"],
  )
  return report, paths
