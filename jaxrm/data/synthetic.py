"""A synthetic RLHF world in the shape of Gao et al. (2022), small enough for a laptop CPU.

No pretrained model or human data is needed. The world has:

* ``pi_init``: a small transformer LM (:class:`jaxrm.models.policy.PolicyModel`) whose LM-head bias is
  the log of a Zipf unigram distribution and whose random backbone makes the next-token
  distribution depend on the context. All comparison data is sampled from it.
* a **gold** reward (the "human"): a larger frozen random transformer
  (:class:`jaxrm.models.reward_model.RewardModel`) plus a planted *feature* term: the count ``c`` of
  one token in the response is rewarded linearly (``feature_coef`` per standard deviation of
  ``c`` under ``pi_init``) and penalised beyond its ``feature_quantile`` quantile ``c_q`` under
  ``pi_init`` (``- feature_penalty * (c - c_q) ** feature_penalty_power``; the default linear
  penalty outweighs the gain, so gold falls linearly in ``c`` past ``c_q``). This is the
  extremal-Goodhart mechanism: a proxy fitted on ``pi_init`` data sees few responses past
  ``c_q`` and extrapolates "more is better", like a verbosity bias (Singhal et al. 2023).
  The transformer part adds a complex target that small proxies fit worse than large ones.
  Gold is re-centred and scaled to mean 0 and unit variance under ``pi_init``.
* comparisons: pairs of ``pi_init`` responses to the same prompt, labelled by gold, either
  deterministically (the higher gold wins) or by Bradley-Terry (``P(a > b) = sigmoid(g_a - g_b)``),
  with an optional rate of flipped labels.

Prompts are ``prompt_len`` tokens drawn i.i.d. from the same Zipf unigram; responses have a
fixed length ``response_len`` (no EOS), so every sequence is ``prompt_len + response_len``
tokens with an all-True mask, and the response is the fixed slice ``[prompt_len:]``.

Example::

  cfg = WorldConfig()
  world = init_world(cfg, jax.random.key(0))
  prompts = sample_prompts(cfg, jax.random.key(1), 128)
  tokens, mask = sample_responses(world, cfg, prompts, jax.random.key(2))
  gold = gold_reward(world, cfg, tokens, mask)      # [128], ~N(0, 1) under pi_init
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrm.math._arrays import check_key
from jaxrm.models import sampling
from jaxrm.models.policy import PolicyModel
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig

_LABELS = ("deterministic", "bradley_terry")


@dataclasses.dataclass(unsafe_hash=True)
class WorldConfig:
  """Everything that defines a synthetic world (hashable; the world is a function of it).

  Mutable so that command-line configs can override its fields
  (``--config.data.synthetic.world.gold_width=32``); treated as immutable once a run starts
  (it is a static jit argument, hashed by value).

  Attributes:
    vocab_size: tokens ``0 .. vocab_size - 1``; all are ordinary tokens (masks are explicit).
    prompt_len: prompt length in tokens.
    response_len: response length in tokens.
    zipf_exponent: ``p(k) ~ (k + 1) ** -zipf_exponent`` for the prompt tokens and the
      LM-head bias of ``pi_init``.
    policy_layers, policy_width, policy_heads: ``pi_init``'s transformer.
    policy_logit_scale: standard deviation multiplier of ``pi_init``'s LM-head kernel: 0
      gives a context-free Zipf unigram, larger values a more context-dependent policy.
    gold_layers, gold_width, gold_heads: the gold reward model's transformer.
    feature_token: the token whose response count is the planted feature.
    feature_coef: gold reward per standard deviation of the feature count.
    feature_penalty: penalty per (count beyond the threshold) ** feature_penalty_power.
    feature_penalty_power: 1 (default) makes gold fall linearly past the threshold; best-of-n
      then moves the count roughly like d**2 = KL, so gold vs d has Gao et al.'s
      ``d (alpha - beta d)`` shape. 2 (a quadratic penalty) makes the fall much steeper.
    feature_quantile: the threshold is this quantile of the count under ``pi_init``.
    num_calibration: ``pi_init`` samples used to measure the normalising statistics.
  """

  vocab_size: int = 16
  prompt_len: int = 4
  response_len: int = 12
  zipf_exponent: float = 1.0
  policy_layers: int = 2
  policy_width: int = 32
  policy_heads: int = 2
  policy_logit_scale: float = 1.0
  gold_layers: int = 2
  gold_width: int = 64
  gold_heads: int = 4
  feature_token: int = 3
  feature_coef: float = 0.7
  feature_penalty: float = 1.5
  feature_penalty_power: float = 1.0
  feature_quantile: float = 0.9
  num_calibration: int = 16384

  def __post_init__(self):
    for name in ("vocab_size", "prompt_len", "response_len", "num_calibration"):
      if getattr(self, name) < 1:
        raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.feature_token < self.vocab_size:
      raise ValueError(
        f"WorldConfig.feature_token must lie in [0, {self.vocab_size}), got {self.feature_token}"
      )
    if not 0.0 < self.feature_quantile < 1.0:
      raise ValueError(
        f"WorldConfig.feature_quantile must lie in (0, 1), got {self.feature_quantile}"
      )

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.response_len

  def policy_config(self) -> TransformerConfig:
    return TransformerConfig(
      vocab_size=self.vocab_size,
      num_layers=self.policy_layers,
      width=self.policy_width,
      num_heads=self.policy_heads,
      max_len=self.seq_len,
    )

  def gold_config(self) -> TransformerConfig:
    return TransformerConfig(
      vocab_size=self.vocab_size,
      num_layers=self.gold_layers,
      width=self.gold_width,
      num_heads=self.gold_heads,
      max_len=self.seq_len,
    )

  def reward_config(self, *, num_layers: int, width: int, num_heads: int) -> TransformerConfig:
    """A reward-model backbone for this world's sequences (used for the proxies)."""
    return TransformerConfig(
      vocab_size=self.vocab_size,
      num_layers=num_layers,
      width=width,
      num_heads=num_heads,
      max_len=self.seq_len,
    )


def parse_world_overrides(text: str) -> dict[str, Any]:
  """Parses ``'feature_quantile=0.9,gold_width=32'`` into typed :class:`WorldConfig` fields.

  Raises:
    ValueError: naming the malformed item, the unknown field or the mistyped value.
  """
  types = {f.name: type(f.default) for f in dataclasses.fields(WorldConfig)}
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = (s.strip() for s in item.partition("="))
    if not sep:
      raise ValueError(f"{item!r} is not FIELD=VALUE")
    if key not in types:
      raise ValueError(f"unknown WorldConfig field {key!r}; valid: {sorted(types)}")
    try:
      out[key] = types[key](value)
    except ValueError:
      raise ValueError(
        f"WorldConfig.{key} must be a {types[key].__name__}, got {value!r}"
      ) from None
  return out


class GoldStats(NamedTuple):
  """Normalising statistics of gold, measured on ``pi_init`` samples (all shape=(), float32)."""

  raw_mean: jax.Array  # shape=(), float32: mean of the transformer part
  raw_std: jax.Array  # shape=(), float32
  count_mean: jax.Array  # shape=(), float32: mean feature count
  count_std: jax.Array  # shape=(), float32
  count_threshold: jax.Array  # shape=(), float32: feature_quantile of the count
  mean: jax.Array  # shape=(), float32: mean of the un-normalised gold
  std: jax.Array  # shape=(), float32


class World(NamedTuple):
  """The frozen parts of a world: ``pi_init`` and gold parameters and gold's statistics."""

  policy_params: Any
  gold_params: Any
  stats: GoldStats


def zipf_logits(vocab_size: int, exponent: float) -> jax.Array:
  """Log-probabilities ``[vocab_size]`` of the Zipf law ``p(k) ~ (k + 1) ** -exponent``."""
  logits = -exponent * jnp.log(jnp.arange(1, vocab_size + 1, dtype=jnp.float32))
  return jax.nn.log_softmax(logits)


def policy_model(cfg: WorldConfig, *, value_head: bool = False) -> PolicyModel:
  """The ``PolicyModel`` of ``pi_init`` (Zipf LM-head bias, scaled random LM-head kernel)."""
  bias = zipf_logits(cfg.vocab_size, cfg.zipf_exponent)
  return PolicyModel(
    cfg.policy_config(),
    value_head=value_head,
    lm_bias_init=lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(bias, shape),
    lm_kernel_init=nn.initializers.variance_scaling(cfg.policy_logit_scale**2, "fan_in", "normal"),
  )


def sample_prompts(cfg: WorldConfig, key: jax.Array, num: int) -> jax.Array:
  """``[num, prompt_len]`` int32 prompts drawn i.i.d. from the Zipf unigram."""
  check_key(key)
  logits = zipf_logits(cfg.vocab_size, cfg.zipf_exponent)
  return jax.random.categorical(key, logits, shape=(num, cfg.prompt_len)).astype(jnp.int32)


def sample_responses(
  world: World, cfg: WorldConfig, prompts: jax.Array, key: jax.Array, *, policy_params: Any = None
) -> tuple[jax.Array, jax.Array]:
  """Samples one response per prompt from ``pi_init`` (or ``policy_params``).

  Args:
    world: the world.
    cfg: its configuration.
    prompts: ``[batch, prompt_len]`` int prompts.
    key: PRNG key.
    policy_params: parameters of a policy with ``pi_init``'s architecture; ``pi_init``'s
      when None.

  Returns:
    ``(tokens [batch, seq_len] int32, mask [batch, seq_len] bool)``.
  """
  params = world.policy_params if policy_params is None else policy_params
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 2 or prompts.shape[1] != cfg.prompt_len:
    raise ValueError(f"prompts must have shape [batch, {cfg.prompt_len}], got {prompts.shape}")
  out = sampling.sample(
    params,
    prompts,
    jnp.ones(prompts.shape, bool),
    key,
    config=cfg.policy_config(),
    max_new_tokens=cfg.response_len,
    eos_id=None,
  )
  return out.tokens, out.mask


def feature_count(cfg: WorldConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """``[batch]`` float32 count of ``cfg.feature_token`` in the response."""
  response = tokens[:, cfg.prompt_len :]
  return jnp.sum(
    (response == cfg.feature_token) & mask[:, cfg.prompt_len :], axis=-1, dtype=jnp.float32
  )


def _gold_parts(gold_params, cfg: WorldConfig, tokens, mask):
  raw = RewardModel(cfg.gold_config()).apply(gold_params, tokens, mask)
  return raw, feature_count(cfg, tokens, mask)


def _combine(cfg: WorldConfig, stats: GoldStats, raw, count):
  """Un-normalised gold: standardised transformer part + planted feature term."""
  linear = cfg.feature_coef * (count - stats.count_mean) / stats.count_std
  excess = jnp.maximum(count - stats.count_threshold, 0.0)
  penalty = cfg.feature_penalty * excess**cfg.feature_penalty_power
  return (raw - stats.raw_mean) / stats.raw_std + linear - penalty


@functools.partial(jax.jit, static_argnames=("cfg",))
def _gold(gold_params, stats: GoldStats, cfg: WorldConfig, tokens, mask) -> dict[str, jax.Array]:
  """Gold ``[batch]`` and its ``rest`` and ``feature`` parts, as one compiled program.

  Op by op, gold and its parts compiled 161 small programs at every new batch size (counted
  by ``tests/test_synthetic.py``); now one. Inside a caller's ``jit`` this call is inlined, and
  what the caller does not use is dropped."""
  raw, count = _gold_parts(gold_params, cfg, tokens, mask)
  combined = _combine(cfg, stats, raw, count)
  rest = (raw - stats.raw_mean) / stats.raw_std
  return {
    "gold": (combined - stats.mean) / stats.std,
    "rest": rest / stats.std,
    "feature": (combined - rest - stats.mean) / stats.std,
  }


def _check_sequences(cfg: WorldConfig, tokens: Any, mask: Any) -> None:
  """Raises ``ValueError`` unless ``tokens`` and ``mask`` are ``[batch, cfg.seq_len]``."""
  want = f"[batch, {cfg.seq_len}] (prompt_len {cfg.prompt_len} + response_len {cfg.response_len})"
  if jnp.ndim(tokens) != 2 or jnp.shape(tokens)[1] != cfg.seq_len:
    raise ValueError(f"tokens must have shape {want}, got {jnp.shape(tokens)}")
  if jnp.shape(mask) != jnp.shape(tokens):
    raise ValueError(
      f"mask must have the shape of tokens {jnp.shape(tokens)}, got {jnp.shape(mask)}"
    )


def gold_reward(world: World, cfg: WorldConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Gold reward ``[batch]`` float32: mean 0 and unit variance under ``pi_init``.

  Args:
    world: the world.
    cfg: its configuration.
    tokens: ``[batch, seq_len]`` prompt + response tokens.
    mask: ``[batch, seq_len]`` bool.
  """
  _check_sequences(cfg, tokens, mask)
  return _gold(world.gold_params, world.stats, cfg, tokens, mask)["gold"]


def gold_components(
  world: World, cfg: WorldConfig, tokens: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
  """Gold split into its two parts, each ``[batch]`` float32, in gold's units.

  ``rest`` is the random-transformer part and ``feature`` the planted feature's term (its
  linear reward minus the penalty past ``count_threshold``, with gold's centring), so that
  ``rest + feature == gold_reward(world, cfg, tokens, mask)`` up to float rounding. Under
  ``pi_init`` ``rest`` has mean 0. Tells which flaw an optimiser exploits: the planted
  feature or the transformer's idiosyncrasies.

  Args:
    world, cfg, tokens, mask: as :func:`gold_reward`.

  Returns:
    ``{'rest': [batch], 'feature': [batch]}``.
  """
  _check_sequences(cfg, tokens, mask)
  parts = _gold(world.gold_params, world.stats, cfg, tokens, mask)
  return {"rest": parts["rest"], "feature": parts["feature"]}


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_world(cfg: WorldConfig, key: jax.Array) -> World:
  """Builds ``pi_init`` and gold from a key and measures gold's normalising statistics.

  Args:
    cfg: the world's configuration (static).
    key: PRNG key; the world is a deterministic function of ``(cfg, key)``.

  Returns:
    The :class:`World`.
  """
  check_key(key)
  k_policy, k_gold, k_prompts, k_samples = jax.random.split(key, 4)
  dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
  dummy_mask = jnp.ones((1, cfg.seq_len), bool)
  policy_params = policy_model(cfg).init(k_policy, dummy, dummy_mask)
  gold_params = RewardModel(cfg.gold_config()).init(k_gold, dummy, dummy_mask)
  prompts = sample_prompts(cfg, k_prompts, cfg.num_calibration)
  out = sampling.sample(
    policy_params,
    prompts,
    jnp.ones(prompts.shape, bool),
    k_samples,
    config=cfg.policy_config(),
    max_new_tokens=cfg.response_len,
    eos_id=None,
  )
  raw, count = _gold_parts(gold_params, cfg, out.tokens, out.mask)
  one = jnp.float32(1.0)
  stats = GoldStats(
    raw_mean=raw.mean(),
    raw_std=raw.std(),
    count_mean=count.mean(),
    count_std=jnp.maximum(count.std(), 1e-6),
    count_threshold=jnp.quantile(count, cfg.feature_quantile),
    mean=jnp.float32(0.0),
    std=one,
  )
  combined = _combine(cfg, stats, raw, count)
  stats = stats._replace(mean=combined.mean(), std=combined.std())
  return World(policy_params, gold_params, stats)


class Comparisons(NamedTuple):
  """Gold-labelled pairs of ``pi_init`` responses, as a preference batch plus gold scores.

  ``as_batch()`` gives the dict consumed by :func:`jaxrm.steps.rm_step.reward_model_step`.
  """

  chosen: jax.Array  # [num, seq_len] int32
  rejected: jax.Array  # [num, seq_len] int32
  mask: jax.Array  # [num, seq_len] bool (the same for both sides: fixed lengths)
  gold_chosen: jax.Array  # [num] float32
  gold_rejected: jax.Array  # [num] float32

  def as_batch(self) -> dict[str, jax.Array]:
    return {
      "chosen": self.chosen,
      "chosen_mask": self.mask,
      "rejected": self.rejected,
      "rejected_mask": self.mask,
    }


def make_comparisons(
  world: World,
  cfg: WorldConfig,
  key: jax.Array,
  *,
  num: int,
  labels: str = "deterministic",
  label_noise: float = 0.0,
) -> Comparisons:
  """Samples ``num`` pairs of ``pi_init`` responses to shared prompts and labels them by gold.

  Args:
    world: the world.
    cfg: its configuration.
    key: PRNG key.
    num: number of pairs.
    labels: ``'deterministic'`` (higher gold wins; ties broken by a coin) or
      ``'bradley_terry'`` (``a`` wins with probability ``sigmoid(gold_a - gold_b)``).
    label_noise: probability that a label is flipped after labelling, in ``[0, 0.5]``.

  Returns:
    :class:`Comparisons` with the preferred response as ``chosen``.
  """
  if labels not in _LABELS:
    raise ValueError(f"labels must be one of {_LABELS}, got {labels!r}")
  if not 0.0 <= label_noise <= 0.5:
    raise ValueError(f"label_noise must lie in [0, 0.5], got {label_noise}")
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  check_key(key)
  return _make_comparisons(world, cfg, key, num, labels, jnp.float32(label_noise))


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _make_comparisons(world, cfg, key, num, labels, label_noise):
  k_prompts, k_a, k_b, k_label, k_noise = jax.random.split(key, 5)
  prompts = sample_prompts(cfg, k_prompts, num)
  tokens_a, mask = sample_responses(world, cfg, prompts, k_a)
  tokens_b, _ = sample_responses(world, cfg, prompts, k_b)
  gold_a = gold_reward(world, cfg, tokens_a, mask)
  gold_b = gold_reward(world, cfg, tokens_b, mask)
  if labels == "bradley_terry":
    p_a = jax.nn.sigmoid(gold_a - gold_b)
  else:
    p_a = jnp.where(gold_a == gold_b, 0.5, (gold_a > gold_b).astype(jnp.float32))
  a_wins = jax.random.uniform(k_label, (num,)) < p_a
  a_wins = a_wins ^ (jax.random.uniform(k_noise, (num,)) < label_noise)
  pick = lambda x, y: jnp.where(a_wins.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  return Comparisons(
    chosen=pick(tokens_a, tokens_b),
    rejected=pick(tokens_b, tokens_a),
    mask=mask,
    gold_chosen=pick(gold_a, gold_b),
    gold_rejected=pick(gold_b, gold_a),
  )
