"""Settings of a DPO-family run (:mod:`jaxrm.train.dpo`) and their validation.

:class:`DPOTrainConfig` shares its parts with the reward-model loop: the preference pairs
(``data``: :class:`jaxrm.data.pairs.DataConfig`, the synthetic world's gold-labelled
comparisons or JSONL files), the optimizer (:class:`jaxrm.train.rm_config.OptimizerConfig`,
built by :func:`jaxrm.train.rm_config.make_optimizer`) and the run directory's ``log``
section. It is what ``experiments/configs/dpo.py`` returns, so every field is overridable
from the command line (``--config.loss.name=ipo``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from jaxrm.data import pairs
from jaxrm.io import rundir
from jaxrm.models import presets
from jaxrm.steps import dpo as dpo_steps
from jaxrm.steps import train_state as train_state_lib
from jaxrm.train.rm_config import DTYPES, OptimizerConfig

LOSSES = ("dpo", "cdpo", "ipo", "simpo", "kto")
PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap")
# Sections and fields that do not change the trained parameters: they may differ on resume.
CHANGEABLE_ON_RESUME = ("eval", "log", "parallel", "microbatch_size", "nonfinite")
# Fields added after runs were saved without them, each with the value those runs computed with
# (:func:`jaxrm.io.rundir.check_resumable`).
ADDED_ON_RESUME = {"matmul_dtype": ""}


@dataclasses.dataclass
class DPOLossConfig:
  """The direct preference loss (:mod:`jaxrm.math.dpo`, :func:`jaxrm.steps.dpo.dpo_step`).

  Attributes:
    name: ``'dpo'`` (Rafailov et al. 2023), ``'cdpo'`` (conservative DPO, Mitchell 2023:
      ``label_smoothing > 0``), ``'ipo'`` (Azar et al. 2023), ``'simpo'`` (Meng et al. 2024,
      reference-free) or ``'kto'`` (Ethayarajh et al. 2024; each pair gives a desirable
      example, its chosen sequence, and an undesirable one, its rejected sequence).
    beta: inverse temperature of the implicit reward ``beta * log pi / pi_ref`` (IPO's
      ``tau``; SimPO's reward scale).
    label_smoothing: the assumed label-flip rate of ``'cdpo'`` and ``'simpo'``, in [0, 0.5];
      must be 0 for ``'dpo'`` (use ``'cdpo'``).
    gamma: SimPO's target reward margin.
    desirable_weight: KTO's ``lambda_D``.
    undesirable_weight: KTO's ``lambda_U``.
  """

  name: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0
  gamma: float = 0.5
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0

  def step_config(self, nonfinite: str) -> dpo_steps.DPOConfig:
    """The :class:`jaxrm.steps.dpo.DPOConfig` of the step (``'cdpo'`` is ``'dpo'`` with
    label smoothing)."""
    return dpo_steps.DPOConfig(
      loss="dpo" if self.name == "cdpo" else self.name,
      beta=self.beta,
      label_smoothing=self.label_smoothing,
      gamma=self.gamma,
      desirable_weight=self.desirable_weight,
      undesirable_weight=self.undesirable_weight,
      nonfinite=nonfinite,
    )


@dataclasses.dataclass
class DPOEvalConfig:
  """Evaluation of the implicit reward model ``beta * log pi / pi_ref``.

  Attributes:
    every: held-out implicit-reward metrics (the reward-model loop's
      :func:`jaxrm.io.report.heldout_metrics`) every ``every`` steps, at every checkpoint
      and at the end.
    report: write the reward-model report of the final implicit reward model
      (``rm_report.json``, ``rm_report.md``, ``reliability.png``, ``reward_histogram.png``).
    bon_prompts: synthetic world only: prompts of the final best-of-n evaluation (0: none).
    bon_samples: ``pi_init`` samples per prompt, ranked by the implicit reward; the expected
      gold of best-of-n is estimated for n = 1, 2, 4, ... ``bon_samples``
      (:func:`jaxrm.math.best_of_n.batched_best_of_n_expected_reward`).
  """

  every: int = 100
  report: bool = True
  bon_prompts: int = 16
  bon_samples: int = 64


@dataclasses.dataclass
class DPOTrainConfig:
  """Every setting of a DPO-family run (:func:`jaxrm.train.dpo.train_and_evaluate`).

  Attributes:
    data: the preference pairs (the reward-model loop's :class:`jaxrm.data.pairs.DataConfig`).
    policy: ``'synthetic'`` (the synthetic world's ``pi_init``, for synthetic data; it is
      also the reference) or a preset (:data:`jaxrm.models.presets.PRESETS`; a randomly
      initialised byte-level policy for JSONL data, its own reference).
    loss: the preference loss.
    optimizer: AdamW with warm-up and cosine decay (:func:`jaxrm.train.rm_config.make_optimizer`).
    eval: implicit-reward evaluation, report and best-of-n.
    log: metrics rows, checkpoints, plots, TensorBoard / W&B.
    steps: optimizer steps.
    batch_size: pairs per step (global).
    microbatch_size: pairs per microbatch on each device (0: the whole batch at once): the
      reference log-probs and the step's forward and backward passes run over slices of this
      many pairs (KTO: twice as many examples) one after another, and the step sums their
      gradients (:func:`jaxrm.steps.dpo.dpo_step`), the same update up to float rounding with
      one slice's activations at a time (gradient accumulation). Must divide the pairs each
      device gets, or be at least that many.
    seed: seed of the initialisation, the step keys, the data order and the evaluation.
    parallel: ``'auto'``, ``'jit'``, ``'shard_map'`` or ``'pmap'``.
    nonfinite: ``'skip'`` a step with a non-finite loss or gradient, or ``'raise'``.
    matmul_dtype: ``''`` (the policy's own compute dtype, float32) or ``'float32'`` /
      ``'bfloat16'``: the dtype the policy's backbone computes in, its parameters float32
      (``'bfloat16'`` is mixed precision, :mod:`jaxrm.models.precision`, as the other loops'
      ``matmul_dtype``); the reference's log-probabilities and the implicit reward are
      computed the same way, and the saved model config keeps it (the synthetic world's
      best-of-n samples stay float32).
  """

  data: pairs.DataConfig = dataclasses.field(default_factory=pairs.DataConfig)
  policy: str = "synthetic"
  loss: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  eval: DPOEvalConfig = dataclasses.field(default_factory=DPOEvalConfig)
  log: rundir.LogConfig = dataclasses.field(default_factory=rundir.LogConfig)
  steps: int = 300
  batch_size: int = 32
  microbatch_size: int = 0
  seed: int = 0
  parallel: str = "auto"
  nonfinite: str = "skip"
  matmul_dtype: str = ""

  def to_json(self) -> dict[str, Any]:
    return rundir.config_to_json(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> DPOTrainConfig:
    return rundir.config_from_json(cls, d)


def validate_config(c: DPOTrainConfig, *, num_devices: int | None = None) -> None:
  """Checks every setting; raises :class:`jaxrm.io.rundir.ConfigError` naming the first bad
  one by its dotted path (``loss.beta``)."""
  need = functools.partial(rundir.check, c)

  pairs.validate_data_config(c.data)
  if c.data.is_synthetic:
    need(c.policy == "synthetic", "policy", "must be 'synthetic' for the synthetic world's pairs")
  else:
    need(
      c.policy in presets.PRESETS,
      "policy",
      f"must be a preset for JSONL pairs (byte-level): {sorted(presets.PRESETS)}",
    )
  l = c.loss
  need(l.name in LOSSES, "loss.name", f"must be one of {list(LOSSES)}")
  need(rundir.is_num(l.beta) and l.beta > 0, "loss.beta", "must be > 0")
  need(
    rundir.is_num(l.label_smoothing) and 0 <= l.label_smoothing <= 0.5,
    "loss.label_smoothing",
    "must be in [0, 0.5]",
  )
  need(
    l.name != "dpo" or l.label_smoothing == 0,
    "loss.label_smoothing",
    "must be 0 for loss.name='dpo' (conservative DPO is loss.name='cdpo')",
  )
  need(
    l.name != "cdpo" or l.label_smoothing > 0,
    "loss.label_smoothing",
    "must be > 0 for loss.name='cdpo'",
  )
  need(rundir.is_num(l.gamma), "loss.gamma", "must be a finite number")
  for name in ("desirable_weight", "undesirable_weight"):
    need(rundir.is_num(getattr(l, name)) and getattr(l, name) >= 0, f"loss.{name}", "must be >= 0")
  o = c.optimizer
  need(
    rundir.is_num(o.learning_rate) and o.learning_rate > 0, "optimizer.learning_rate", "must be > 0"
  )
  need(
    rundir.is_int(o.warmup_steps) and o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0"
  )
  need(
    rundir.is_num(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0"
  )
  need(
    rundir.is_num(o.grad_clip) and o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0: none)"
  )
  e = c.eval
  need(rundir.is_int(e.every) and e.every >= 1, "eval.every", "must be an int >= 1")
  need(isinstance(e.report, bool), "eval.report", "must be True or False")
  need(
    rundir.is_int(e.bon_prompts) and e.bon_prompts >= 0, "eval.bon_prompts", "must be an int >= 0"
  )
  need(
    rundir.is_int(e.bon_samples) and e.bon_samples >= 1, "eval.bon_samples", "must be an int >= 1"
  )
  rundir.validate_log_config(c.log)
  for name in ("steps", "batch_size"):
    need(rundir.is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "must be an int >= 1")
  need(rundir.is_int(c.seed) and c.seed >= 0, "seed", "must be an int >= 0")
  need(c.parallel in PARALLEL_MODES, "parallel", f"must be one of {list(PARALLEL_MODES)}")
  need(
    c.matmul_dtype in ("", *DTYPES),
    "matmul_dtype",
    f"must be '' (the policy's own) or one of {list(DTYPES)}",
  )
  need(
    c.nonfinite in train_state_lib.NONFINITE_MODES,
    "nonfinite",
    f"must be one of {list(train_state_lib.NONFINITE_MODES)}",
  )
  n = jax.device_count() if num_devices is None else num_devices
  mode = c.parallel if c.parallel != "auto" else ("shard_map" if n > 1 else "jit")
  if mode in ("shard_map", "pmap"):
    need(
      c.batch_size % n == 0,
      "batch_size",
      f"must be divisible by the {n} devices of --config.parallel={mode}",
    )
  rundir.check_microbatch_size(c, devices=n, mode=mode, unit="pairs")
