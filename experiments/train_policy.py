r"""Optimises a policy against a reward with PPO, REINFORCE, RLOO or GRPO (:mod:`jaxrm.steps.rl`).

A thin main: the flags become a :class:`PolicyRunConfig` and :func:`train_policy` runs it,
writing under ``--workdir`` the per-step metrics (``metrics.jsonl``) and checkpoints
(``checkpoints/``: policy and value head, optimizer, KL controller, baseline, PRNG key,
step). Re-running the same command resumes from the last checkpoint and ends with the
parameters of an uninterrupted run. A bad flag value stops the script with one line naming
the flag.

Rewards (``--reward``): a reward-model run directory (``experiments/train_reward_model.py``);
several, comma-separated, as an ensemble combined by ``--ensemble_objective``
(``mean``, ``worst_case``, ``uncertainty_weighted`` with ``--uncertainty_coef``);
``token_frequency:<id>`` (the fraction of response tokens equal to ``id``); or
``synthetic_gold`` (the gold reward of the synthetic world). Policies (``--policy``):
``synthetic`` (``pi_init`` of the synthetic world, ``--synthetic_seed`` /
``--synthetic_world`` as in the reward-model script) or a preset name (a randomly initialised
byte-level policy; prompts from ``--prompts`` JSONL preference files, else BOS only).

PPO against a proxy reward model of the synthetic world::

  python experiments/train_reward_model.py --data=synthetic --workdir=runs/rm_synthetic
  python experiments/train_policy.py --algo=ppo --reward=runs/rm_synthetic \
      --policy=synthetic --kl_coef=0.05 --steps=200 --workdir=runs/ppo_synthetic

RLOO on a rule-based reward, adaptive KL::

  python experiments/train_policy.py --algo=rloo --reward=token_frequency:5 \
      --target_kl=4 --steps=100 --workdir=runs/rloo_tf5
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import gzip
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.data import (
  preferences,  # noqa: E402
  synthetic,  # noqa: E402
  tokenizer,  # noqa: E402
)
from jaxrm.io import checkpoint as checkpoint_lib  # noqa: E402
from jaxrm.io import (
  rm_io,  # noqa: E402
  rundir,  # noqa: E402
)
from jaxrm.math import objectives  # noqa: E402
from jaxrm.models import ensemble as ensemble_lib  # noqa: E402
from jaxrm.models import presets  # noqa: E402
from jaxrm.models.policy import PolicyModel, transformer_policy  # noqa: E402
from jaxrm.steps import (
  parallel,  # noqa: E402
  rl,  # noqa: E402
)
from jaxrm.steps import rollout as rollout_lib  # noqa: E402


class ConfigError(rundir.ConfigError):
  """A bad flag of this script (named ``--<field>``)."""

  def flag_message(self) -> str:
    value = self.value
    if isinstance(value, (tuple, list)):
      value = ",".join(map(str, value))
    elif isinstance(value, Mapping):
      value = ",".join(f"{k}={v}" for k, v in value.items())
    return f"flag --{self.field}={value}: {self.message}"


def parse_world_overrides(text: str) -> dict[str, Any]:
  try:
    return synthetic.parse_world_overrides(text)
  except ValueError as e:
    raise ConfigError("synthetic_world", text, str(e)) from None


METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap")
# Fields that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "parallel")
DEFAULT_PROMPT_LEN = 64  # byte-level prompts read from --prompts
DEFAULT_NEW_TOKENS = 64  # byte-level responses


@dataclasses.dataclass(frozen=True)
class PolicyRunConfig:
  """Every setting of a policy-optimisation run (one per flag of the script)."""

  algo: str = "ppo"
  reward: str = "synthetic_gold"
  ensemble_objective: str = "mean"
  uncertainty_coef: float = 0.5
  rm_checkpoint: str = "latest"
  policy: str = "synthetic"
  prompts: tuple[str, ...] = ()
  prompt_len: int = 0  # 0: the world's (synthetic), 1 (BOS only) or DEFAULT_PROMPT_LEN
  max_new_tokens: int = 0  # 0: the world's response_len (synthetic) or DEFAULT_NEW_TOKENS
  synthetic_seed: int = 0
  synthetic_world: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kl_coef: float = 0.05
  target_kl: float | None = None
  kl_horizon: float = 10000.0
  kl_estimator: str = "k1"
  steps: int = 100
  batch_size: int = 64
  learning_rate: float = 3e-4
  max_grad_norm: float = 1.0
  num_epochs: int = 4
  num_minibatches: int = 4
  num_samples: int = 4
  clip_eps: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  temperature: float = 1.0
  baseline: str = "moving_average"
  grpo_kl: str = "loss"
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  parallel: str = "auto"
  nonfinite: str = "skip"

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["prompts"] = list(self.prompts)
    d["synthetic_world"] = dict(self.synthetic_world)
    return d


# ----------------------------------------------------------------------------- validation
def parse_reward(spec: str) -> tuple[str, Any]:
  """``('token_frequency', id)``, ``('synthetic_gold', None)`` or ``('rm', [dirs])``."""
  spec = spec.strip()
  if spec.startswith("token_frequency:"):
    value = spec.split(":", 1)[1]
    try:
      token = int(value)
    except ValueError:
      raise ConfigError(
        "reward", spec, f"token_frequency needs an integer token id, got {value!r}"
      ) from None
    if token < 0:
      raise ConfigError("reward", spec, "the token id must be >= 0")
    return "token_frequency", token
  if spec == "synthetic_gold":
    return "synthetic_gold", None
  dirs = [d.strip() for d in spec.split(",") if d.strip()]
  if not dirs:
    raise ConfigError(
      "reward",
      spec,
      "expected a reward-model run directory (or several, "
      "comma-separated), token_frequency:<id> or synthetic_gold",
    )
  for d in dirs:
    if not os.path.isdir(os.path.join(d, rm_io.CHECKPOINT_DIR)):
      raise ConfigError(
        "reward",
        spec,
        f"{d} is not a reward-model run directory (no "
        f"{rm_io.CHECKPOINT_DIR}/ in it); named rewards are "
        "token_frequency:<id> and synthetic_gold",
      )
  return "rm", dirs


def validate_config(c: PolicyRunConfig, *, num_devices: int | None = None) -> None:
  """Checks every setting; raises :class:`ConfigError` naming the first bad one.

  Checks that need the reward model or the world (token ranges, lengths, tokenizers) are
  made by :func:`build_run`, with the same error type.
  """

  def need(ok, field, message):
    if not ok:
      raise ConfigError(field, getattr(c, field), message)

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  need(c.algo in rl.ALGORITHMS, "algo", f"must be one of {list(rl.ALGORITHMS)}")
  parse_reward(c.reward)
  need(
    c.ensemble_objective in objectives.OBJECTIVES,
    "ensemble_objective",
    f"must be one of {list(objectives.OBJECTIVES)}",
  )
  need(c.uncertainty_coef >= 0, "uncertainty_coef", "must be >= 0")
  need(c.rm_checkpoint in rm_io.WHICH, "rm_checkpoint", f"must be one of {list(rm_io.WHICH)}")
  need(
    c.policy == "synthetic" or c.policy in presets.PRESETS,
    "policy",
    f"must be 'synthetic' or a preset: {sorted(presets.PRESETS)}",
  )
  need(
    not (c.prompts and c.policy == "synthetic"),
    "prompts",
    "prompt files need a byte-level (preset) policy; the synthetic policy samples "
    "synthetic prompts",
  )
  for p in c.prompts:
    need(os.path.isfile(p), "prompts", f"no such file: {p}")
  for name in ("prompt_len", "max_new_tokens", "synthetic_seed", "seed"):
    need(is_int(getattr(c, name)) and getattr(c, name) >= 0, name, "must be an int >= 0")
  parse_world_overrides(",".join(f"{k}={v}" for k, v in c.synthetic_world.items()))
  need(c.kl_coef >= 0, "kl_coef", "must be >= 0")
  need(c.target_kl is None or c.target_kl > 0, "target_kl", "must be > 0 (or unset: fixed)")
  need(c.kl_horizon > 0, "kl_horizon", "must be > 0")
  need(c.kl_estimator in ("k1", "k2", "k3"), "kl_estimator", "must be one of k1, k2, k3")
  for name in (
    "steps",
    "batch_size",
    "num_epochs",
    "num_minibatches",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
  ):
    need(is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "must be an int >= 1")
  need(is_int(c.num_samples) and c.num_samples >= 2, "num_samples", "must be an int >= 2")
  need(c.learning_rate > 0, "learning_rate", "must be > 0")
  need(c.max_grad_norm > 0, "max_grad_norm", "must be > 0")
  need(c.clip_eps > 0, "clip_eps", "must be > 0")
  need(c.value_coef >= 0, "value_coef", "must be >= 0")
  need(c.entropy_coef >= 0, "entropy_coef", "must be >= 0")
  need(c.temperature > 0, "temperature", "must be > 0")
  need(c.baseline in rl.BASELINES, "baseline", f"must be one of {list(rl.BASELINES)}")
  need(c.grpo_kl in rl.GRPO_KL, "grpo_kl", f"must be one of {list(rl.GRPO_KL)}")
  need(c.parallel in PARALLEL_MODES, "parallel", f"must be one of {list(PARALLEL_MODES)}")
  need(c.nonfinite in ("skip", "raise"), "nonfinite", "must be 'skip' or 'raise'")
  devices = jax.device_count() if num_devices is None else num_devices
  shards = 1 if c.parallel == "jit" or (c.parallel == "auto" and devices == 1) else devices
  need(
    c.batch_size % shards == 0,
    "batch_size",
    f"must be divisible by the number of devices ({shards}) in --parallel={c.parallel} "
    "mode (or pass --parallel=jit)",
  )
  if c.algo in ("ppo", "grpo"):
    local = c.batch_size // shards * (c.num_samples if c.algo == "grpo" else 1)
    need(
      local % c.num_minibatches == 0,
      "num_minibatches",
      f"must divide the sequences per device per step ({local})",
    )


# ----------------------------------------------------------------------------- building
@dataclasses.dataclass
class Run:
  """Everything built from a config: models, reward, prompts and the compiled step."""

  config: PolicyRunConfig
  rl_config: rl.RLConfig
  tokenizer: str  # 'synthetic' or 'byte'
  init_params: Any  # policy (with the value head for PPO)
  ref_params: Any
  reward_fn: Callable[..., jax.Array]
  reward_params: Any
  optimizer: optax.GradientTransformation
  prompts: Callable[[int], dict[str, np.ndarray]]  # step -> batch
  pstep: parallel.ParallelStep
  state_key: jax.Array


def _world(c: PolicyRunConfig) -> tuple[synthetic.WorldConfig, synthetic.World]:
  world_cfg = synthetic.WorldConfig(**dict(c.synthetic_world))
  return world_cfg, synthetic.init_world(world_cfg, jax.random.key(c.synthetic_seed))


def _read_prompt_texts(paths) -> list[str]:
  texts = []
  for path in paths:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          texts.append(preferences.parse_preference_line(raw).prompt)
        except preferences.PreferenceDataError as e:
          raise ConfigError("prompts", path, str(e.with_location(path, line_no))) from None
  if not texts:
    raise ConfigError("prompts", ",".join(paths), "no prompts in the files")
  return texts


def _prompt_source(
  c: PolicyRunConfig,
  key: jax.Array,
  *,
  world_cfg=None,
  prompt_len: int,
) -> Callable[[int], dict[str, np.ndarray]]:
  """A deterministic function ``step -> {'prompts', 'prompt_mask'}`` (so resuming is exact)."""
  b = c.batch_size
  if world_cfg is not None:
    sample = jax.jit(synthetic.sample_prompts, static_argnums=(0, 2))

    def synthetic_prompts(step):
      prompts = np.asarray(sample(world_cfg, jax.random.fold_in(key, step), b))
      return {"prompts": prompts, "prompt_mask": np.ones(prompts.shape, bool)}

    return synthetic_prompts
  if not c.prompts:
    ones = np.full((b, prompt_len), tokenizer.BOS_ID, np.int32)
    return lambda step: {"prompts": ones, "prompt_mask": np.ones(ones.shape, bool)}
  enc = tokenizer.batch_encode(
    _read_prompt_texts(c.prompts),
    max_len=prompt_len,
    truncation_side="left",
    padding_side="left",
    add_bos=True,
  )
  n = enc.tokens.shape[0]
  logging.info(
    "%d prompts from %s (%d truncated to %d tokens)",
    n,
    ",".join(c.prompts),
    enc.num_truncated,
    prompt_len,
  )

  def file_prompts(step):
    """Prompts ``step * b .. step * b + b - 1`` of a new permutation per pass (epoch)."""
    positions = step * b + np.arange(b)
    epochs, offsets = positions // n, positions % n
    perms = {e: np.random.default_rng([c.seed, e]).permutation(n) for e in set(epochs)}
    idx = np.array([perms[e][o] for e, o in zip(epochs, offsets)])
    return {"prompts": enc.tokens[idx], "prompt_mask": enc.mask[idx]}

  return file_prompts


def _reward(
  c: PolicyRunConfig,
  *,
  tok: str,
  vocab_size: int,
  seq_len: int,
  prompt_len: int,
  world=None,
  world_cfg=None,
) -> tuple[Callable[..., jax.Array], Any]:
  kind, arg = parse_reward(c.reward)
  if kind == "token_frequency":
    if arg >= vocab_size:
      raise ConfigError(
        "reward", c.reward, f"token id {arg} is outside the policy's vocabulary [0, {vocab_size})"
      )
    fn = functools.partial(rollout_lib.token_frequency, token_id=arg, prompt_len=prompt_len)
    return lambda params, tokens, mask: fn(tokens, mask), None
  if kind == "synthetic_gold":
    if world is None:
      raise ConfigError("reward", c.reward, "synthetic_gold needs --policy=synthetic")

    def gold(params, tokens, mask):
      gold_params, stats = params
      return synthetic.gold_reward(
        synthetic.World(None, gold_params, stats), world_cfg, tokens, mask
      )

    return gold, (world.gold_params, world.stats)
  kw = dict(which=c.rm_checkpoint)
  extra = rm_io.read_extra(arg[0], **kw)
  model_cfg = rm_io.config_from_json(extra["model_config"])
  if extra.get("tokenizer") != tok:
    raise ConfigError(
      "reward",
      c.reward,
      f"the reward model uses the {extra.get('tokenizer')!r} tokenizer, the policy {tok!r}",
    )
  if model_cfg.vocab_size != vocab_size or model_cfg.max_len < seq_len:
    raise ConfigError(
      "reward",
      c.reward,
      f"the reward model (vocab {model_cfg.vocab_size}, "
      f"max_len {model_cfg.max_len}) cannot score the policy's sequences "
      f"(vocab {vocab_size}, length {seq_len})",
    )
  if len(arg) == 1:
    apply_fn, params, _ = rm_io.load_reward_model(arg[0], **kw)
    return lambda p, tokens, mask: apply_fn(p, tokens, mask), params
  try:
    apply_fn, stacked = rm_io.load_reward_ensemble(arg, **kw)
  except ValueError as e:
    raise ConfigError("reward", c.reward, str(e)) from None
  hyper = {"coef": c.uncertainty_coef} if c.ensemble_objective == "uncertainty_weighted" else {}
  objective = objectives.ensemble_objective(c.ensemble_objective, **hyper)
  return (
    lambda p, tokens, mask: objective(ensemble_lib.apply_ensemble(apply_fn, p, tokens, mask))
  ), stacked


def build_run(c: PolicyRunConfig) -> Run:
  """Builds the models, the reward, the prompt source and the compiled step of a config.

  Raises:
    ConfigError: a bad setting, naming its flag.
  """
  validate_config(c)
  state_key, init_key, data_key = jax.random.split(jax.random.key(c.seed), 3)
  world = world_cfg = None
  if c.policy == "synthetic":
    world_cfg, world = _world(c)
    policy_cfg = world_cfg.policy_config()
    prompt_len, max_new = world_cfg.prompt_len, c.max_new_tokens or world_cfg.response_len
    if c.prompt_len not in (0, prompt_len):
      raise ConfigError(
        "prompt_len",
        c.prompt_len,
        f"the synthetic world's prompts have {prompt_len} tokens (set it with --synthetic_world)",
      )
    if max_new > world_cfg.response_len:
      raise ConfigError(
        "max_new_tokens",
        c.max_new_tokens,
        f"the synthetic world's sequences end after {world_cfg.response_len} response tokens",
      )
    ref_params, tok, eos = world.policy_params, "synthetic", None
  else:
    prompt_len = c.prompt_len or (DEFAULT_PROMPT_LEN if c.prompts else 1)
    max_new = c.max_new_tokens or DEFAULT_NEW_TOKENS
    policy_cfg = presets.preset(
      c.policy, vocab_size=tokenizer.VOCAB_SIZE, max_len=prompt_len + max_new
    )
    dummy = jnp.zeros((1, prompt_len + max_new), jnp.int32)
    ref_params = jax.jit(PolicyModel(policy_cfg).init)(init_key, dummy, jnp.ones(dummy.shape, bool))
    tok, eos = "byte", tokenizer.EOS_ID
  reward_fn, reward_params = _reward(
    c,
    tok=tok,
    vocab_size=policy_cfg.vocab_size,
    seq_len=prompt_len + max_new,
    prompt_len=prompt_len,
    world=world,
    world_cfg=world_cfg,
  )
  rl_config = rl.RLConfig(
    max_new_tokens=max_new,
    temperature=c.temperature,
    eos_id=eos,
    kl_estimator=c.kl_estimator,
    target_kl=c.target_kl,
    kl_horizon=c.kl_horizon,
    num_epochs=c.num_epochs,
    num_minibatches=c.num_minibatches,
    clip_eps=c.clip_eps,
    value_coef=c.value_coef,
    entropy_coef=c.entropy_coef,
    baseline=c.baseline,
    num_samples=c.num_samples,
    grpo_kl=c.grpo_kl,
    nonfinite=c.nonfinite,
  )
  init_params = ref_params
  if rl.uses_value_head(c.algo):
    init_params = rl.init_value_head(ref_params, init_key, config=policy_cfg)
  optimizer = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), optax.adam(c.learning_rate))
  policy = transformer_policy(policy_cfg, value_head=rl.uses_value_head(c.algo))
  step_fn = rl.make_step(
    c.algo, policy=policy, config=rl_config, reward_fn=reward_fn, optimizer=optimizer
  )
  pstep = parallel.make_parallel_step(rl.with_frozen_params(step_fn), mode=c.parallel)
  prompts = _prompt_source(c, data_key, world_cfg=world_cfg, prompt_len=prompt_len)
  return Run(
    config=c,
    rl_config=rl_config,
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


def initial_state(run: Run) -> rl.RLState:
  """The run's :class:`jaxrm.steps.rl.RLState` at step 0 (also the checkpoint template)."""
  return rl.create_rl_state(
    run.init_params, run.optimizer, run.state_key, kl_coef=run.config.kl_coef
  )


# ----------------------------------------------------------------------------- training
def check_resumable(saved: Mapping[str, Any], config: PolicyRunConfig, workdir: str) -> None:
  """Raises ``ConfigError`` (flag ``workdir``) if its checkpoint has other settings."""
  now = config.to_json()
  diff = sorted(
    k for k in set(saved) | set(now) if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k)
  )
  if diff:
    details = ", ".join(f"--{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
    raise ConfigError(
      "workdir",
      workdir,
      f"holds a run with other settings ({details}); use another --workdir or the same flags",
    )


def _row(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON row of scalar metrics; non-finite floats become None (strict JSON)."""
  row = {"step": step}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.dtype == bool:
      row[k] = bool(v)
    elif v.dtype.kind in "iu":
      row[k] = int(v)
    else:
      row[k] = float(v) if np.isfinite(v) else None
  return row


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(run: Run, workdir: str | os.PathLike, *, steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) ``run`` in ``workdir`` until ``steps`` (default ``config.steps``).

  Every step appends a row to ``metrics.jsonl`` (``step`` is the number of steps done,
  1-based; the metrics of :mod:`jaxrm.steps.rl` plus ``time``); a checkpoint is written every
  ``checkpoint_every`` steps and at the end.

  Returns:
    A summary: ``steps``, ``resumed_from``, ``steps_per_sec`` (without compilation) and
    ``final`` (the last metrics row).

  Raises:
    ConfigError: ``workdir`` holds a checkpoint of another config.
    FloatingPointError: with ``nonfinite='raise'``, at the first non-finite update.
  """
  c = run.config
  steps = c.steps if steps is None else steps
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  pstep = run.pstep
  state = initial_state(run)
  start = 0
  last_row = None
  with checkpoint_lib.CheckpointManager(
    os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=c.keep_checkpoints
  ) as ckpt:
    restored = ckpt.restore_latest(template=state)
    if restored is not None:
      state, extra, start = restored
      check_resumable(extra.get("config", {}), c, workdir)
      last_row = extra.get("metrics")
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    rundir.truncate_metrics(metrics_path, max_step=start)
    carry = pstep.put_state((state, run.reward_params, run.ref_params))
    del state

    def save(step, row):
      host_state = pstep.unreplicate(carry)[0]
      ckpt.save(step, host_state, {"config": c.to_json(), "metrics": row})

    pending = []
    t_start, t_steady, steady_from = time.time(), None, None
    with open(metrics_path, "a") as out:

      def flush():
        nonlocal last_row
        for step, m in jax.device_get(pending):
          row = _row(step, pstep.unreplicate(m))
          row["time"] = time.time() - t_start
          out.write(json.dumps(row, allow_nan=False) + "\n")
          last_row = row
        out.flush()
        pending.clear()

      for step in range(start, steps):
        carry, metrics = pstep(carry, pstep.shard_batch(run.prompts(step)))
        pending.append((step + 1, metrics))
        done = step + 1
        if (
          c.nonfinite == "raise"
          or done % c.log_every == 0
          or done == steps
          or (done % c.checkpoint_every == 0)
        ):
          flush()
          if c.nonfinite == "raise" and last_row["nonfinite"]:
            raise FloatingPointError(
              f"non-finite update at step {done}; the state before it is that of step {step}"
            )
          if t_steady is None:  # the first flush includes the compilation
            t_steady, steady_from = time.time(), done
          elapsed = time.time() - t_steady
          rate = (done - steady_from) / elapsed if done > steady_from else float("nan")
          eta = (steps - done) / rate if rate == rate and rate > 0 else float("nan")
          fmt = lambda k, spec: "nan" if last_row[k] is None else format(last_row[k], spec)
          logging.info(
            "step %d/%d | score %s | KL %s | entropy %s | length %s | kl_coef %s | "
            "skipped %d | %s steps/s | ETA %s",
            done,
            steps,
            fmt("score", ".4f"),
            fmt("kl", ".3f"),
            fmt("entropy", ".3f"),
            fmt("response_length", ".1f"),
            fmt("kl_coef", ".4g"),
            last_row["num_skipped"],
            "-" if rate != rate else f"{rate:.2f}",
            _format_duration(eta) if eta == eta else "-",
          )
        if done % c.checkpoint_every == 0 or done == steps:
          save(done, last_row)
  rate = (
    (steps - steady_from) / (time.time() - t_steady)
    if t_steady is not None and steps > steady_from
    else None
  )
  return {
    "steps": steps,
    "resumed_from": start,
    "steps_per_sec": rate,
    "final": last_row,
    "workdir": workdir,
  }


def train_policy(config: PolicyRunConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Builds and trains ``config`` in ``workdir`` (resuming if it holds a checkpoint)."""
  return train(build_run(config), workdir)


# ----------------------------------------------------------------------------- flags
def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the script's flags on ``flag_values``."""
  fv = {"flag_values": flag_values}
  d = PolicyRunConfig()
  flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints).", required=True, **fv)
  flags.DEFINE_enum("algo", d.algo, list(rl.ALGORITHMS), "Policy-optimisation algorithm.", **fv)
  flags.DEFINE_string(
    "reward",
    d.reward,
    "Reward-model run directory, several "
    "(comma-separated) for an ensemble, token_frequency:<id> or "
    "synthetic_gold.",
    **fv,
  )
  flags.DEFINE_enum(
    "ensemble_objective",
    d.ensemble_objective,
    list(objectives.OBJECTIVES),
    "How an ensemble's member rewards are combined.",
    **fv,
  )
  flags.DEFINE_float(
    "uncertainty_coef",
    d.uncertainty_coef,
    "lambda of mean - lambda * var (uncertainty_weighted).",
    **fv,
  )
  flags.DEFINE_enum(
    "rm_checkpoint",
    d.rm_checkpoint,
    list(rm_io.WHICH),
    "Which checkpoint of each reward-model run.",
    **fv,
  )
  flags.DEFINE_string(
    "policy",
    d.policy,
    f"'synthetic' (pi_init of the synthetic world) or a preset: {sorted(presets.PRESETS)}.",
    **fv,
  )
  flags.DEFINE_list(
    "prompts",
    list(d.prompts),
    "JSONL preference files whose prompts are used (preset policies; default: BOS-only prompts).",
    **fv,
  )
  flags.DEFINE_integer("prompt_len", d.prompt_len, "Prompt tokens (0: automatic).", **fv)
  flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Response tokens (0: automatic).", **fv)
  flags.DEFINE_integer("synthetic_seed", d.synthetic_seed, "Seed of the synthetic world.", **fv)
  flags.DEFINE_string(
    "synthetic_world",
    "",
    "WorldConfig overrides, e.g. 'num_calibration=2048' (as in train_reward_model.py).",
    **fv,
  )
  flags.DEFINE_float("kl_coef", d.kl_coef, "(Initial) KL coefficient.", **fv)
  flags.DEFINE_float(
    "target_kl",
    None,
    "Adapt the KL coefficient towards this sequence KL (unset: fixed coefficient).",
    **fv,
  )
  flags.DEFINE_float(
    "kl_horizon", d.kl_horizon, "Horizon of the adaptive KL controller, in sequences.", **fv
  )
  flags.DEFINE_enum(
    "kl_estimator",
    d.kl_estimator,
    ["k1", "k2", "k3"],
    "Per-token KL estimator of the penalty.",
    **fv,
  )
  flags.DEFINE_integer("steps", d.steps, "RL iterations (one rollout each).", **fv)
  flags.DEFINE_integer("batch_size", d.batch_size, "Prompts per step.", **fv)
  flags.DEFINE_float("learning_rate", d.learning_rate, "Adam learning rate.", **fv)
  flags.DEFINE_float("max_grad_norm", d.max_grad_norm, "Global gradient-norm clip.", **fv)
  flags.DEFINE_integer("num_epochs", d.num_epochs, "Passes over each rollout (PPO, GRPO).", **fv)
  flags.DEFINE_integer(
    "num_minibatches", d.num_minibatches, "Minibatches per pass (PPO, GRPO).", **fv
  )
  flags.DEFINE_integer("num_samples", d.num_samples, "Responses per prompt (RLOO, GRPO).", **fv)
  flags.DEFINE_float("clip_eps", d.clip_eps, "PPO/GRPO ratio clipping.", **fv)
  flags.DEFINE_float("value_coef", d.value_coef, "PPO value-loss weight.", **fv)
  flags.DEFINE_float("entropy_coef", d.entropy_coef, "Entropy-bonus weight.", **fv)
  flags.DEFINE_float("temperature", d.temperature, "Sampling temperature.", **fv)
  flags.DEFINE_enum("baseline", d.baseline, list(rl.BASELINES), "REINFORCE baseline.", **fv)
  flags.DEFINE_enum(
    "grpo_kl", d.grpo_kl, list(rl.GRPO_KL), "Where GRPO applies the KL penalty.", **fv
  )
  flags.DEFINE_integer("seed", d.seed, "Seed of the run (policy init, sampling, prompts).", **fv)
  flags.DEFINE_integer("log_every", d.log_every, "Log a line every this many steps.", **fv)
  flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Checkpoint period.", **fv)
  flags.DEFINE_integer("keep_checkpoints", d.keep_checkpoints, "Checkpoints kept.", **fv)
  flags.DEFINE_enum(
    "parallel",
    d.parallel,
    list(PARALLEL_MODES),
    "Execution mode (auto: shard_map on several devices, else jit).",
    **fv,
  )
  flags.DEFINE_enum(
    "nonfinite",
    d.nonfinite,
    ["skip", "raise"],
    "On a non-finite update: skip it (counted) or stop.",
    **fv,
  )


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> PolicyRunConfig:
  """The :class:`PolicyRunConfig` of the parsed flags (raises ``ConfigError``)."""
  f = flag_values
  names = [
    n for n in PolicyRunConfig.__dataclass_fields__ if n not in ("prompts", "synthetic_world")
  ]
  return PolicyRunConfig(
    prompts=tuple(f.prompts),
    synthetic_world=parse_world_overrides(f.synthetic_world),
    **{n: f[n].value for n in names},
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.die(f"unexpected arguments {argv[1:]}")
  rundir.quiet_orbax_logging()
  try:
    config = config_from_flags()
    summary = train_policy(config, flags.FLAGS.workdir)
  except ConfigError as e:
    cli.die(e.flag_message())
  logging.info("Done: %s", json.dumps(summary["final"]))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
