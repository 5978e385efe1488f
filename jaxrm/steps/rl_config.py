"""Configuration and state of the RL steps (:mod:`jaxrm.steps.rl`).

:class:`RLConfig` holds the hyperparameters of every algorithm and variant (hashable, a static
jit argument); :class:`RLState` everything a checkpoint needs (parameters, optimizer state,
PRNG key, KL controller, REINFORCE baseline, running reward statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrm.math import advantages as adv_lib
from jaxrm.math import pg_losses, running_stats
from jaxrm.math._arrays import check_number, is_int
from jaxrm.models import sampling
from jaxrm.models.policy import PolicyModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import train_state as train_state_lib

ALGORITHMS = ("ppo", "reinforce", "rloo", "grpo")
BASELINES = ("moving_average", "batch", "none")
GRPO_KL = ("loss", "reward")
REWARD_NORMS = ("none", "whiten", "running")


@dataclasses.dataclass(unsafe_hash=True)
class RLConfig:
  """Hyperparameters of the policy-optimisation steps (hashable: a static jit argument).

  Mutable so that command-line configs can override its fields (``--config.rl.kl_coef``);
  treated as immutable once a run starts (hashed by value as a static jit argument).
  ``dataclasses.replace(config)`` re-runs the checks below after overrides.

  The policy itself is not part of the config: the steps take its functions
  (:class:`jaxrm.models.policy.PolicyFns`), and checks that need its vocabulary or length
  (``eos_id``, prompt length) run in the step.

  Attributes:
    max_new_tokens: response length budget.
    temperature: sampling temperature; log-probs are those of ``softmax(logits / T)``.
    eos_id: token ending a response (``jaxrm.models.sampling.EOS_ID`` for the byte tokenizer), or
      None for fixed-length responses (the synthetic world).
    kl_estimator: per-token KL estimator in the penalty, ``'k1'``, ``'k2'`` or ``'k3'``.
    target_kl: adapt the KL coefficient towards this mean sequence KL; None keeps it fixed.
    kl_horizon: horizon of the adaptive controller, in sequences (Ziegler et al.: 10000).
    num_epochs: passes over each rollout (PPO, GRPO).
    num_minibatches: minibatches per pass (PPO, GRPO); must divide the local number of
      sequences.
    clip_eps: PPO/GRPO ratio clipping range (the lower range with ``clip_eps_high``).
    clip_eps_high: upper ratio clipping range ("clip-higher", DAPO; None: ``clip_eps``).
    dual_clip: dual-clip PPO constant ``c > 1`` bounding the loss of negative advantages
      (Ye et al. 2020; None: off). PPO and GRPO.
    ratio_level: ``'token'`` or ``'sequence'`` (GSPO's length-normalised sequence ratio, Zheng
      et al. 2025; use with ``aggregation='seq_mean'`` and a small ``clip_eps``). PPO, GRPO.
    value_clip_eps: PPO value clipping range (reward units).
    value_coef: weight of the value loss (PPO).
    entropy_coef: weight of the entropy bonus (all algorithms).
    gamma: discount (PPO GAE, REINFORCE returns).
    lam: GAE lambda (PPO).
    whiten_advantages: whiten PPO advantages over the (global) batch.
    aggregation: token-loss reduction, ``'token_mean'``, ``'seq_mean'`` or
      ``'constant_length'`` (Dr. GRPO: the token sum over ``batch x max_new_tokens``).
    baseline: REINFORCE baseline, ``'moving_average'``, ``'batch'`` or ``'none'``.
    baseline_decay: decay of the moving-average baseline.
    num_samples: responses per prompt (RLOO, GRPO), >= 2.
    grpo_kl: where GRPO applies the KL penalty, ``'loss'`` or ``'reward'``.
    grpo_scale: GRPO advantage scaling, ``'group'`` (the group's standard deviation),
      ``'batch'`` (the global batch's) or ``'none'`` (Dr. GRPO); True/False mean
      ``'group'``/``'none'``.
    missing_eos_penalty: subtracted from the score of every response that does not contain
      ``eos_id`` (TRL's ``missing_eos_penalty``; None: off; needs ``eos_id``).
    reward_norm: normalisation of the scores before the algorithm's targets: ``'none'``,
      ``'whiten'`` (over the global batch, population variance) or ``'running'`` (by the
      running mean and standard deviation of every score seen, ``RLState.reward_stats``,
      updated with the batch first). After ``missing_eos_penalty``.
    nonfinite: ``'skip'`` or ``'raise'`` (see :func:`jaxrm.steps.train_state.apply_if_finite`;
      in ``'raise'`` mode a step with a non-finite update returns its input state).
    exact_kl: log ``kl_exact``, the exact per-token KL of the full next-token distributions
      summed over the sampled responses (:func:`jaxrm.steps.rollout.token_exact_kl`; a softmax
      over the vocabulary of both policies per rollout; turn off for huge vocabularies).
      Logged only; the penalty uses ``kl_estimator``.
  """

  max_new_tokens: int
  temperature: float = 1.0
  eos_id: int | None = sampling.EOS_ID
  kl_estimator: str = "k1"
  target_kl: float | None = None
  kl_horizon: float = 10000.0
  num_epochs: int = 4
  num_minibatches: int = 1
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  aggregation: str = "token_mean"
  baseline: str = "moving_average"
  baseline_decay: float = 0.9
  num_samples: int = 4
  grpo_kl: str = "loss"
  grpo_scale: str = "group"
  nonfinite: str = "skip"
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  ratio_level: str = "token"
  missing_eos_penalty: float | None = None
  reward_norm: str = "none"
  exact_kl: bool = True

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"RLConfig.{name} must be {want}, got {getattr(self, name)!r}")

    for name in ("max_new_tokens", "num_epochs", "num_minibatches", "num_samples"):
      value = getattr(self, name)
      if not is_int(value):
        bad(name, "an int")
      object.__setattr__(self, name, int(value))  # a NumPy int, e.g. from a config array
    for name in ("max_new_tokens", "num_epochs", "num_minibatches"):
      if getattr(self, name) < 1:
        bad(name, "a positive int")
    if self.num_samples < 2:
      bad("num_samples", "an int >= 2")
    if not self.temperature > 0:
      bad("temperature", "> 0")
    if self.kl_estimator not in ("k1", "k2", "k3"):
      bad("kl_estimator", "one of ('k1', 'k2', 'k3')")
    if self.target_kl is not None and not self.target_kl > 0:
      bad("target_kl", "None or > 0")
    if not self.kl_horizon > 0:
      bad("kl_horizon", "> 0")
    for name in ("clip_eps", "value_clip_eps"):
      if not getattr(self, name) > 0:
        bad(name, "> 0")
    for name in ("value_coef", "entropy_coef"):
      if not getattr(self, name) >= 0:
        bad(name, ">= 0")
    for name in ("gamma", "lam"):
      if not 0 <= getattr(self, name) <= 1:
        bad(name, "in [0, 1]")
    if not 0 <= self.baseline_decay < 1:
      bad("baseline_decay", "in [0, 1)")
    if self.aggregation not in pg_losses.AGGREGATIONS:
      bad("aggregation", f"one of {pg_losses.AGGREGATIONS}")
    if self.baseline not in BASELINES:
      bad("baseline", f"one of {BASELINES}")
    if self.grpo_kl not in GRPO_KL:
      bad("grpo_kl", f"one of {GRPO_KL}")
    if self.nonfinite not in train_state_lib.NONFINITE_MODES:
      bad("nonfinite", f"one of {train_state_lib.NONFINITE_MODES}")
    if isinstance(self.grpo_scale, bool):  # the former bool option
      object.__setattr__(self, "grpo_scale", "group" if self.grpo_scale else "none")
    if self.grpo_scale not in adv_lib.GRPO_SCALES:
      bad("grpo_scale", f"one of {adv_lib.GRPO_SCALES}")
    if self.clip_eps_high is not None and not self.clip_eps_high > 0:
      bad("clip_eps_high", "None or > 0")
    if self.dual_clip is not None and not self.dual_clip > 1:
      bad("dual_clip", "None or > 1")
    if self.ratio_level not in pg_losses.RATIO_LEVELS:
      bad("ratio_level", f"one of {pg_losses.RATIO_LEVELS}")
    if self.missing_eos_penalty is not None:
      if not self.missing_eos_penalty >= 0:
        bad("missing_eos_penalty", "None or >= 0")
      if self.eos_id is None:
        bad("missing_eos_penalty", "None when eos_id is None (every response has no EOS)")
    if not isinstance(self.exact_kl, bool):
      bad("exact_kl", "True or False")
    if self.reward_norm not in REWARD_NORMS:
      bad("reward_norm", f"one of {REWARD_NORMS}")
    if self.eos_id is not None and (
      not isinstance(self.eos_id, int) or isinstance(self.eos_id, bool) or self.eos_id < 0
    ):
      bad("eos_id", "None or an int >= 0 (checked against the vocabulary in the step)")


class RLState(NamedTuple):
  """State of a policy-optimisation run (everything a checkpoint needs).

  Attributes:
    step: RL iterations done (one rollout each, skipped or not).  # shape=(), int32
    params: policy variables (with the value head for PPO).
    opt_state: optax state of ``params``.
    key: base PRNG key; step ``t`` uses ``fold_in(key, t)``.
    kl: the KL controller (``kl.kl_coef`` is the coefficient of the next step).
    baseline: REINFORCE moving-average baseline (unused by the other algorithms).
    num_skipped: optimizer updates not applied because of non-finite values.  # shape=(), int32
    reward_stats: running moments of the scores (``RLConfig.reward_norm='running'``).
  """

  step: jax.Array  # shape=(), int32
  params: Any
  opt_state: Any
  key: jax.Array
  kl: adv_lib.AdaptiveKLState
  baseline: adv_lib.ReinforceBaselineState
  num_skipped: jax.Array  # shape=(), int32
  reward_stats: running_stats.RunningMoments


def create_rl_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  *,
  kl_coef: float | jax.Array,
) -> RLState:
  """Returns the :class:`RLState` at step 0 with KL coefficient ``kl_coef`` (>= 0)."""
  check_number(kl_coef, "kl_coef", ge=0)
  ts = train_state_lib.create_train_state(params, optimizer, key)
  return RLState(
    step=ts.step,
    params=ts.params,
    opt_state=ts.opt_state,
    key=ts.key,
    kl=adv_lib.adaptive_kl_init(init_kl_coef=kl_coef),
    baseline=adv_lib.reinforce_baseline_init(),
    num_skipped=ts.num_skipped,
    reward_stats=running_stats.running_moments_init(),
  )


def init_value_head(params: Any, key: jax.Array, *, config: TransformerConfig) -> Any:
  """Adds a value head to the variables of a ``PolicyModel(config)`` (for PPO).

  The head's kernel and bias start at zero, so every initial value is 0 and the policy is
  unchanged. Existing ``'value_head'`` variables are replaced.
  """
  if not isinstance(params, Mapping) or "params" not in params:
    raise ValueError(
      "params must be flax variables {'params': {...}} of a PolicyModel, got "
      f"{type(params).__name__} with keys "
      f"{sorted(params) if isinstance(params, Mapping) else None}"
    )
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(
    PolicyModel(config, value_head=True).init, key, dummy, jnp.ones((1, 1), bool)
  )
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"]["value_head"])
  return {**params, "params": {**params["params"], "value_head": head}}
