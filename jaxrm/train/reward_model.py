"""Reward-model training loop: preference pairs in; metrics, checkpoints and a report out.

:func:`train_and_evaluate` trains a :class:`jaxrm.models.reward_model.RewardModel` on preference
pairs from local JSONL files (tokenised once into a TFDS dataset under ``<workdir>/data`` by
:func:`jaxrm.data.build_preference_dataset`) or on the gold-labelled comparisons of the
synthetic world (:mod:`jaxrm.data.synthetic`, cached in ``<workdir>/data/synthetic.npz``). Both
kinds of data go through the same resumable, length-bucketed
:class:`jaxrm.data.BatchIterator` and the same step, :func:`jaxrm.steps.rm_step.reward_model_step`
launched by :func:`jaxrm.steps.parallel.make_parallel_step` (``'jit'``, ``'shard_map'`` or
``'pmap'``).

Everything about a run lives under ``workdir``:

* ``config.json``: the :class:`TrainConfig`, the model configuration and the data summary;
  ``curves_train.png``, ``curves_eval.png``: learning curves (:mod:`jaxrm.io.rundir`);
* ``metrics.jsonl``: one JSON object per line. ``{"split": "train", "step": s, ...}`` every
  ``log.log_every`` steps holds the means of loss, accuracy, margin and gradient norm over the
  steps since the previous row (or since the process started), the learning rate, pairs/s and
  the ETA; ``{"split": "eval", "step": s, ...}`` holds the held-out metrics of
  :func:`jaxrm.io.report.heldout_metrics` (accuracy, log-loss, Brier, ECE, margins);
* ``checkpoints/<step>``: :class:`jaxrm.io.checkpoint.CheckpointManager` checkpoints, the last
  ``log.keep_checkpoints`` plus the best by held-out accuracy. ``state`` is the
  :class:`jaxrm.steps.train_state.TrainState`; the JSON ``extra`` holds ``config`` (this
  :class:`TrainConfig`), ``model_config`` (:func:`jaxrm.io.rm_io.config_to_json`), ``pooling``,
  ``tokenizer`` (``'synthetic'``, ``'byte'`` or ``'hf:<digest>'``), ``preset``, ``hf`` (with
  ``model.hf_checkpoint``: the checkpoint's ``model_type`` and ``config.json``, for export),
  ``data`` (the training
  iterator's position) and ``metrics`` (the held-out and training metrics at that step);
* ``tokenizer/``: text runs: the run's tokenizer and its BOS/EOS convention
  (:class:`jaxrm.data.run_tokenizer.RunTokenizer`), so that
  :func:`jaxrm.io.text_scoring.score_texts` scores strings exactly as training tokenised them;
* ``rm_report.json``, ``rm_report.md``, ``reliability.png``, ``reward_histogram.png``: the
  report of the final model (:func:`jaxrm.train.rm_eval.write_run_report` writes one for any checkpoint).

Held-out evaluation runs every ``eval.every`` steps and at every checkpoint, so that each
checkpoint records a fresh held-out accuracy for the choice of the best one. Without a
held-out split nothing is evaluated during training and the report describes the training
pairs (it says so).

Resuming: if ``<workdir>/checkpoints`` holds a checkpoint, the newest readable one is
restored (a damaged newest checkpoint is reported and the previous one used; see
:meth:`jaxrm.io.checkpoint.CheckpointManager.restore_latest`), the iterator continues with
exactly the batch an uninterrupted run would have taken next, and rows of ``metrics.jsonl``
after the restored step are removed (they belong to the interrupted part, which is re-run),
so the file never holds a step twice. A resumed run ends with parameters bitwise identical to
an uninterrupted one (same machine, same mode). Settings that change the trained parameters
(data, model, loss, optimizer, ``steps``, ``seed``, ...) must equal the checkpointed run's;
the ``eval`` and ``log`` sections, ``parallel``, ``microbatch_size`` and ``nonfinite`` may change
(:data:`CHANGEABLE_ON_RESUME`, checked by :func:`jaxrm.io.rundir.check_resumable`).

Randomness: the parameters are initialised from ``fold_in(key(seed), 0)``; the step keys
come from the train state (``fold_in(key, step)``); the data order is a function of
``seed`` and the epoch (:class:`jaxrm.data.BatchIterator`).

Example::

  config = TrainConfig(steps=500, batch_size=64)  # the synthetic world, the tiny preset
  summary = train_and_evaluate(config, "runs/rm")
  print(summary["eval"]["accuracy"])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from jaxrm.data import packing, pairs
from jaxrm.data.run_tokenizer import RunTokenizer, has_tokenizer_json
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import hf, program_cache, rm_io, rundir
from jaxrm.io import report as report_lib
from jaxrm.io.rundir import ConfigError, LogConfig  # noqa: F401  (public names of the loop)
from jaxrm.models import presets
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import parallel, rm_step
from jaxrm.steps import train_state as train_state_lib
from jaxrm.train import rm_eval
from jaxrm.train.rm_config import (  # noqa: F401  (the config types live beside the loop's API)
  ADDED_ON_RESUME,
  CHANGEABLE_ON_RESUME,
  DTYPES,
  EvalConfig,
  LossConfig,
  ModelConfig,
  OptimizerConfig,
  TrainConfig,
  abstract_state,
  execution_settings,
  init_state,
  make_loss_fn,
  make_optimizer,
  preset_backbone,
  validate_config,
)
from jaxrm.train.rm_eval import restore_run, write_run_report  # noqa: F401

BEST_METRIC = "eval_accuracy"
STEP_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask", "weight", "label")
PACKED_STEP_KEYS = (*rm_step.PACKED_KEYS, "weight", "label")


def _resolve_paths(config: TrainConfig) -> TrainConfig:
  if config.data.is_synthetic:
    return config
  data = dataclasses.replace(
    config.data,
    files=tuple(os.path.abspath(p) for p in config.data.files),
    test_files=tuple(os.path.abspath(p) for p in config.data.test_files),
  )
  return dataclasses.replace(config, data=data)


def run_tokenizer_for(config: TrainConfig) -> RunTokenizer:
  """The tokenizer of a text run: ``data.tokenizer``, else the ``tokenizer.json`` of
  ``model.hf_checkpoint``, else the byte tokenizer (:class:`ConfigError` naming the field)."""
  field, path = "data.tokenizer", config.data.tokenizer
  if not path and has_tokenizer_json(config.model.hf_checkpoint):
    field, path = "model.hf_checkpoint", config.model.hf_checkpoint
  try:
    return RunTokenizer.from_source(path)
  except ValueError as e:
    raise ConfigError(field, path, str(e)) from None


def import_backbone(config: TrainConfig, data: pairs.RunData) -> hf.HFModel:
  """Imports ``model.hf_checkpoint`` as a reward model for sequences of ``data.max_len``."""
  path = config.model.hf_checkpoint
  try:
    dtype = DTYPES[config.model.dtype]
    imported = hf.import_reward_model(
      path, max_len=data.max_len, dtype=dtype, param_dtype=dtype, remat=config.model.remat
    )
  except ValueError as e:
    raise ConfigError("model.hf_checkpoint", path, str(e)) from None
  if imported.config.max_len < data.max_len:
    raise ConfigError(
      "data.max_len",
      data.max_len,
      f"exceeds the {imported.config.max_len} positions of the checkpoint {path}",
    )
  if data.vocab_size > imported.config.vocab_size:
    raise ConfigError(
      "model.hf_checkpoint",
      path,
      f"its vocabulary ({imported.config.vocab_size}) is smaller than the tokenizer's "
      f"({data.vocab_size}, {data.tokenizer})",
    )
  return imported


def _run_description(config: TrainConfig, model_config, data: pairs.RunData) -> dict[str, Any]:
  return {
    "model_config": rm_io.config_to_json(model_config),
    "pooling": config.model.pooling,
    "tokenizer": data.tokenizer,
    "preset": config.model.preset,
    "dataset": {k: v for k, v in data.info.items() if k != "read_stats"},
  }


def step_fn(config: TrainConfig, model: RewardModel, optimizer) -> Any:
  """The run's ``(state, batch) -> (state, metrics)`` step (:func:`rm_step.reward_model_step`
  with the config's loss and non-finite policy), before :func:`parallel.make_parallel_step`."""
  return functools.partial(
    rm_step.reward_model_step,
    apply_fn=model.apply,
    loss_fn=make_loss_fn(config.loss),
    optimizer=optimizer,
    nonfinite=config.nonfinite,
    microbatch_size=config.microbatch_size or None,
  )


def program_key(config: TrainConfig, model: RewardModel) -> str:
  """What the run's training step is a function of, for :func:`jaxrm.io.program_cache.jit`:
  the model and the whole config (loss, optimizer, schedule length, non-finite policy)."""
  return f"{model!r}\n{json.dumps(config.to_json(), sort_keys=True)}"


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes training) a reward model; see the module docstring.

  Args:
    config: the run's settings (validated with :func:`validate_config`).
    workdir: the run directory (created if needed).

  Returns:
    A summary: ``step`` (the final step), ``resumed_from`` (the restored step or None),
    ``eval`` (the last held-out metrics or None), ``train`` (the last training row or
    None), ``pairs_per_sec`` (throughput of this process, compilation excluded) and
    ``report`` (the written report paths, or None).

  Raises:
    jaxrm.io.rundir.ConfigError: for a bad setting, naming it.
    jaxrm.data.PreferenceDataError: for a malformed data line (file, line, field).
    FloatingPointError: with ``nonfinite='raise'``, at the first non-finite step.
  """
  config = _resolve_paths(config)
  validate_config(config)
  workdir = rundir.prepare(workdir)
  tok = None if config.data.is_synthetic else run_tokenizer_for(config)
  data = pairs.load_data(config.data, workdir, tok=tok)
  imported = None
  if config.model.hf_checkpoint:
    imported = import_backbone(config, data)
    model_config = execution_settings(config, imported.config)
  else:
    model_config = preset_backbone(config, vocab_size=data.vocab_size, max_len=data.max_len)
  model = RewardModel(model_config, pooling=config.model.pooling)
  optimizer, schedule = make_optimizer(config)
  train_iter = pairs.train_iterator(config, data)
  host_state = init_state(
    config, model, optimizer, data.max_len, params=imported and imported.variables
  )
  description = _run_description(config, model_config, data)
  if imported is not None:
    description["hf"] = {"model_type": imported.model_type, "config": imported.hf_config}
  has_test = data.test is not None
  log = config.log

  with checkpoint_lib.CheckpointManager(
    os.path.join(workdir, rundir.CHECKPOINT_DIR),
    max_to_keep=log.keep_checkpoints,
    best_metric=BEST_METRIC if has_test else None,
  ) as ckpt:
    # The config check comes before any array is restored: the state template is built from
    # this config, and a checkpoint of another model would fail inside orbax.
    peek = ckpt.latest_extra()
    if peek is not None:
      rundir.check_resumable(
        peek[0].get("config", {}),
        config.to_json(),
        changeable=CHANGEABLE_ON_RESUME,
        added=ADDED_ON_RESUME,
        workdir=workdir,
      )
    restored = ckpt.restore_latest(template=host_state)
    start, last_eval = 0, None
    if restored is not None:
      host_state, extra, start = restored
      rundir.check_resumable(
        extra.get("config", {}),
        config.to_json(),
        changeable=CHANGEABLE_ON_RESUME,
        added=ADDED_ON_RESUME,
        workdir=workdir,
      )
      train_iter.set_state(extra["data"])
      saved = extra.get("metrics") or {}
      last_eval = {k[len("eval_") :]: v for k, v in saved.items() if k.startswith("eval_")}
      last_eval = last_eval or None
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    rundir.truncate_metrics(os.path.join(workdir, rundir.METRICS_FILE), max_step=start)
    rundir.write_config(workdir, config, **description)

    # Lowered programs kept on disk when the scripts' compilation cache is on: a later run of
    # the same config and model skips tracing them (jaxrm.io.program_cache).
    pstep = parallel.make_parallel_step(
      step_fn(config, model, optimizer),
      mode=config.parallel,
      jit_fn=functools.partial(program_cache.jit, name="rm_step", key=program_key(config, model)),
    )
    peval = rm_eval.make_eval_step(
      model.apply,
      mode=pstep.mode,
      jit_fn=functools.partial(program_cache.jit, name="rm_eval", key=repr(model)),
    )
    state = pstep.put_state(host_state)
    del host_state
    logging.info(
      "Training %s (%s parameters, %s pooling, %s) for %d steps on %d pairs, "
      "batch %d, mode %s on %d device(s); workdir %s",
      config.model.hf_checkpoint or config.model.preset,
      f"{presets.param_count(model_config):,}",
      config.model.pooling,
      config.loss.name,
      config.steps,
      pairs.num_examples(data.train),
      config.batch_size,
      pstep.mode,
      pstep.num_devices,
      workdir,
    )

    progress = rundir.Progress(config.steps, items_per_step=config.batch_size)
    skips = rundir.SkipMonitor(
      config.max_consecutive_skips,
      total_steps=config.steps,
      skipped=int(jax.device_get(pstep.unreplicate(state).num_skipped)),
    )
    step, last_row = start, None
    scored, scored_step = None, None  # the last evaluation's score_pairs output and its step
    pending: list[dict[str, jax.Array]] = []
    skip_checked = 0  # steps of ``pending`` already given to ``skips``
    with rundir.MetricsWriter(workdir, log=log, config=config) as writer:
      while step < config.steps:
        batch = next(train_iter)
        keys = STEP_KEYS
        if config.model.pack_pairs:
          batch = packing.pack_pairs(batch, multiple=config.model.pack_pairs)
          keys = PACKED_STEP_KEYS
        state, step_metrics = pstep(
          state, pstep.shard_batch({k: batch[k] for k in keys if k in batch})
        )
        step += 1
        pending.append(step_metrics)
        if step == start + 1:  # the first step of this process (with its compilation) is done
          jax.block_until_ready(step_metrics)
          progress.start(step)
        if config.nonfinite == "raise":
          try:
            train_state_lib.raise_if_nonfinite(pstep.unreplicate(step_metrics), step=step - 1)
          except FloatingPointError as e:
            raise rundir.RunStopped(
              f"{e} (--config.nonfinite=raise); last good checkpoint: "
              f"{rundir.describe_checkpoint(ckpt.latest_step(), ckpt.directory)}"
            ) from None

        checkpoint_now = step % log.checkpoint_every == 0 or step == config.steps
        if step % log.log_every == 0 or step == config.steps or checkpoint_now:
          fetched = jax.device_get([pstep.unreplicate(m) for m in pending])
          # Each step once, and before any checkpoint of it is written.
          for i in range(skip_checked, len(fetched)):
            skips.update(
              step - len(fetched) + i + 1,
              bool(fetched[i]["nonfinite"]),
              last_checkpoint=rundir.describe_checkpoint(ckpt.latest_step(), ckpt.directory),
            )
          skip_checked = len(fetched)
        if step % log.log_every == 0 or step == config.steps:
          mean = lambda key, rows=fetched: float(np.mean([float(m[key]) for m in rows]))
          last_row = {
            "split": "train",
            "step": step,
            "epoch": train_iter.get_state()["epoch"],
            "loss": mean("loss"),
            "accuracy": mean("accuracy"),
            "margin": mean("margin"),
            "grad_norm": mean("grad_norm"),
            "nonfinite_steps": int(sum(bool(m["nonfinite"]) for m in fetched)),
            "num_skipped": int(fetched[-1]["num_skipped"]),
            "learning_rate": float(schedule(step - 1)),
            "steps_in_row": len(fetched),
            "pairs_per_sec": progress.items_per_sec(step),
            "eta_sec": progress.eta(step),
          }
          writer.write(last_row)
          shown = {k: last_row[k] for k in ("loss", "accuracy")}
          shown["skipped"] = skips.total
          logging.info("%s", progress.line(step, shown, unit="pairs"))
          pending, skip_checked = [], 0

        if has_test and (step % config.eval.every == 0 or checkpoint_now):
          jax.block_until_ready(state)
          t0 = time.perf_counter()
          scored = rm_eval.score_pairs(peval, state.params, data.test, config, data.max_len)
          scores, scored_step = scored[0], step
          rm_eval.check_finite_rewards(
            scores,
            step=step,
            last_checkpoint=rundir.describe_checkpoint(ckpt.latest_step(), ckpt.directory),
          )
          last_eval = report_lib.heldout_metrics(
            scores["rewards_chosen"], scores["rewards_rejected"]
          )
          problem = rm_eval.evaluation_problem(scores)
          if problem:
            last_eval["unreliable"] = problem
          writer.write({"split": "eval", "step": step, **last_eval})
          logging.info(
            "eval at step %d | accuracy %.4f (± %.4f) | log-loss %.4f | ECE %.4f | %d pairs%s",
            step,
            last_eval["accuracy"],
            last_eval["accuracy_stderr"],
            last_eval["log_loss"],
            last_eval["ece"],
            last_eval["num_pairs"],
            f" | UNRELIABLE: {problem}" if problem else "",
          )
          progress.exclude(time.perf_counter() - t0)
        if checkpoint_now:
          jax.block_until_ready(state)
          t0 = time.perf_counter()
          saved_metrics = {"step": step}
          if last_row is not None:
            saved_metrics.update({f"train_{k}": last_row[k] for k in ("loss", "accuracy")})
          if has_test:
            saved_metrics.update(
              {f"eval_{k}": v for k, v in last_eval.items() if k != "unreliable"}
            )
          ckpt.save(
            step,
            rm_eval.to_host(pstep.unreplicate(state)),
            rundir.checkpoint_extra(
              config, metrics=saved_metrics, data=train_iter.get_state(), **description
            ),
            metrics={BEST_METRIC: last_eval["accuracy"]} if has_test else None,
          )
          progress.exclude(time.perf_counter() - t0)

    summary = {
      "workdir": workdir,
      "step": step,
      "resumed_from": start if restored else None,
      "eval": last_eval,
      "train": last_row,
      "pairs_per_sec": progress.items_per_sec(step),
      "skipped_updates": skips.total,
      "report": None,
    }
    if config.eval.report:
      num_params = sum(np.size(x) for x in jax.tree.leaves(pstep.unreplicate(state).params))
      summary["report"] = rm_eval.write_report(
        workdir,
        workdir,
        config=config,
        data=data,
        model_config=model_config,
        params=state.params,
        num_params=num_params,
        peval=peval,
        step=step,
        best_step=ckpt.best_step() if has_test else None,
        checkpoint_steps=ckpt.all_steps(),
        # The test split was scored with these parameters by the evaluation at the last step.
        scored=scored if scored_step == step else None,
      )
  held_out = ""
  if last_eval is not None:
    held_out = f", held-out accuracy {last_eval['accuracy']:.4f}"
    if last_eval.get("unreliable"):
      held_out += f" (UNRELIABLE: {last_eval['unreliable']})"
  logging.info("Done: step %d%s, %d skipped updates", step, held_out, skips.total)
  if skips.total:
    logging.warning(
      "%d of the run's %d updates were skipped (non-finite loss, gradient or update); "
      "see num_skipped in %s",
      skips.total,
      step,
      rundir.METRICS_FILE,
    )
  return summary
