"""Settings of a reward-model run and what they build: optimizer, loss and initial state.

:class:`TrainConfig` nests the library's own parts (``data``: :class:`jaxrm.data.pairs.DataConfig`,
``log``: :class:`jaxrm.io.rundir.LogConfig`) with the model, loss, optimizer and evaluation
settings below. It is what ``experiments/configs/reward_model.py`` returns, so every field is
overridable from the command line (``--config.optimizer.learning_rate=1e-3``). Configs are
mutable dataclasses (``ml_collections`` sets overrides with ``setattr``) and are treated as
immutable once a run starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrm.data import pairs
from jaxrm.io import program_cache, rundir
from jaxrm.math import preference
from jaxrm.models import presets
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import train_state as train_state_lib

PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap")
POOLINGS = ("last", "mean")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Sections and fields that do not change the trained parameters: they may differ on resume.
CHANGEABLE_ON_RESUME = (
  "eval",
  "log",
  "parallel",
  "microbatch_size",
  "nonfinite",
  "max_consecutive_skips",
)
# Fields added after runs were saved without them, with the value those runs computed with
# (:func:`jaxrm.io.rundir.check_resumable`).
ADDED_ON_RESUME = {"model.matmul_dtype": "", "model.pack_pairs": 0}


def with_matmul_dtype(model_config: TransformerConfig, matmul_dtype: str) -> TransformerConfig:
  """``model_config`` computing in ``matmul_dtype`` (a :data:`DTYPES` name; ``''``: unchanged),
  its parameters' dtype kept: ``'bfloat16'`` with float32 parameters is mixed precision
  (:mod:`jaxrm.models.precision`). The loops' ``matmul_dtype`` settings."""
  if not matmul_dtype:
    return model_config
  return dataclasses.replace(model_config, dtype=DTYPES[matmul_dtype])


@dataclasses.dataclass
class ModelConfig:
  """The reward model: a preset backbone (:data:`jaxrm.models.presets.PRESETS`) and a pooling
  (``'last'`` real token or ``'mean'``, :class:`jaxrm.models.reward_model.RewardModel`).

  ``hf_checkpoint``: a local Hugging Face checkpoint folder (:func:`jaxrm.io.hf.import_reward_model`:
  GPT-2, Llama, Mistral, Qwen2; a ``*ForSequenceClassification`` score head is kept, otherwise
  the head starts at zero) whose backbone replaces the preset. Its ``tokenizer.json``, if any,
  is the run's tokenizer unless ``data.tokenizer`` names another.

  ``dtype``: ``'float32'`` or ``'bfloat16'`` (parameters and matmuls; GPU/TPU);
  ``matmul_dtype``: ``''`` (matmuls in ``dtype``) or ``'bfloat16'`` with float32 parameters:
  mixed precision as ``torch.autocast`` does it, the projections' and the attention's
  matmuls on bfloat16 operands with float32 sums, forward and backward, the
  parameters, optimizer state, norms and attention softmax in float32; several times float32's
  matmul speed on CPUs with AMX and on GPU/TPU;
  ``remat``: rematerialise block activations in the backward pass (long sequences);
  ``attention_query_block``: None, or attend in causal query blocks of this many tokens
  (:attr:`jaxrm.models.transformer.TransformerConfig.attention_query_block`: the same
  attention without the masked half of the score matrix; faster for long sequences on CPU);
  ``pack_pairs``: 0 (each training pair as two rows, chosen and rejected) or ``N``: one row
  per pair, their common token prefix once and then each one's own tokens, padded to a
  multiple of ``N`` tokens (:mod:`jaxrm.data.packing`; the same rewards, loss and gradients
  up to float rounding, fewer tokens when the prompts are long and the responses short;
  ``pooling='last'`` only; evaluation keeps two rows).
  """

  preset: str = "tiny"
  pooling: str = "last"
  hf_checkpoint: str = ""
  dtype: str = "float32"
  matmul_dtype: str = ""
  remat: bool = False
  attention_query_block: int | None = None
  pack_pairs: int = 0


@dataclasses.dataclass
class LossConfig:
  """The pairwise loss.

  Attributes:
    name: a name of :func:`jaxrm.math.preference.get_loss`.
    margin: the loss's margin (None: the loss's default, 0 or 1 for the hinge).
    label_smoothing: in ``[0, 1]``.
    center_coef: coefficient of :func:`jaxrm.math.preference.reward_centering_penalty` on the
      batch's rewards (computed per device shard under ``shard_map``/``pmap``).
  """

  name: str = "bradley_terry"
  margin: float | None = None
  label_smoothing: float = 0.0
  center_coef: float = 0.0


@dataclasses.dataclass
class OptimizerConfig:
  """AdamW with linear warm-up and cosine decay to 10% (:func:`make_optimizer`).

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up steps.
    weight_decay: decoupled weight decay on matrices (not on biases, norms).
    grad_clip: global-norm gradient clipping (0: none).
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 50
  weight_decay: float = 0.01
  grad_clip: float = 1.0


@dataclasses.dataclass
class EvalConfig:
  """Held-out evaluation: every ``every`` steps (and at every checkpoint and the end), and
  the report of the final model when ``report``."""

  every: int = 100
  report: bool = True


@dataclasses.dataclass
class TrainConfig:
  """Every setting of a reward-model run (:func:`jaxrm.train.reward_model.train_and_evaluate`).

  Attributes:
    data: the preference pairs.
    model: the reward model.
    loss: the pairwise loss.
    optimizer: the optimizer.
    eval: held-out evaluation and report.
    log: metrics rows, checkpoints, plots, TensorBoard / W&B.
    steps: optimizer steps.
    batch_size: pairs per step (global; divisible by the devices in multi-device modes).
    microbatch_size: pairs per microbatch on each device (0: the whole batch at once). The
      step runs forward and backward over slices of this many pairs one after another and
      sums their gradients (:func:`jaxrm.steps.rm_step.reward_model_step`): the same update
      up to float rounding, the activations of one slice at a time (gradient accumulation;
      on a CPU, activations that can stay in cache). Must divide the pairs each device gets, or
      be at least that many (the whole batch). Like ``parallel``, it may change on resume.
    seed: seed of the initialisation, the step keys and the data order.
    parallel: ``'auto'``, ``'jit'``, ``'shard_map'`` or ``'pmap'``
      (:func:`jaxrm.steps.parallel.make_parallel_step`).
    nonfinite: ``'skip'`` a step with a non-finite loss, gradient or update, or ``'raise'``.
    max_consecutive_skips: stop the run (:class:`jaxrm.io.rundir.RunStopped`, naming the last
      good checkpoint) once this many consecutive updates were skipped, or every update of a
      run shorter than that; 0 never stops.
  """

  data: pairs.DataConfig = dataclasses.field(default_factory=pairs.DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  log: rundir.LogConfig = dataclasses.field(default_factory=rundir.LogConfig)
  steps: int = 1000
  batch_size: int = 32
  microbatch_size: int = 0
  seed: int = 0
  parallel: str = "auto"
  nonfinite: str = "skip"
  max_consecutive_skips: int = 20

  def to_json(self) -> dict[str, Any]:
    """The fields as a nested JSON-serialisable dict (tuples as lists)."""
    return rundir.config_to_json(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> TrainConfig:
    """Inverse of :meth:`to_json`; unknown keys raise ``ValueError``."""
    return rundir.config_from_json(cls, d)


def execution_settings(config: TrainConfig, backbone: TransformerConfig) -> TransformerConfig:
  """``backbone`` with ``config.model``'s settings of how it computes, which leave its
  parameters' shapes and dtypes alone (``attention_query_block``, ``matmul_dtype``)."""
  block = config.model.attention_query_block
  if block is not None:
    backbone = dataclasses.replace(backbone, attention_query_block=block)
  return with_matmul_dtype(backbone, config.model.matmul_dtype)


def preset_backbone(config: TrainConfig, *, vocab_size: int, max_len: int) -> TransformerConfig:
  """The backbone of ``config.model.preset`` for ``vocab_size`` token ids and ``max_len``
  tokens, in ``config.model.dtype``, with ``remat`` and :func:`execution_settings`."""
  dtype = DTYPES[config.model.dtype]
  backbone = presets.preset(
    config.model.preset,
    vocab_size=vocab_size,
    max_len=max_len,
    **({} if dtype == DTYPES["float32"] else {"dtype": dtype, "param_dtype": dtype}),
    **({"remat": True} if config.model.remat else {}),
  )
  return execution_settings(config, backbone)


def validate_config(config: TrainConfig, *, num_devices: int | None = None) -> None:
  """Checks every setting; raises :class:`jaxrm.io.rundir.ConfigError` naming the first bad
  one by its dotted path (``optimizer.learning_rate``).

  Args:
    config: the settings.
    num_devices: devices of the multi-device modes (default: ``jax.device_count()``),
      which must divide ``batch_size``.
  """
  c = config

  need = functools.partial(rundir.check, c)
  rundir.check_finite_fields(c)

  pairs.validate_data_config(c.data)
  need(
    c.model.preset in presets.PRESETS, "model.preset", f"must be one of {sorted(presets.PRESETS)}"
  )
  need(c.model.pooling in POOLINGS, "model.pooling", f"must be one of {list(POOLINGS)}")
  need(
    rundir.is_int(c.model.pack_pairs) and c.model.pack_pairs >= 0,
    "model.pack_pairs",
    "must be an int >= 0 (0: two rows per pair)",
  )
  need(
    not c.model.pack_pairs or c.model.pooling == "last",
    "model.pack_pairs",
    f"packed pairs read each reward at its last token: needs model.pooling='last', got "
    f"{c.model.pooling!r}",
  )
  need(isinstance(c.model.hf_checkpoint, str), "model.hf_checkpoint", "must be a path or ''")
  need(c.model.dtype in DTYPES, "model.dtype", f"must be one of {list(DTYPES)}")
  need(
    c.model.matmul_dtype in ("", *DTYPES),
    "model.matmul_dtype",
    f"must be '' (model.dtype) or one of {list(DTYPES)}",
  )
  need(isinstance(c.model.remat, bool), "model.remat", "must be True or False")
  block = c.model.attention_query_block
  need(
    block is None or (rundir.is_int(block) and block >= 1),
    "model.attention_query_block",
    "must be None or a positive integer",
  )
  if c.model.hf_checkpoint:
    need(
      os.path.isfile(os.path.join(c.model.hf_checkpoint, "config.json")),
      "model.hf_checkpoint",
      "is not a Hugging Face checkpoint folder (no config.json in it)",
    )
    need(not c.data.is_synthetic, "model.hf_checkpoint", "needs text data (data.files)")
  need(
    c.loss.name in preference.LOSS_NAMES,
    "loss.name",
    f"must be one of {list(preference.LOSS_NAMES)}",
  )
  need(
    c.loss.margin is None or rundir.is_num(c.loss.margin), "loss.margin", "must be a finite number"
  )
  need(
    rundir.is_num(c.loss.label_smoothing) and 0.0 <= c.loss.label_smoothing <= 1.0,
    "loss.label_smoothing",
    "must be in [0, 1]",
  )
  need(
    rundir.is_num(c.loss.center_coef) and c.loss.center_coef >= 0,
    "loss.center_coef",
    "must be >= 0",
  )
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
  need(rundir.is_int(c.eval.every) and c.eval.every >= 1, "eval.every", "must be an int >= 1")
  need(isinstance(c.eval.report, bool), "eval.report", "must be True or False")
  rundir.validate_log_config(c.log)
  need(rundir.is_int(c.batch_size) and c.batch_size >= 1, "batch_size", "must be an int >= 1")
  need(rundir.is_int(c.steps) and c.steps >= 1, "steps", "must be an int >= 1")
  need(rundir.is_int(c.seed) and c.seed >= 0, "seed", "must be an int >= 0")
  need(c.parallel in PARALLEL_MODES, "parallel", f"must be one of {list(PARALLEL_MODES)}")
  need(
    c.nonfinite in train_state_lib.NONFINITE_MODES,
    "nonfinite",
    f"must be one of {list(train_state_lib.NONFINITE_MODES)}",
  )
  need(
    rundir.is_int(c.max_consecutive_skips) and c.max_consecutive_skips >= 0,
    "max_consecutive_skips",
    "must be an int >= 0 (0: never stop)",
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


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warm-up and cosine decay to 10%, global-norm clipping first.

  Equal settings (``config.optimizer`` and ``config.steps``) give the same objects, so that a
  process that trains several runs compiles their initial state (:func:`init_state`) and
  schedule once.

  Returns:
    ``(optimizer, learning_rate_schedule)``; the schedule returned is jitted (one program for
    the loops' logged learning rate; evaluated op by op it compiled a dozen small programs).
  """
  o = config.optimizer
  return _optimizer(o.learning_rate, o.warmup_steps, o.weight_decay, o.grad_clip, config.steps)


@functools.lru_cache(maxsize=16)
def _optimizer(learning_rate, warmup_steps, weight_decay, grad_clip, steps):
  warmup = min(warmup_steps, steps)
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=0.1 * learning_rate,
  )
  decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), jax.jit(schedule)


def make_loss_fn(config: LossConfig):
  """The pairwise loss of ``config`` plus the reward-centring penalty (if ``center_coef``)."""
  kwargs = {"label_smoothing": config.label_smoothing}
  if config.margin is not None:
    kwargs["margin"] = config.margin
  base = preference.get_loss(config.name, **kwargs)
  if not config.center_coef:
    return base

  def loss_fn(rewards_chosen, rewards_rejected, *, weights=None, labels=None):
    return base(
      rewards_chosen, rewards_rejected, weights=weights, labels=labels
    ) + preference.reward_centering_penalty(
      rewards_chosen, rewards_rejected, coef=config.center_coef
    )

  return loss_fn


@functools.lru_cache(maxsize=8)
def _jitted_init(
  model: RewardModel, optimizer: optax.GradientTransformation, length: int, settings: str
):
  # One compiled program for the whole state per architecture, optimizer and process (a fresh
  # jax.jit would recompile): the optimizer's initial state built op by op cost one small
  # compile per distinct leaf shape, 0.5 s of the HH run (BUILD_NOTES.md, session 36).
  # ``settings``: the optimizer's config, which with the model determines the program on disk.
  def init(root):
    tokens = jnp.zeros((1, length), jnp.int32)
    params = model.init(jax.random.fold_in(root, 0), tokens, jnp.ones(tokens.shape, bool))
    return train_state_lib.create_train_state(params, optimizer, jax.random.fold_in(root, 1))

  return program_cache.jit(init, name="rm_init", key=f"{model!r}\n{length}\n{settings}")


def init_state(
  config: TrainConfig,
  model: RewardModel,
  optimizer: optax.GradientTransformation,
  max_len: int,
  *,
  params: Any = None,
) -> train_state_lib.TrainState:
  """The step-0 train state: parameters from ``fold_in(key(seed), 0)`` (or ``params``, e.g.
  an imported checkpoint's variables), step keys from ``fold_in(key(seed), 1)``."""
  root = jax.random.key(config.seed)
  if params is None:
    settings = json.dumps([rundir.config_to_json(config.optimizer), config.steps], sort_keys=True)
    return _jitted_init(model, optimizer, min(max_len, 8), settings)(root)
  params = jax.tree.map(jnp.asarray, params)
  return train_state_lib.create_train_state(params, optimizer, jax.random.fold_in(root, 1))


def abstract_state(
  config: TrainConfig, model: RewardModel, optimizer: optax.GradientTransformation, max_len: int
) -> Any:
  """Shapes, dtypes and a default-device sharding of :func:`init_state` (nothing computed);
  a restore template."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda: init_state(config, model, optimizer, max_len))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
