"""Policy-optimisation steps for RLHF: PPO, REINFORCE, RLOO and GRPO against any reward.

Each step is a pure function

  ``step(state, batch, reward_params, ref_params, *, policy, config, reward_fn, optimizer,
  axis_name=None, return_rollout=False) -> (state, metrics[, rollout])``

that runs one rollout (:func:`jaxrm.steps.rollout.rollout`: sample from the current policy with
``policy.sample``, score with ``reward_fn(reward_params, tokens, mask) -> [batch]``, compute
log-probs, values and the KL to the reference policy ``ref_params``) and then its updates,
all inside one ``jit`` with static shapes. ``batch`` holds the prompts:
``{'prompts': [b, p] int (LEFT-padded), 'prompt_mask': [b, p] bool}``. The reward and
reference parameters are explicit arguments, never part of the state, so a seed sweep can
``jax.vmap`` a step over stacked states and stacked ``reward_params`` (one proxy per seed).

The policy is model-agnostic, as ``apply_fn`` is for the reward-model step: ``policy`` is a
:class:`jaxrm.models.policy.PolicyFns` (its ``apply`` and ``sample`` functions), built by
:func:`jaxrm.models.policy.transformer_policy` for jaxrm's transformer (KV-cached sampler) or
:func:`jaxrm.models.policy.apply_fn_policy` for any model's ``apply_fn``.

All algorithms share one iteration frame (:func:`iterate`): collect a rollout -> finite flag
-> KL coefficient -> targets -> ``_optimize`` (epochs x minibatches) -> KL controller and
baseline -> finish. An :class:`Algorithm` states only its targets and its loss.

Algorithms (token alignment and losses from :mod:`jaxrm.math.advantages`, :mod:`jaxrm.math.pg_losses`):

* :func:`ppo_step` (Ziegler et al. 2019; Ouyang et al. 2022): per-token rewards
  ``-kl_coef * KL_t`` plus the score at the last response token, GAE over the response with
  the policy's value head, advantages whitened over the global batch, then
  ``num_epochs x num_minibatches`` updates of the clipped surrogate + ``value_coef`` x the
  clipped value loss - ``entropy_coef`` x the entropy (a ``lax.scan``).
* :func:`reinforce_step` (Williams 1992; Ahmadian et al. 2024): the same per-token rewards,
  reward-to-go returns minus a baseline (``'moving_average'``: an EMA of past episode returns,
  independent of the current samples; ``'batch'``: the mean episode return of the current
  global batch; ``'none'``), one update of ``-A * log pi``.
* :func:`rloo_step` (Kool et al. 2019; Ahmadian et al. 2024): ``num_samples`` responses per
  prompt, the sequence reward ``score - kl_coef * KL_seq``, leave-one-out advantages
  broadcast over the response tokens, one update of ``-A * log pi``.
* :func:`grpo_step` (Shao et al. 2024): ``num_samples`` responses per prompt,
  group-normalised advantages of the score, the clipped surrogate over ``num_epochs x
  num_minibatches`` updates. The KL penalty is, with ``grpo_kl='loss'`` (default, as in
  DeepSeekMath), ``kl_coef x`` the aggregated per-token estimate
  ``kl_estimate(log pi, log pi_ref)`` added to the loss and differentiated (use
  ``kl_estimator='k3'`` as the paper; the k1 gradient is zero in expectation); with
  ``grpo_kl='reward'``, it is subtracted from the score before group normalisation, like RLOO.

KL coefficient: the state holds an :class:`jaxrm.math.advantages.AdaptiveKLState`. With
``config.target_kl=None`` the coefficient stays fixed; otherwise it is adapted after every
step towards ``target_kl`` from the batch-mean sequence KL (the chosen estimator) with
``n_steps`` = the global number of sequences (Ziegler et al. 2019). The coefficient used by a
step is the one in the input state.

Non-finite values: every optimizer update goes through
:func:`jaxrm.steps.train_state.apply_if_finite`. A rollout whose scores or log-probs are not finite
(on response tokens) skips *all* its updates, each counted in ``num_skipped``, and leaves the
KL controller and the baseline unchanged, so a NaN reward never reaches the parameters.

Data parallelism: with ``axis_name``, every device holds its shard of the prompts; example
``i`` samples with ``fold_in(key, global_index)``; advantage whitening, loss denominators,
gradients and metrics are averaged over the axis. PPO/GRPO minibatches are *stratified*: the
examples are cut into consecutive blocks of ``num_minibatches`` (by global index) and each
epoch a random permutation per block (keyed by the block's global index) sends one example of
each block to each minibatch. A device therefore holds exactly its share of every global
minibatch, and :func:`jaxrm.steps.parallel.make_parallel_step` over any number of devices gives the
parameters of the single-device step on the global batch (up to float rounding). The local
number of sequences must be divisible by ``num_minibatches``. Parameters are differentiated
pmap-style: under ``shard_map`` use ``check_vma=False`` (the default of
``make_parallel_step``). :func:`with_frozen_params` adapts a step to ``make_parallel_step``'s
``(state, batch)`` signature.

Randomness: the step key is ``fold_in(state.key, state.step)``; sampling uses
``fold_in(step_key, 0)``, minibatch shuffling ``fold_in(step_key, 1)``.

Example::

  config = RLConfig(max_new_tokens=16, kl_estimator='k3', target_kl=6.0)
  params = init_value_head(policy_params, key, config=cfg)        # PPO needs a value head
  state = create_rl_state(params, optimizer, key, kl_coef=0.05)
  step = jax.jit(make_step('ppo', policy=transformer_policy(cfg, value_head=True),
                           config=config, reward_fn=reward_fn, optimizer=optimizer))
  state, metrics = step(state, {'prompts': p, 'prompt_mask': m}, reward_params, ref_params)

References:
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
  Ouyang et al. 2022, "Training language models to follow instructions with human feedback".
  Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs".
  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models" (GRPO).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxrm.math import advantages as adv_lib
from jaxrm.math import kl as kl_lib
from jaxrm.math import pg_losses
from jaxrm.models import sampling
from jaxrm.models.policy import PolicyFns, PolicyModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import rollout as rollout_lib
from jaxrm.steps import train_state as train_state_lib

ALGORITHMS = ("ppo", "reinforce", "rloo", "grpo")
BASELINES = ("moving_average", "batch", "none")
GRPO_KL = ("loss", "reward")


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
    clip_eps: PPO/GRPO ratio clipping range.
    value_clip_eps: PPO value clipping range (reward units).
    value_coef: weight of the value loss (PPO).
    entropy_coef: weight of the entropy bonus (all algorithms).
    gamma: discount (PPO GAE, REINFORCE returns).
    lam: GAE lambda (PPO).
    whiten_advantages: whiten PPO advantages over the (global) batch.
    aggregation: token-loss reduction, ``'token_mean'`` or ``'seq_mean'``.
    baseline: REINFORCE baseline, ``'moving_average'``, ``'batch'`` or ``'none'``.
    baseline_decay: decay of the moving-average baseline.
    num_samples: responses per prompt (RLOO, GRPO), >= 2.
    grpo_kl: where GRPO applies the KL penalty, ``'loss'`` or ``'reward'``.
    grpo_scale: divide GRPO advantages by the group standard deviation (False: Dr. GRPO).
    nonfinite: ``'skip'`` or ``'raise'`` (see :func:`jaxrm.steps.train_state.apply_if_finite`;
      in ``'raise'`` mode a step with a non-finite update returns its input state).
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
  grpo_scale: bool = True
  nonfinite: str = "skip"

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"RLConfig.{name} must be {want}, got {getattr(self, name)!r}")

    for name in ("max_new_tokens", "num_epochs", "num_minibatches"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        bad(name, "a positive int")
    if not isinstance(self.num_samples, int) or self.num_samples < 2:
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
  """

  step: jax.Array  # shape=(), int32
  params: Any
  opt_state: Any
  key: jax.Array
  kl: adv_lib.AdaptiveKLState
  baseline: adv_lib.ReinforceBaselineState
  num_skipped: jax.Array  # shape=(), int32


def create_rl_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  *,
  kl_coef: float | jax.Array,
) -> RLState:
  """Returns the :class:`RLState` at step 0 with KL coefficient ``kl_coef`` (>= 0)."""
  if isinstance(kl_coef, (int, float)) and not kl_coef >= 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
  ts = train_state_lib.create_train_state(params, optimizer, key)
  return RLState(
    step=ts.step,
    params=ts.params,
    opt_state=ts.opt_state,
    key=ts.key,
    kl=adv_lib.adaptive_kl_init(init_kl_coef=kl_coef),
    baseline=adv_lib.reinforce_baseline_init(),
    num_skipped=ts.num_skipped,
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


def with_frozen_params(step_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Adapts ``step_fn(state, batch, reward_params, ref_params, *, axis_name)`` to
  :func:`jaxrm.steps.parallel.make_parallel_step`, whose steps take ``(state, batch)``.

  The returned step takes and returns the carry ``(state, reward_params, ref_params)`` (the
  frozen parameters are returned unchanged, so donating the carry costs no copy)::

    pstep = make_parallel_step(with_frozen_params(functools.partial(ppo_step, ...)))
    carry = pstep.put_state((state, reward_params, ref_params))
    carry, metrics = pstep(carry, pstep.shard_batch(batch))
  """

  def step(carry, batch, *, axis_name=None):
    state, reward_params, ref_params = carry
    out = step_fn(state, batch, reward_params, ref_params, axis_name=axis_name)
    return ((out[0], reward_params, ref_params),) + tuple(out[1:])

  return step


# ----------------------------------------------------------------------------- internals
def _pmean(x: Any, axis_name: Any) -> Any:
  return x if axis_name is None else lax.pmean(x, axis_name)


def _axis_size(axis_name: Any) -> Any:
  return 1 if axis_name is None else lax.psum(1, axis_name)


def _prompts(
  batch: Mapping[str, Any], policy: PolicyFns, config: RLConfig
) -> tuple[jax.Array, jax.Array]:
  if not isinstance(batch, Mapping) or "prompts" not in batch or "prompt_mask" not in batch:
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"batch must be a dict with 'prompts' and 'prompt_mask', got {keys}")
  rollout_lib.check_prompts(
    batch["prompts"],
    batch["prompt_mask"],
    max_len=policy.max_len,
    max_new_tokens=config.max_new_tokens,
  )
  rollout_lib.check_eos_id(config.eos_id, vocab_size=policy.vocab_size)
  return (jnp.asarray(batch["prompts"], jnp.int32), jnp.asarray(batch["prompt_mask"]).astype(bool))


def _collect(
  state: RLState,
  batch,
  reward_params,
  ref_params,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn,
  axis_name,
  num_samples: int = 1,
  value_head: bool = False,
):
  """Rollout of ``num_samples`` responses per prompt; returns (rollout, offset, update key)."""
  prompts, prompt_mask = _prompts(batch, policy, config)
  if num_samples > 1:  # rows [p0 x k, p1 x k, ...]; global example = prompt * k + j
    prompts = jnp.repeat(prompts, num_samples, axis=0)
    prompt_mask = jnp.repeat(prompt_mask, num_samples, axis=0)
  local = prompts.shape[0]
  offset = rollout_lib.global_offset(local, axis_name)
  step_key = train_state_lib.step_key(state)
  ro = rollout_lib.rollout(
    state.params,
    ref_params,
    reward_params,
    prompts,
    prompt_mask,
    jax.random.fold_in(step_key, 0),
    policy=policy,
    reward_fn=reward_fn,
    max_new_tokens=config.max_new_tokens,
    temperature=config.temperature,
    eos_id=config.eos_id,
    kl_estimator=config.kl_estimator,
    value_head=value_head,
    example_offset=offset,
  )
  return ro, offset, jax.random.fold_in(step_key, 1)


def _rollout_finite(ro: rollout_lib.Rollout, axis_name) -> jax.Array:
  """True iff scores and response log-probs (and values) are finite on every device."""
  arrays = [ro.scores, ro.logprobs, ro.ref_logprobs] + ([] if ro.values is None else [ro.values])
  ok = train_state_lib.tree_all_finite(arrays)
  if axis_name is not None:
    ok = lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
  return ok


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _sequence_kl(ro: rollout_lib.Rollout) -> tuple[jax.Array, jax.Array]:
  """``(k1, chosen estimator)`` sequence KL sums over the response, each ``[batch]``."""
  k1 = kl_lib.sequence_kl(kl_lib.kl_k1(ro.logprobs, ro.ref_logprobs), ro.response_mask)
  return k1, kl_lib.sequence_kl(ro.kl, ro.response_mask)


def _rollout_metrics(ro: rollout_lib.Rollout, kl_coef, axis_name) -> dict[str, jax.Array]:
  k1, est = _sequence_kl(ro)
  resp = ro.response_mask
  return {
    "score": _pmean(jnp.mean(ro.scores), axis_name),
    "kl": _pmean(jnp.mean(k1), axis_name),
    "kl_estimate": _pmean(jnp.mean(est), axis_name),
    "entropy": _pmean(pg_losses.masked_aggregate(ro.entropy, resp, axis_name=axis_name), axis_name),
    "response_length": _pmean(jnp.mean(jnp.sum(resp, axis=1, dtype=jnp.float32)), axis_name),
    "kl_coef": kl_coef,
  }


def _next_kl_state(
  state: RLState, ro: rollout_lib.Rollout, ok, *, config: RLConfig, axis_name
) -> adv_lib.AdaptiveKLState:
  if config.target_kl is None:
    return state.kl
  _, est = _sequence_kl(ro)
  current = _pmean(jnp.mean(est), axis_name)
  n = ro.scores.shape[0] * _axis_size(axis_name)
  new = adv_lib.adaptive_kl_update(
    state.kl, current, n, target_kl=config.target_kl, horizon=config.kl_horizon
  )
  return _select(ok, new, state.kl)


def minibatch_indices(
  key: jax.Array, local_size: int, num_minibatches: int, *, offset: Any = 0
) -> jax.Array:
  """Stratified minibatch split of this device's examples -> ``[num_minibatches, size]``.

  Examples are cut into consecutive blocks of ``num_minibatches`` (block ``b`` holds global
  examples ``b * M .. b * M + M - 1``, with ``offset`` the global index of the first local
  example, a multiple of ``M``); each block is permuted with ``fold_in(key, b)`` and its
  ``j``-th example goes to minibatch ``j``. Every example is in exactly one minibatch, each
  minibatch takes one example per block, and the split of the global batch does not depend
  on how it is sharded over devices.

  Returns:
    Local indices ``[num_minibatches, local_size // num_minibatches]`` int32.
  """
  if local_size % num_minibatches:
    raise ValueError(
      f"the number of sequences per device ({local_size}) must be divisible by "
      f"num_minibatches ({num_minibatches})"
    )
  m = num_minibatches
  blocks = local_size // m
  first_block = offset // m
  perms = jax.vmap(lambda b: jax.random.permutation(jax.random.fold_in(key, b), m))(
    first_block + jnp.arange(blocks)
  )  # [blocks, m]
  return (jnp.arange(blocks)[None, :] * m + perms.T).astype(jnp.int32)


def _optimize(
  state: RLState,
  data: dict[str, jax.Array],
  loss_fn,
  *,
  key,
  num_epochs: int,
  num_minibatches: int,
  offset,
  rollout_ok,
  optimizer,
  config: RLConfig,
  axis_name,
) -> tuple[RLState, dict[str, jax.Array]]:
  """``num_epochs x num_minibatches`` updates of ``loss_fn(params, minibatch)`` (a scan).

  Returns the state with new ``params``, ``opt_state`` and ``num_skipped`` (``step`` is not
  advanced here) and the metrics averaged over the updates.
  """
  local = jax.tree.leaves(data)[0].shape[0]
  idx = jax.vmap(
    lambda e: minibatch_indices(jax.random.fold_in(key, e), local, num_minibatches, offset=offset)
  )(jnp.arange(num_epochs))
  idx = idx.reshape(num_epochs * num_minibatches, local // num_minibatches)

  def body(st, ids):
    mb = jax.tree.map(lambda x: x[ids], data)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params, mb)
    grads, loss, aux = _pmean((grads, loss, aux), axis_name)
    guarded = jnp.where(rollout_ok, loss, jnp.nan)
    st, bad = train_state_lib.apply_if_finite(
      st, grads, guarded, optimizer, nonfinite=config.nonfinite, axis_name=axis_name
    )
    aux = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return st, (aux, bad)

  new, (aux, bad) = lax.scan(body, state, idx)
  metrics = jax.tree.map(jnp.mean, aux)
  metrics["nonfinite"] = jnp.any(bad)
  return new._replace(step=state.step), metrics


def _finish(state: RLState, new: RLState, metrics, *, kl_state, baseline, config: RLConfig):
  """Advances the step, or (``'raise'`` mode, a skipped update) returns the input state."""
  new = new._replace(step=state.step + 1, kl=kl_state, baseline=baseline)
  if config.nonfinite == "raise":
    new = _select(metrics["nonfinite"], state, new)
  metrics["num_skipped"] = new.num_skipped
  return new


def _rollout_output(ro: rollout_lib.Rollout, axis_name) -> dict[str, jax.Array]:
  out = {
    "tokens": ro.tokens,
    "mask": ro.mask,
    "response_mask": ro.response_mask,
    "scores": ro.scores,
  }
  if axis_name is not None:
    out = jax.tree.map(lambda x: lax.all_gather(x, axis_name, tiled=True, to="invarying"), out)
  return out


def _result(new, metrics, ro, return_rollout, axis_name):
  if return_rollout:
    return new, metrics, _rollout_output(ro, axis_name)
  return new, metrics


def _broadcast(seq_values: jax.Array, response_mask: jax.Array) -> jax.Array:
  return jnp.where(response_mask, seq_values[:, None], 0.0)


def _check_optimizer(optimizer):
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise ValueError(
      f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
    )


# ----------------------------------------------------------------------------- targets
def ppo_targets(
  ro: rollout_lib.Rollout, *, kl_coef: jax.typing.ArrayLike, config: RLConfig, axis_name: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PPO advantages and value targets of a rollout.

  Token rewards ``r_t = -kl_coef * ro.kl[t]`` plus ``ro.scores`` at the last response token
  (:func:`jaxrm.math.advantages.rlhf_token_rewards`), GAE with ``ro.values``
  (``config.gamma``, ``config.lam``), advantages whitened over the response tokens of the
  global batch when ``config.whiten_advantages``.

  Returns:
    ``(advantages, returns, rewards)``, each ``[batch, seq]``, 0 outside the response.
  """
  if ro.values is None:
    raise ValueError("ppo_targets needs rollout values: sample with value_head=True")
  resp = ro.response_mask
  rewards = adv_lib.rlhf_token_rewards(ro.scores, ro.kl, resp, kl_coef=kl_coef)
  advantages, returns = adv_lib.batched_gae(
    rewards, ro.values, resp, gamma=config.gamma, lam=config.lam
  )
  if config.whiten_advantages:
    advantages = adv_lib.whiten(advantages, resp, axis_name=axis_name)
  return advantages, returns, rewards


def reinforce_targets(
  ro: rollout_lib.Rollout,
  baseline: adv_lib.ReinforceBaselineState,
  *,
  kl_coef: jax.typing.ArrayLike,
  config: RLConfig,
  axis_name: Any = None,
):
  """REINFORCE advantages ``G_t - b`` of a rollout, and the next baseline state.

  ``G_t`` is the reward-to-go (``config.gamma``) of the PPO token rewards; the episode return
  is ``G`` at the first response token. ``b`` depends on ``config.baseline``:
  ``'moving_average'`` uses ``baseline.value`` (past batches only) and returns it updated
  with this batch's mean episode return (the global mean under ``axis_name``);
  ``'batch'`` uses the mean episode return of the global batch; ``'none'`` uses 0 (the
  baseline state is then returned unchanged).

  Returns:
    ``(advantages [batch, seq], episode_returns [batch], b (scalar), new_baseline)``.
  """
  resp = ro.response_mask
  rewards = adv_lib.rlhf_token_rewards(ro.scores, ro.kl, resp, kl_coef=kl_coef)
  returns = adv_lib.batched_reinforce_returns(rewards, resp, gamma=config.gamma)
  first = jnp.argmax(resp, axis=1)
  episode = jnp.take_along_axis(returns, first[:, None], axis=1)[:, 0]
  new_baseline = baseline
  if config.baseline == "moving_average":
    used = baseline
    new_baseline = adv_lib.reinforce_baseline_update(baseline, episode, decay=config.baseline_decay)
    # The update is linear in the batch mean, so averaging it gives the global-batch update.
    new_baseline = new_baseline._replace(value=_pmean(new_baseline.value, axis_name))
  elif config.baseline == "batch":
    used = baseline._replace(value=_pmean(jnp.mean(episode), axis_name))
  else:
    used = baseline._replace(value=jnp.zeros_like(baseline.value))
  advantages = adv_lib.reinforce_advantages(returns, resp, used)
  return advantages, episode, used.value, new_baseline


def rloo_targets(
  ro: rollout_lib.Rollout, *, kl_coef: jax.typing.ArrayLike, config: RLConfig
) -> tuple[jax.Array, jax.Array]:
  """RLOO advantages of a rollout with ``config.num_samples`` adjacent samples per prompt.

  The sequence reward is ``score - kl_coef * sum_t ro.kl[t]``; its leave-one-out advantage
  within the prompt's group is broadcast over the response tokens.

  Returns:
    ``(advantages [batch, seq], sequence_rewards [batch])``.
  """
  reward = ro.scores - kl_coef * kl_lib.sequence_kl(ro.kl, ro.response_mask)
  seq_adv = adv_lib.rloo_advantages(_groups(reward, config.num_samples)).reshape(-1)
  return _broadcast(seq_adv, ro.response_mask), reward


def grpo_targets(
  ro: rollout_lib.Rollout, *, kl_coef: jax.typing.ArrayLike, config: RLConfig
) -> tuple[jax.Array, jax.Array]:
  """GRPO advantages: group-normalised sequence rewards broadcast over the response.

  The sequence reward is the score, minus ``kl_coef * sum_t ro.kl[t]`` when
  ``config.grpo_kl == 'reward'``; normalisation by the group standard deviation when
  ``config.grpo_scale``.

  Returns:
    ``(advantages [batch, seq], sequence_rewards [batch])``.
  """
  reward = ro.scores
  if config.grpo_kl == "reward":
    reward = reward - kl_coef * kl_lib.sequence_kl(ro.kl, ro.response_mask)
  seq_adv = adv_lib.grpo_advantages(
    _groups(reward, config.num_samples), scale=config.grpo_scale
  ).reshape(-1)
  return _broadcast(seq_adv, ro.response_mask), reward


def _groups(x: jax.Array, k: int) -> jax.Array:
  if x.shape[0] % k:
    raise ValueError(
      f"the number of sequences {x.shape[0]} must be a multiple of "
      f"num_samples={k} (samples of a prompt are adjacent)"
    )
  return x.reshape(-1, k)


# ----------------------------------------------------------------------------- frame
class Targets(NamedTuple):
  """What an algorithm derives from a rollout before its updates.

  Attributes:
    data: per-sequence arrays (leading axis ``[batch]``) the loss reads besides ``tokens``,
      ``mask`` and ``response_mask`` (minibatched with them).
    metrics: scalar metrics of the targets (global under ``axis_name``).
    baseline: the next REINFORCE baseline state (kept only if the rollout is finite).
  """

  data: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  baseline: adv_lib.ReinforceBaselineState


class Algorithm(NamedTuple):
  """An RL algorithm as the shared iteration frame (:func:`iterate`) sees it.

  Attributes:
    targets: ``targets(ro, state, *, kl_coef, config, axis_name) -> Targets``.
    loss: ``loss(params, mb, *, policy, config, kl_coef, axis_name) -> (loss, aux)`` on a
      minibatch ``mb`` of the rollout's ``tokens``, ``mask``, ``response_mask`` and
      ``Targets.data``; ``aux`` is a dict of scalars (averaged over the updates).
    grouped: samples ``config.num_samples`` responses per prompt.
    value_head: reads the policy's values (rollout and loss).
    epochs: makes ``config.num_epochs x config.num_minibatches`` updates (else one update on
      the whole batch).
  """

  targets: Callable[..., Targets]
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  grouped: bool = False
  value_head: bool = False
  epochs: bool = False


def iterate(
  algorithm: Algorithm,
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn: rollout_lib.RewardFn,
  optimizer: optax.GradientTransformation,
  axis_name: Any = None,
  return_rollout: bool = False,
):
  """One RL iteration of ``algorithm``: the frame every step shares.

  Collect a rollout (``num_samples`` per prompt if grouped) -> is it finite on every device
  -> the KL coefficient of ``state`` -> ``algorithm.targets`` -> the updates of
  ``algorithm.loss`` (``num_epochs x num_minibatches`` stratified minibatches, or one) ->
  the KL controller and baseline (unchanged when the rollout is not finite) -> advance the
  step. Arguments and returns as :func:`ppo_step`.
  """
  _check_optimizer(optimizer)
  ro, offset, key = _collect(
    state,
    batch,
    reward_params,
    ref_params,
    policy=policy,
    config=config,
    reward_fn=reward_fn,
    axis_name=axis_name,
    num_samples=config.num_samples if algorithm.grouped else 1,
    value_head=algorithm.value_head,
  )
  ok = _rollout_finite(ro, axis_name)
  kl_coef = state.kl.kl_coef
  targets = algorithm.targets(ro, state, kl_coef=kl_coef, config=config, axis_name=axis_name)
  baseline = _select(ok, targets.baseline, state.baseline)
  data = {"tokens": ro.tokens, "mask": ro.mask, "response_mask": ro.response_mask}
  data.update(targets.data)
  loss_fn = functools.partial(
    algorithm.loss, policy=policy, config=config, kl_coef=kl_coef, axis_name=axis_name
  )
  new, metrics = _optimize(
    state,
    data,
    loss_fn,
    key=key,
    num_epochs=config.num_epochs if algorithm.epochs else 1,
    num_minibatches=config.num_minibatches if algorithm.epochs else 1,
    offset=offset,
    rollout_ok=ok,
    optimizer=optimizer,
    config=config,
    axis_name=axis_name,
  )
  metrics.update(_rollout_metrics(ro, kl_coef, axis_name))
  metrics.update(targets.metrics)
  kl_state = _next_kl_state(state, ro, ok, config=config, axis_name=axis_name)
  new = _finish(state, new, metrics, kl_state=kl_state, baseline=baseline, config=config)
  return _result(new, metrics, ro, return_rollout, axis_name)


# ----------------------------------------------------------------------------- algorithms
def _ppo_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, returns, _ = ppo_targets(ro, kl_coef=kl_coef, config=config, axis_name=axis_name)
  resp = ro.response_mask
  metrics = {
    "return_mean": _pmean(
      pg_losses.masked_aggregate(returns, resp, axis_name=axis_name), axis_name
    ),
    "value_mean": _pmean(
      pg_losses.masked_aggregate(ro.values, resp, axis_name=axis_name), axis_name
    ),
  }
  data = {
    "logprobs": ro.logprobs,
    "values": ro.values,
    "advantages": advantages,
    "returns": returns,
  }
  return Targets(data, metrics, state.baseline)


def _ppo_loss(params, mb, *, policy, config, kl_coef, axis_name):
  """Clipped surrogate + ``value_coef`` x clipped value loss - ``entropy_coef`` x entropy."""
  del kl_coef  # in the rewards
  agg = dict(aggregation=config.aggregation, axis_name=axis_name)
  logp, entropy, values = rollout_lib.policy_outputs(
    params, mb["tokens"], mb["mask"], policy=policy, value_head=True, temperature=config.temperature
  )
  m = mb["response_mask"]
  pl, paux = pg_losses.ppo_policy_loss(
    logp, mb["logprobs"], mb["advantages"], m, clip_eps=config.clip_eps, **agg
  )
  vl, vaux = pg_losses.ppo_value_loss(
    values, mb["values"], mb["returns"], m, clip_eps=config.value_clip_eps, **agg
  )
  ent = pg_losses.entropy_bonus(entropy, m, **agg)
  loss = pl + config.value_coef * vl - config.entropy_coef * ent
  return loss, {
    "policy_loss": pl,
    "value_loss": vl,
    "clip_fraction": paux["clip_fraction"],
    "approx_kl": paux["approx_kl"],
    "value_clip_fraction": vaux["clip_fraction"],
  }


def _pg_loss(params, mb, *, policy, config, kl_coef, axis_name):
  """``-A log pi - entropy_coef * H`` over the response (REINFORCE, RLOO)."""
  del kl_coef  # in the advantages
  agg = dict(aggregation=config.aggregation, axis_name=axis_name)
  logp, entropy, _ = rollout_lib.policy_outputs(
    params, mb["tokens"], mb["mask"], policy=policy, temperature=config.temperature
  )
  m = mb["response_mask"]
  pl = pg_losses.reinforce_loss(logp, mb["advantages"], m, **agg)
  ent = pg_losses.entropy_bonus(entropy, m, **agg)
  return pl - config.entropy_coef * ent, {"policy_loss": pl}


def _reinforce_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, episode, used, new_baseline = reinforce_targets(
    ro, state.baseline, kl_coef=kl_coef, config=config, axis_name=axis_name
  )
  metrics = {"return_mean": _pmean(jnp.mean(episode), axis_name), "baseline": used}
  return Targets({"advantages": advantages}, metrics, new_baseline)


def _rloo_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, reward = rloo_targets(ro, kl_coef=kl_coef, config=config)
  metrics = {"return_mean": _pmean(jnp.mean(reward), axis_name)}
  return Targets({"advantages": advantages}, metrics, state.baseline)


def _grpo_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, reward = grpo_targets(ro, kl_coef=kl_coef, config=config)
  data = {"logprobs": ro.logprobs, "ref_logprobs": ro.ref_logprobs, "advantages": advantages}
  metrics = {"return_mean": _pmean(jnp.mean(reward), axis_name)}
  return Targets(data, metrics, state.baseline)


def _grpo_loss(params, mb, *, policy, config, kl_coef, axis_name):
  """Clipped surrogate - entropy bonus (+ ``kl_coef`` x the aggregated KL estimate)."""
  agg = dict(aggregation=config.aggregation, axis_name=axis_name)
  logp, entropy, _ = rollout_lib.policy_outputs(
    params, mb["tokens"], mb["mask"], policy=policy, temperature=config.temperature
  )
  m = mb["response_mask"]
  pl, paux = pg_losses.ppo_policy_loss(
    logp, mb["logprobs"], mb["advantages"], m, clip_eps=config.clip_eps, **agg
  )
  loss = pl - config.entropy_coef * pg_losses.entropy_bonus(entropy, m, **agg)
  kl_loss = jnp.zeros((), jnp.float32)
  if config.grpo_kl == "loss":
    per_token = kl_lib.kl_estimate(logp, mb["ref_logprobs"], estimator=config.kl_estimator)
    kl_loss = pg_losses.masked_aggregate(per_token, m, **agg)
    loss = loss + kl_coef * kl_loss
  return loss, {
    "policy_loss": pl,
    "kl_loss": kl_loss,
    "clip_fraction": paux["clip_fraction"],
    "approx_kl": paux["approx_kl"],
  }


PPO = Algorithm(targets=_ppo_targets, loss=_ppo_loss, value_head=True, epochs=True)
REINFORCE = Algorithm(targets=_reinforce_targets, loss=_pg_loss)
RLOO = Algorithm(targets=_rloo_targets, loss=_pg_loss, grouped=True)
GRPO = Algorithm(targets=_grpo_targets, loss=_grpo_loss, grouped=True, epochs=True)


# ----------------------------------------------------------------------------- steps
def ppo_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn: rollout_lib.RewardFn,
  optimizer: optax.GradientTransformation,
  axis_name: Any = None,
  return_rollout: bool = False,
):
  """One PPO iteration: a rollout, GAE, then ``num_epochs x num_minibatches`` updates.

  Per-token rewards ``-kl_coef * KL_t`` plus the score at the last response token, GAE with
  the policy's values (:func:`ppo_targets`); each update minimises the clipped surrogate +
  ``value_coef`` x the clipped value loss - ``entropy_coef`` x the entropy.

  Args:
    state: :class:`RLState` whose ``params`` include a value head (:func:`init_value_head`
      for jaxrm's transformer).
    batch: ``{'prompts': [b, p] int, 'prompt_mask': [b, p] bool}``, LEFT-padded prompts.
    reward_params: first argument of ``reward_fn``.
    ref_params: reference policy variables (same ``policy.apply``).
    policy: the policy's functions, with values (``transformer_policy(cfg,
      value_head=True)``, or :func:`jaxrm.models.policy.apply_fn_policy` of an ``apply_fn``
      returning values).
    config: :class:`RLConfig` (static).
    reward_fn: ``reward_fn(reward_params, tokens [b, s], mask [b, s]) -> [b]``.
    optimizer: optax transformation matching ``state.opt_state``.
    axis_name: mapped axis for data parallelism (None under plain jit / vmap).
    return_rollout: also return ``{'tokens', 'mask', 'response_mask', 'scores'}`` of the
      rollout (gathered over ``axis_name``: the global batch in device order), e.g. to score
      the same samples with a gold reward.

  Returns:
    ``(state, metrics)`` or ``(state, metrics, rollout)``. Metrics (scalars, global):
    ``score`` (mean ``reward_fn``), ``kl`` (mean k1 sequence KL to the reference),
    ``kl_estimate`` (the same with ``config.kl_estimator``), ``entropy`` (per response
    token), ``response_length``, ``kl_coef`` (used by this step), ``loss``,
    ``policy_loss``, ``value_loss``, ``clip_fraction``, ``value_clip_fraction``,
    ``approx_kl`` (to the sampling policy), ``grad_norm`` (means over the updates),
    ``return_mean``, ``value_mean``, ``nonfinite`` (an update was skipped), ``num_skipped``.
  """
  return iterate(
    PPO,
    state,
    batch,
    reward_params,
    ref_params,
    policy=policy,
    config=config,
    reward_fn=reward_fn,
    optimizer=optimizer,
    axis_name=axis_name,
    return_rollout=return_rollout,
  )


def reinforce_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  **kwargs: Any,
):
  """One REINFORCE iteration: a rollout, reward-to-go minus a baseline, one update.

  Per-token rewards are those of PPO (``-kl_coef * KL_t``, plus the score at the last
  response token); the advantage of token ``t`` is the reward-to-go ``G_t`` (discount
  ``config.gamma``) minus the baseline ``config.baseline``: ``'moving_average'`` (the EMA of
  past episode returns in ``state.baseline``, used before it is updated with this batch, so
  it is independent of the current samples), ``'batch'`` (the mean episode return of this
  global batch; slightly biased, as each sample is in its own baseline) or ``'none'``.

  Args and returns: as :func:`ppo_step` (the same keyword-only arguments ``policy``,
  ``config``, ``reward_fn``, ``optimizer``, ``axis_name``, ``return_rollout``; no value head
  needed). Metrics: the rollout ones,
  ``loss``, ``policy_loss``, ``grad_norm``, ``return_mean`` (mean episode return),
  ``baseline`` (the value subtracted), ``nonfinite``, ``num_skipped``.
  """
  return iterate(REINFORCE, state, batch, reward_params, ref_params, **kwargs)


def rloo_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  **kwargs: Any,
):
  """One RLOO iteration: ``config.num_samples`` responses per prompt, one update.

  The whole response is one action: its reward is ``score - kl_coef * KL_seq`` (the chosen
  estimator summed over the response), its advantage the reward minus the mean reward of the
  other samples of the same prompt (:func:`jaxrm.math.advantages.rloo_advantages`), applied to
  every response token of ``-A log pi``.

  Args and returns: as :func:`ppo_step` (the same keyword-only arguments, no value head),
  with ``b`` prompts giving ``b * num_samples``
  sequences (the rollout returned has ``b * num_samples`` rows, the samples of a prompt
  adjacent). Metrics: the rollout ones, ``loss``, ``policy_loss``, ``grad_norm``,
  ``return_mean`` (mean sequence reward), ``nonfinite``, ``num_skipped``.
  """
  return iterate(RLOO, state, batch, reward_params, ref_params, **kwargs)


def grpo_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  **kwargs: Any,
):
  """One GRPO iteration: ``num_samples`` responses per prompt, clipped-surrogate updates.

  Advantages are the group-normalised scores (:func:`jaxrm.math.advantages.grpo_advantages`,
  ``config.grpo_scale``) broadcast over the response tokens; the loss of each of the
  ``num_epochs x num_minibatches`` updates is the PPO clipped surrogate (no value function)
  minus ``entropy_coef`` x the entropy. KL penalty (``config.grpo_kl``): ``'loss'`` adds
  ``kl_coef * aggregate(kl_estimate(log pi, log pi_ref))`` to the loss, differentiated
  through the current policy (DeepSeekMath uses ``kl_estimator='k3'``); ``'reward'``
  subtracts ``kl_coef * KL_seq`` from the score before normalisation.

  Args and returns: as :func:`rloo_step`. Metrics: the rollout ones, ``loss``,
  ``policy_loss``, ``kl_loss`` (the aggregated KL term, 0 in ``'reward'`` mode),
  ``clip_fraction``, ``approx_kl``, ``grad_norm``, ``return_mean``, ``nonfinite``,
  ``num_skipped``.
  """
  return iterate(GRPO, state, batch, reward_params, ref_params, **kwargs)


_STEPS = {"ppo": ppo_step, "reinforce": reinforce_step, "rloo": rloo_step, "grpo": grpo_step}


def get_step(algo: str) -> Callable[..., Any]:
  """The step function of ``algo`` in :data:`ALGORITHMS`."""
  if algo not in _STEPS:
    raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
  return _STEPS[algo]


def make_step(
  algo: str,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn: rollout_lib.RewardFn,
  optimizer: optax.GradientTransformation,
  return_rollout: bool = False,
) -> Callable[..., Any]:
  """``step(state, batch, reward_params, ref_params, *, axis_name=None)`` for ``algo``."""
  if not isinstance(policy, PolicyFns):
    raise ValueError(
      f"policy must be a PolicyFns (transformer_policy(config) or apply_fn_policy(apply_fn)), "
      f"got {type(policy).__name__}"
    )
  return functools.partial(
    get_step(algo),
    policy=policy,
    config=config,
    reward_fn=reward_fn,
    optimizer=optimizer,
    return_rollout=return_rollout,
  )


def uses_value_head(algo: str) -> bool:
  """Whether ``algo``'s policy needs a value head (:func:`init_value_head`)."""
  get_step(algo)
  return algo == "ppo"
