"""Distributional reward models: a transformer backbone with a mean-variance or categorical head.

Where :class:`jaxrm.models.reward_model.RewardModel` maps a sequence to one reward, a
:class:`DistributionalRewardModel` maps it to the parameters of a *distribution* of utilities
(distributional preference learning, Siththaranjan, Laidlaw & Hadfield-Menell 2023):

* ``Head('mean_variance')``: outputs ``[batch, 2]``, column 0 the mean ``mu`` and column 1
  the standard deviation ``sigma = softplus(raw) + min_std`` (the paper's code: softplus);
* ``Head('categorical', num_atoms=K, atom_low=a, atom_high=b)``: outputs logits
  ``[batch, K]`` over the atoms ``linspace(a, b, K)`` (the paper's code: 10 atoms on [0, 1]).

The backbone and pooling are RewardModel's (same ``'backbone'`` parameters, the same
:func:`jaxrm.models.reward_model.pool_hidden`), so a distributional model reads a sequence the
way the scalar one does; only the ``'head'`` (a Dense of 2 or K outputs) differs.

A :class:`Head` turns outputs into readouts (``mean``, ``std``, the lower ``quantile`` used by
the risk-averse objective) and gives the matching pairwise loss (:meth:`Head.loss_fn`) from
:mod:`jaxrm.math.distributional`.

Example::

  head = Head("categorical", num_atoms=10)
  model = DistributionalRewardModel(config, head=head)
  params = model.init(key, tokens, mask)
  out = model.apply(params, tokens, mask)          # [batch, 10] logits
  mean, risk_averse = head.mean(out), head.quantile(out, alpha=0.01)   # [batch] each
  loss = head.loss_fn(entropy_coef=0.1)(out_chosen, out_rejected)      # scalar

References:
  Siththaranjan, Laidlaw & Hadfield-Menell, "Distributional Preference Learning:
  Understanding and Accounting for Hidden Context in RLHF", ICLR 2024.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrm.math import distributional as dist
from jaxrm.models.reward_model import _POOLINGS, pool_hidden
from jaxrm.models.transformer import Transformer, TransformerConfig

HEADS = ("mean_variance", "categorical")


@dataclasses.dataclass(frozen=True)
class Head:
  """A distributional head's kind and its fixed settings (hashable: a flax attribute).

  Attributes:
    kind: ``'mean_variance'`` or ``'categorical'``.
    num_atoms: categorical: number of atoms K (>= 2).
    atom_low, atom_high: categorical: the atoms are ``linspace(atom_low, atom_high, K)``.
    min_std: mean-variance: floor added to ``softplus`` (>= 0).
  """

  kind: str
  num_atoms: int = 10
  atom_low: float = 0.0
  atom_high: float = 1.0
  min_std: float = 0.0

  def __post_init__(self):
    if self.kind not in HEADS:
      raise ValueError(f"Head.kind must be one of {HEADS}, got {self.kind!r}")
    if self.kind == "categorical":
      if not isinstance(self.num_atoms, int) or self.num_atoms < 2:
        raise ValueError(f"Head.num_atoms must be an int >= 2, got {self.num_atoms!r}")
      if not self.atom_low < self.atom_high:
        raise ValueError(
          f"Head.atom_low must be < atom_high, got {self.atom_low} and {self.atom_high}"
        )
    if not self.min_std >= 0:
      raise ValueError(f"Head.min_std must be >= 0, got {self.min_std}")

  @property
  def num_outputs(self) -> int:
    """Outputs per sequence: 2 (mean, std) or K (logits)."""
    return 2 if self.kind == "mean_variance" else self.num_atoms

  @property
  def atoms(self) -> jax.Array:
    """The categorical head's utility values ``[K]`` (float32)."""
    return jnp.linspace(self.atom_low, self.atom_high, self.num_atoms, dtype=jnp.float32)

  def _check(self, outputs: jax.typing.ArrayLike) -> jax.Array:
    outputs = jnp.asarray(outputs)
    if outputs.ndim != 2 or outputs.shape[1] != self.num_outputs:
      raise ValueError(
        f"outputs of a {self.kind} head must have shape [batch, {self.num_outputs}], got "
        f"{outputs.shape}"
      )
    return outputs

  def mean(self, outputs: jax.typing.ArrayLike) -> jax.Array:
    """Mean utility ``[batch]`` of outputs ``[batch, num_outputs]``."""
    outputs = self._check(outputs)
    if self.kind == "mean_variance":
      return outputs[:, 0]
    return dist.categorical_mean(outputs, atoms=self.atoms)

  def std(self, outputs: jax.typing.ArrayLike) -> jax.Array:
    """Standard deviation of the utility ``[batch]``."""
    outputs = self._check(outputs)
    if self.kind == "mean_variance":
      return outputs[:, 1]
    return dist.categorical_std(outputs, atoms=self.atoms)

  def quantile(self, outputs: jax.typing.ArrayLike, *, alpha: float) -> jax.Array:
    """Lower ``alpha``-quantile of the utility ``[batch]``: the risk-averse objective."""
    outputs = self._check(outputs)
    if self.kind == "mean_variance":
      return dist.mean_variance_quantile(outputs[:, 0], outputs[:, 1], alpha=alpha)
    return dist.categorical_quantile(outputs, atoms=self.atoms, alpha=alpha)

  def loss_fn(
    self, *, entropy_coef: float = 0.0, variance_penalty: float = 0.0
  ) -> Callable[..., jax.Array]:
    """The head's DPL loss ``(outputs_chosen, outputs_rejected, *, weights, labels) -> ()``.

    Args:
      entropy_coef: categorical only: the batch-mean entropy bonus
        (:func:`jaxrm.math.distributional.categorical_loss`; the paper's code uses 0.1).
      variance_penalty: mean-variance only
        (:func:`jaxrm.math.distributional.mean_variance_loss`; 0 in the paper's code).
    """
    if self.kind == "mean_variance" and entropy_coef:
      raise ValueError("entropy_coef applies to the categorical head only")
    if self.kind == "categorical" and variance_penalty:
      raise ValueError("variance_penalty applies to the mean_variance head only")
    return functools.partial(
      _loss, self, entropy_coef=entropy_coef, variance_penalty=variance_penalty
    )


def _loss(head, outputs_chosen, outputs_rejected, *, weights=None, labels=None, **hyper):
  oc, orj = head._check(outputs_chosen), head._check(outputs_rejected)
  if oc.shape != orj.shape:
    raise ValueError(
      f"outputs_rejected must have the shape of outputs_chosen {oc.shape}, got {orj.shape}"
    )
  if head.kind == "mean_variance":
    return dist.mean_variance_loss(
      oc[:, 0],
      oc[:, 1],
      orj[:, 0],
      orj[:, 1],
      weights=weights,
      labels=labels,
      variance_penalty=hyper["variance_penalty"],
    )
  return dist.categorical_loss(
    oc, orj, atoms=head.atoms, weights=weights, labels=labels, entropy_coef=hyper["entropy_coef"]
  )


class DistributionalRewardModel(nn.Module):
  """Backbone + distributional head: ``(tokens, mask [batch, seq]) -> [batch, num_outputs]``.

  Parameters live under ``'backbone'`` (the layout of RewardModel's backbone) and ``'head'``
  (Dense ``width -> head.num_outputs``).

  Attributes:
    config: backbone configuration.
    head: the :class:`Head`.
    pooling: ``'last'`` or ``'mean'`` (:func:`jaxrm.models.reward_model.pool_hidden`).
  """

  config: TransformerConfig
  head: Head
  pooling: str = "last"

  @nn.compact
  def __call__(self, tokens: jax.typing.ArrayLike, mask: jax.typing.ArrayLike) -> jax.Array:
    """Returns float32 ``[batch, 2]`` (mean, std) or ``[batch, K]`` logits."""
    if self.pooling not in _POOLINGS:
      raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
    hidden = Transformer(self.config, name="backbone")(tokens, mask)
    pooled = pool_hidden(hidden, mask, pooling=self.pooling)
    out = nn.Dense(
      self.head.num_outputs,
      use_bias=True,
      dtype=jnp.float32,
      param_dtype=self.config.param_dtype,
      name="head",
    )(pooled).astype(jnp.float32)
    if self.head.kind == "mean_variance":
      std = jax.nn.softplus(out[:, 1]) + self.head.min_std
      out = jnp.stack([out[:, 0], std], axis=-1)
    return out
