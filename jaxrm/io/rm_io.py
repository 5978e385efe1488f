"""Reward-model run directories: config serialisation and loading trained reward models.

A reward-model run directory ``<workdir>`` (written by the reward-model training script) holds
``<workdir>/checkpoints/<step>/`` checkpoints of :class:`jaxrm.io.checkpoint.CheckpointManager`:
``state`` is the :class:`jaxrm.steps.train_state.TrainState` of a
:class:`jaxrm.models.reward_model.RewardModel`, and the JSON ``extra`` contains at least

* ``model_config``: the :class:`jaxrm.models.transformer.TransformerConfig` as JSON
  (:func:`config_to_json`; ``dtype`` and ``param_dtype`` as ``"float32"`` / ``"bfloat16"``,
  ``rope_scaling`` as an object or null);
* ``pooling``: ``"last"`` or ``"mean"``;
* ``tokenizer``: ``"byte"`` or ``"synthetic"``;
* ``data`` (iterator state) and ``metrics`` (e.g. ``eval_accuracy``).

:func:`load_reward_model` restores only the parameters (``state.params``, an orbax partial
restore), so the optimizer used for training need not be known; the model is rebuilt from
``model_config`` and ``pooling``. :func:`load_reward_ensemble` stacks several runs of the same
architecture for :func:`jaxrm.models.ensemble.apply_ensemble`. Loading never modifies the run
directory.

Example::

  apply_fn, params, extra = load_reward_model("runs/rm_small", which="best")
  rewards = apply_fn(params, tokens, mask)                        # [batch]
  apply_fn, stacked = load_reward_ensemble(["runs/rm_0", "runs/rm_1"])
  member_rewards = apply_ensemble(apply_fn, stacked, tokens, mask)  # [2, batch]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxrm.io import checkpoint
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import RopeScaling, TransformerConfig

CHECKPOINT_DIR = "checkpoints"
WHICH = ("latest", "best")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}
_DTYPE_FIELDS = ("dtype", "param_dtype")


def config_to_json(cfg: TransformerConfig) -> dict[str, Any]:
  """The fields of ``cfg`` as a JSON-serialisable dict (``dtype`` as its name)."""
  if not isinstance(cfg, TransformerConfig):
    raise ValueError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
  out = dataclasses.asdict(cfg)  # rope_scaling (a dataclass or None) becomes a dict or None
  for field in _DTYPE_FIELDS:
    name = jnp.dtype(getattr(cfg, field)).name
    if name not in _DTYPES:
      raise ValueError(f"cfg.{field} must be one of {sorted(_DTYPES)}, got {name}")
    out[field] = name
  return out


def config_from_json(d: dict[str, Any]) -> TransformerConfig:
  """Inverse of :func:`config_to_json`; raises ``ValueError`` naming a bad or unknown field."""
  if not isinstance(d, dict):
    raise ValueError(f"model_config must be a JSON object, got {type(d).__name__}")
  unknown = sorted(set(d) - _FIELDS)
  if unknown:
    raise ValueError(
      f"model_config has unknown fields {unknown}; expected a subset of {sorted(_FIELDS)}"
    )
  fields = dict(d)
  for field in _DTYPE_FIELDS:
    if field in fields:
      if fields[field] not in _DTYPES:
        raise ValueError(
          f"model_config field '{field}' must be one of {sorted(_DTYPES)}, got {fields[field]!r}"
        )
      fields[field] = _DTYPES[fields[field]]
  if isinstance(fields.get("rope_scaling"), dict):
    try:
      fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    except TypeError as e:
      raise ValueError(f"model_config field 'rope_scaling' is malformed: {e}") from None
  try:
    return TransformerConfig(**fields)
  except TypeError as e:  # a missing required field
    raise ValueError(f"model_config is incomplete: {e}") from None


def _manager(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"{workdir} is not a reward-model run directory: {directory} does not exist"
    )
  # Not read_only=True (orbax then warns on every load); nothing here saves or deletes.
  return ocp.CheckpointManager(
    directory,
    item_names=("state", "extra"),
    options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False),
  )


def _read_extra(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  extra = mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
  if not isinstance(extra, dict):
    raise ValueError(
      f"checkpoint {mgr.directory}/{step}: extra is {type(extra).__name__}, expected a JSON object"
    )
  return extra


def _candidate_steps(
  mgr: ocp.CheckpointManager, workdir: str, which: str, best_metric: str, best_mode: str
) -> list[int]:
  """Steps to try, in order: newest first ('latest') or the single best step ('best')."""
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {mgr.directory} (run directory {workdir})")
  if which == "latest":
    return steps
  scored = []
  for step in steps:
    try:
      value = float((_read_extra(mgr, step).get("metrics") or {})[best_metric])
    except (KeyError, TypeError, ValueError):
      continue
    if math.isfinite(value):
      scored.append((value if best_mode == "max" else -value, step))
  if not scored:
    raise ValueError(
      f"no checkpoint in {mgr.directory} has a finite metrics[{best_metric!r}] "
      "in its extra; use which='latest' or another best_metric"
    )
  return [max(scored)[1]]


def _model(extra: dict[str, Any], where: str) -> RewardModel:
  for field in ("model_config", "pooling"):
    if field not in extra:
      raise ValueError(f"{where}: extra is missing the field {field!r} (has {sorted(extra)})")
  try:
    cfg = config_from_json(extra["model_config"])
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if extra["pooling"] not in ("last", "mean"):
    raise ValueError(
      f"{where}: extra field 'pooling' must be 'last' or 'mean', got {extra['pooling']!r}"
    )
  return RewardModel(cfg, pooling=extra["pooling"])


def _params_template(model: RewardModel) -> Any:
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy, jnp.ones((1, 1), bool))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _restore(
  mgr: ocp.CheckpointManager, step: int
) -> tuple[Callable[..., jax.Array], Any, dict[str, Any]]:
  where = f"checkpoint {mgr.directory}/{step}"
  extra = _read_extra(mgr, step)
  model = _model(extra, where)
  template = {"params": _params_template(model)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(template)
  restored = mgr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=template, restore_args=restore_args, partial_restore=True)
    ),
  )["state"]
  params = restored["params"]
  extra = checkpoint.check_integrity(extra, step, params, prefix=".params")
  got = jax.tree.structure(params)
  want = jax.tree.structure(template["params"])
  if got != want:
    raise ValueError(
      f"{where}: the saved params do not match model_config/pooling: {got} vs {want}"
    )
  for (path, x), t in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(template["params"])
  ):
    if x.shape != t.shape or x.dtype != t.dtype:
      raise ValueError(
        f"{where}: params{jax.tree_util.keystr(path)} has shape {x.shape} "
        f"{x.dtype}, model_config implies {t.shape} {t.dtype}"
      )
  return model.apply, params, extra


def load_reward_model(
  workdir: str | os.PathLike,
  *,
  which: str = "latest",
  best_metric: str = "eval_accuracy",
  best_mode: str = "max",
) -> tuple[Callable[..., jax.Array], Any, dict[str, Any]]:
  """Loads a trained reward model from its run directory.

  Args:
    workdir: the run directory (holding ``checkpoints/``).
    which: ``'latest'`` (the newest readable checkpoint: an unreadable one is logged and the
      previous one tried) or ``'best'`` (the checkpoint whose ``extra['metrics']
      [best_metric]`` is best).
    best_metric: metric name for ``which='best'`` (the reward-model training script records
      ``eval_accuracy``).
    best_mode: ``'max'`` or ``'min'``.

  Returns:
    ``(apply_fn, params, extra)``: ``apply_fn(params, tokens [b, s], mask [b, s]) ->
    rewards [b]`` (``RewardModel(config, pooling).apply``), the restored parameters (on the
    first local device) and the checkpoint's JSON extra (``extra['step']`` is set to the
    restored step).

  Raises:
    FileNotFoundError: no ``checkpoints/`` directory or no checkpoint in it.
    ValueError: a bad ``which``, a malformed extra (naming the field) or parameters that do
      not match the recorded architecture.
    RuntimeError: several checkpoints exist but none can be read (every error listed; with
      a single checkpoint its own error is raised).
  """
  mgr = _manager(workdir)
  failures = []
  try:
    for step in _candidate_steps(mgr, os.fspath(workdir), which, best_metric, best_mode):
      try:
        apply_fn, params, extra = _restore(mgr, step)
      except Exception as e:  # pylint: disable=broad-except  # unreadable: try the previous
        logging.warning(
          "Could not read the reward model at %s/%d (%s: %s)",
          mgr.directory,
          step,
          type(e).__name__,
          e,
        )
        failures.append((step, e))
        continue
      return apply_fn, params, {**extra, "step": step}
  finally:
    mgr.close()
  if len(failures) == 1:
    raise failures[0][1]
  details = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
  raise RuntimeError(f"no checkpoint of {workdir} could be read: {details}")


def read_extra(
  workdir: str | os.PathLike,
  *,
  which: str = "latest",
  best_metric: str = "eval_accuracy",
  best_mode: str = "max",
) -> dict[str, Any]:
  """The JSON extra of the checkpoint :func:`load_reward_model` would pick (no arrays read).

  With ``which='latest'`` it is the newest checkpoint whose extra is readable. The returned
  dict has ``'step'`` set to that checkpoint's step.
  """
  mgr = _manager(workdir)
  try:
    errors = []
    for step in _candidate_steps(mgr, os.fspath(workdir), which, best_metric, best_mode):
      try:
        return {**checkpoint.check_integrity(_read_extra(mgr, step), step), "step": step}
      except Exception as e:  # pylint: disable=broad-except  # unreadable: try the previous
        errors.append(f"step {step}: {type(e).__name__}: {e}")
  finally:
    mgr.close()
  raise RuntimeError(f"no checkpoint extra of {workdir} could be read: {'; '.join(errors)}")


def load_reward_ensemble(
  workdirs: Sequence[str | os.PathLike],
  *,
  which: str = "latest",
  best_metric: str = "eval_accuracy",
  best_mode: str = "max",
) -> tuple[Callable[..., jax.Array], Any]:
  """Loads several reward-model runs of one architecture as an ensemble.

  Args:
    workdirs: run directories (at least one). Their ``model_config``, ``pooling`` and
      ``tokenizer`` must agree.
    which, best_metric, best_mode: see :func:`load_reward_model` (per member).

  Returns:
    ``(apply_fn, stacked_params)``: the *member* ``apply_fn(params, tokens, mask) -> [b]``
    and parameters whose leaves have a leading axis ``k = len(workdirs)``; member rewards are
    ``jaxrm.models.ensemble.apply_ensemble(apply_fn, stacked_params, tokens, mask)`` ``[k, b]``.

  Raises:
    ValueError: no directory, or members with different architectures (naming them).
  """
  if isinstance(workdirs, (str, os.PathLike)) or not workdirs:
    raise ValueError(f"workdirs must be a non-empty list of run directories, got {workdirs!r}")
  members = [
    load_reward_model(w, which=which, best_metric=best_metric, best_mode=best_mode)
    for w in workdirs
  ]
  first = members[0][2]
  for w, (_, _, extra) in zip(workdirs[1:], members[1:]):
    for field in ("model_config", "pooling", "tokenizer"):
      if extra.get(field) != first.get(field):
        raise ValueError(
          f"ensemble members must share the architecture: {field} of {w} is "
          f"{extra.get(field)!r}, of {workdirs[0]} {first.get(field)!r}"
        )
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[m[1] for m in members])
  return members[0][0], stacked


def _first_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_params(
  workdir: str | os.PathLike,
  template_fn: Callable[[dict[str, Any]], Any],
  *,
  which: str = "latest",
) -> tuple[Any, dict[str, Any]]:
  """``(params, extra)`` of any run whose checkpoints hold ``state.params`` (reward-model,
  SFT and other :class:`jaxrm.steps.train_state.TrainState` runs).

  Args:
    workdir: the run directory (holding ``checkpoints/``).
    template_fn: ``extra -> params`` shapes (``jax.eval_shape`` of the model's init), from
      the checkpoint's JSON extra.
    which: ``'latest'`` (the newest readable checkpoint) or ``'best'`` (by
      ``eval_accuracy``).

  Returns:
    The restored parameters (on the first local device) and the extra (with ``'step'``).
  """
  mgr = _manager(workdir)
  errors = []
  try:
    for step in _candidate_steps(mgr, os.fspath(workdir), which, "eval_accuracy", "max"):
      try:
        extra = _read_extra(mgr, step)
        template = jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_first_device()),
          template_fn(extra),
        )
        restored = mgr.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
              item={"params": template},
              restore_args=ocp.checkpoint_utils.construct_restore_args({"params": template}),
              partial_restore=True,
            )
          ),
        )["state"]
        params = restored["params"]
        extra = checkpoint.check_integrity(extra, step, params, prefix=".params")
        return params, {**extra, "step": step}
      except Exception as e:  # pylint: disable=broad-except  # unreadable: try the previous
        logging.warning("Could not read %s/%d (%s: %s)", mgr.directory, step, type(e).__name__, e)
        errors.append(f"step {step}: {type(e).__name__}: {e}")
  finally:
    mgr.close()
  raise RuntimeError(f"no checkpoint of {workdir} could be read: {'; '.join(errors)}")
