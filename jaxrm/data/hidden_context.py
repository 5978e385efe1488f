"""Hidden context in the synthetic world: two annotator groups with different gold rewards.

The synthetic world (:mod:`jaxrm.data.synthetic`) has one gold reward, ``gold = rest +
feature`` (:func:`jaxrm.data.synthetic.gold_components`: a random-transformer part and the
planted feature's term). Here two annotator groups label the comparisons:

* group 1's gold is the world's gold: ``g1 = rest + feature``;
* group 2 weighs the planted feature differently: ``g2 = rest + group2_feature_weight *
  feature`` (the default ``-1``: group 2 dislikes exactly what group 1 likes about it).

Each comparison is labelled by one group, group 2 with probability ``group2_prob``, and which
group labelled it is not in the data: the *hidden context* of Siththaranjan, Laidlaw &
Hadfield-Menell (2023). A response's utility is then a random variable, ``g1`` with probability
``1 - p`` and ``g2`` with probability ``p``: its mean is the expected utility
``(1 - p) g1 + p g2`` and its standard deviation ``sqrt(p (1 - p)) |g1 - g2|``
(:func:`utility_moments`), zero where the groups agree. A distributional reward model should
predict that spread; a Bradley–Terry one aggregates the groups by Borda count.

The world itself is unchanged (a :class:`HiddenContextConfig` sits beside a
:class:`jaxrm.data.synthetic.WorldConfig`, so a world and its caches are the same with or
without hidden context).

Example::

  hc = HiddenContextConfig(group2_prob=0.5)
  data = make_comparisons(world, cfg, hc, key, num=2000)
  data.as_batch()                  # the preference batch of any reward-model step
  data.golds_chosen                # [2000, 2]: both groups' gold of the chosen responses
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrm.data import synthetic

LABELS = ("deterministic", "bradley_terry")


@dataclasses.dataclass(unsafe_hash=True)
class HiddenContextConfig:
  """The two annotator groups (hashable: a static jit argument).

  Attributes:
    group2_prob: probability that a comparison is labelled by group 2, in ``[0, 1]``.
    group2_feature_weight: group 2's weight on the planted feature's term (group 1's is 1).
    labels: how a group labels a pair by its gold: ``'deterministic'`` (higher gold wins, a
      tie by a coin) or ``'bradley_terry'`` (``P(a > b) = sigmoid(g_a - g_b)``).
  """

  group2_prob: float = 0.5
  group2_feature_weight: float = -1.0
  labels: str = "deterministic"

  def __post_init__(self):
    if not 0.0 <= self.group2_prob <= 1.0:
      raise ValueError(
        f"HiddenContextConfig.group2_prob must lie in [0, 1], got {self.group2_prob}"
      )
    if self.labels not in LABELS:
      raise ValueError(f"HiddenContextConfig.labels must be one of {LABELS}, got {self.labels!r}")
    if not math.isfinite(self.group2_feature_weight):
      raise ValueError(
        "HiddenContextConfig.group2_feature_weight must be finite, got "
        f"{self.group2_feature_weight}"
      )


def group_golds(
  world: synthetic.World,
  cfg: synthetic.WorldConfig,
  hc: HiddenContextConfig,
  tokens: jax.Array,
  mask: jax.Array,
) -> jax.Array:
  """Both groups' gold ``[batch, 2]`` (column 0: group 1 = the world's gold; 1: group 2).

  Args:
    world, cfg: the synthetic world.
    hc: the groups.
    tokens: ``[batch, seq_len]``; mask: ``[batch, seq_len]`` bool.
  """
  parts = synthetic.gold_components(world, cfg, tokens, mask)
  g1 = parts["rest"] + parts["feature"]
  g2 = parts["rest"] + hc.group2_feature_weight * parts["feature"]
  return jnp.stack([g1, g2], axis=-1)


def utility_moments(golds: jax.typing.ArrayLike, *, group2_prob: float) -> dict[str, jax.Array]:
  """Mean and standard deviation of the hidden-context utility of each response.

  Args:
    golds: ``[batch, 2]`` from :func:`group_golds`.
    group2_prob: ``p`` in [0, 1].

  Returns:
    ``{'mean': (1 - p) g1 + p g2, 'std': sqrt(p (1 - p)) |g1 - g2|}``, ``[batch]`` each.
  """
  golds = jnp.asarray(golds)
  if golds.ndim != 2 or golds.shape[1] != 2:
    raise ValueError(f"golds must have shape [batch, 2], got {golds.shape}")
  if not 0.0 <= group2_prob <= 1.0:
    raise ValueError(f"group2_prob must lie in [0, 1], got {group2_prob}")
  p = group2_prob
  return {
    "mean": (1.0 - p) * golds[:, 0] + p * golds[:, 1],
    "std": jnp.sqrt(p * (1.0 - p)) * jnp.abs(golds[:, 0] - golds[:, 1]),
  }


def label_pairs(
  golds_a: jax.Array,
  golds_b: jax.Array,
  group: jax.Array,
  uniform: jax.Array,
  *,
  labels: str,
) -> jax.Array:
  """Whether ``a`` wins each pair, labelled by its group's gold.

  Args:
    golds_a, golds_b: ``[num, 2]`` both groups' gold of the two responses.
    group: ``[num]`` int, 0 (group 1) or 1 (group 2): who labels the pair.
    uniform: ``[num]`` uniform(0, 1) draws: ``a`` wins iff ``uniform < P(a > b)`` under the
      group's gold (``labels``: deterministic, ties a coin, or Bradley–Terry).

  Returns:
    ``[num]`` bool.
  """
  ga = jnp.take_along_axis(golds_a, group[:, None], axis=1)[:, 0]
  gb = jnp.take_along_axis(golds_b, group[:, None], axis=1)[:, 0]
  if labels == "bradley_terry":
    p_a = jax.nn.sigmoid(ga - gb)
  elif labels == "deterministic":
    p_a = jnp.where(ga == gb, 0.5, (ga > gb).astype(jnp.float32))
  else:
    raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
  return uniform < p_a


class HiddenContextComparisons(NamedTuple):
  """Pairs of ``pi_init`` responses labelled by one hidden group each.

  ``as_batch()`` gives the preference batch of :mod:`jaxrm.steps.rm_step`; the group and both
  groups' gold are for analysis only (a model trained on the batch never sees them).
  """

  chosen: jax.Array  # [num, seq_len] int32
  rejected: jax.Array  # [num, seq_len] int32
  mask: jax.Array  # [num, seq_len] bool
  group: jax.Array  # [num] int32: 0 = group 1, 1 = group 2 labelled the pair
  golds_chosen: jax.Array  # [num, 2] float32
  golds_rejected: jax.Array  # [num, 2] float32

  def as_batch(self) -> dict[str, jax.Array]:
    return {
      "chosen": self.chosen,
      "chosen_mask": self.mask,
      "rejected": self.rejected,
      "rejected_mask": self.mask,
    }


def make_comparisons(
  world: synthetic.World,
  cfg: synthetic.WorldConfig,
  hc: HiddenContextConfig,
  key: jax.Array,
  *,
  num: int,
) -> HiddenContextComparisons:
  """Samples ``num`` pairs of ``pi_init`` responses to shared prompts, each labelled by a group.

  The group of each pair is 1 (group 2) with probability ``hc.group2_prob``, independently.

  Args:
    world, cfg: the synthetic world.
    hc: the groups and the labelling rule.
    key: PRNG key.
    num: number of pairs (>= 1).
  """
  if not isinstance(num, int) or num < 1:
    raise ValueError(f"num must be an int >= 1, got {num!r}")
  return _make_comparisons(world, cfg, hc, key, num)


@functools.partial(jax.jit, static_argnums=(1, 2, 4))
def _make_comparisons(world, cfg, hc, key, num):
  k_prompts, k_a, k_b, k_group, k_label = jax.random.split(key, 5)
  prompts = synthetic.sample_prompts(cfg, k_prompts, num)
  tokens_a, mask = synthetic.sample_responses(world, cfg, prompts, k_a)
  tokens_b, _ = synthetic.sample_responses(world, cfg, prompts, k_b)
  golds_a = group_golds(world, cfg, hc, tokens_a, mask)
  golds_b = group_golds(world, cfg, hc, tokens_b, mask)
  group = (jax.random.uniform(k_group, (num,)) < hc.group2_prob).astype(jnp.int32)
  a_wins = label_pairs(
    golds_a, golds_b, group, jax.random.uniform(k_label, (num,)), labels=hc.labels
  )
  pick = lambda x, y: jnp.where(a_wins.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  return HiddenContextComparisons(
    chosen=pick(tokens_a, tokens_b),
    rejected=pick(tokens_b, tokens_a),
    mask=mask,
    group=group,
    golds_chosen=pick(golds_a, golds_b),
    golds_rejected=pick(golds_b, golds_a),
  )
