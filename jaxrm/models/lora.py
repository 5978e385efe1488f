"""LoRA adapters (through ``qwix``) with a trainable reward or value head.

Low-rank adaptation (Hu et al. 2021) replaces a frozen kernel ``W`` by ``W + (alpha / rank)
A B`` with trainable ``A [in, rank]`` (random) and ``B [rank, out]`` (zero, so training starts
from the base model). The adapters are added by Google's ``qwix`` library
(:func:`qwix.apply_lora_to_model`), which wraps a flax module and creates ``<kernel>_lora_a``
and ``<kernel>_lora_b`` parameters next to each matching kernel; jaxrm adds what a reward-model
or RL step needs around it:

* :func:`lora_model` wraps a :class:`jaxrm.models.reward_model.RewardModel` or
  :class:`jaxrm.models.policy.PolicyModel` (targets: the attention and MLP projections of
  every block by default);
* :func:`init_lora` builds its variables around existing (e.g. imported) base parameters;
* :func:`trainable_mask` marks the adapters and the heads (``head``, ``value_head``) as
  trainable; :func:`lora_optimizer` zeroes every other update (no optimizer state for them) and
  :func:`freeze_apply_fn` stops their gradients, so the existing steps
  (:func:`jaxrm.steps.rm_step.reward_model_step`, :func:`jaxrm.steps.sft.sft_step`, the RL
  steps) train LoRA unchanged;
* :func:`merge_lora` folds the adapters into the kernels, giving plain parameters of the
  wrapped model (for export with :mod:`jaxrm.io.hf`, or faster inference).

Example::

  base = hf.import_reward_model("ckpt/")
  model = lora_model(RewardModel(base.config), rank=8, alpha=16.0)
  variables = init_lora(model, base.variables, key, tokens, mask)
  optimizer = lora_optimizer(optax.adamw(1e-4), variables)
  apply_fn = freeze_apply_fn(model.apply, variables)

References:
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import qwix

# Attention and MLP projections of every block (the names of jaxrm.models.transformer).
DEFAULT_TARGETS = r".*block_\d+/(qkv|query|key|value|attn_out|mlp_in|mlp_gate|mlp_out)"
HEADS = ("head", "value_head")
_SUFFIXES = ("_lora_a", "_lora_b")


def lora_model(
  model: nn.Module,
  *,
  rank: int,
  alpha: float,
  targets: str = DEFAULT_TARGETS,
  dropout: float = 0.0,
) -> nn.Module:
  """Wraps ``model`` so that the kernels of modules whose path matches ``targets`` get LoRA.

  Args:
    model: a flax linen module (``RewardModel``, ``PolicyModel``, ...).
    rank: LoRA rank ``r`` (positive).
    alpha: scale; the update is ``(alpha / rank) A B``.
    targets: regular expression over module paths (e.g. ``'backbone/block_0/query'``).
    dropout: dropout rate on the adapter input (needs a ``'dropout'`` rng when positive).

  Returns:
    The wrapped module; its variables are the base variables plus the adapters.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"alpha must be positive, got {alpha}")
  provider = qwix.LoraProvider(module_path=targets, rank=rank, alpha=float(alpha), dropout=dropout)
  return qwix.apply_lora_to_model(model, provider)


def is_adapter(path: tuple[Any, ...]) -> bool:
  """True for a ``*_lora_a`` / ``*_lora_b`` leaf path."""
  last = getattr(path[-1], "key", path[-1])
  return isinstance(last, str) and last.endswith(_SUFFIXES)


def trainable_mask(variables: Any) -> Any:
  """Pytree of bools: True on LoRA adapters and on the ``head``/``value_head`` parameters."""

  def leaf(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return is_adapter(path) or any(h in keys for h in HEADS)

  return jax.tree_util.tree_map_with_path(leaf, variables)


def init_lora(
  model: nn.Module,
  base_variables: Any,
  key: jax.Array,
  tokens: jax.typing.ArrayLike,
  mask: jax.typing.ArrayLike,
) -> Any:
  """Variables of a :func:`lora_model`: ``base_variables`` plus freshly initialised adapters.

  Args:
    model: the wrapped module from :func:`lora_model`.
    base_variables: variables of the unwrapped model (e.g. ``HFModel.variables``).
    key: PRNG key for the adapters' ``A`` matrices.
    tokens: ``[batch, seq]`` example input (shapes only).
    mask: ``[batch, seq]`` example mask.

  Returns:
    The variables; the wrapped model computes exactly what the base model computes until
    ``B`` is trained.
  """
  fresh = model.init(key, tokens, mask)
  flat_base = dict(jax.tree_util.tree_flatten_with_path(base_variables)[0])
  missing = []

  def pick(path, init_value):
    if is_adapter(path):
      return init_value
    if path not in flat_base:
      missing.append(jax.tree_util.keystr(path))
      return init_value
    return flat_base[path]

  out = jax.tree_util.tree_map_with_path(pick, fresh)
  if missing:
    raise ValueError(f"base_variables has no leaves {missing[:5]} of the model")
  return out


def lora_optimizer(optimizer: optax.GradientTransformation, variables: Any) -> Any:
  """``optimizer`` on the trainable leaves (:func:`trainable_mask`), zero updates elsewhere."""
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(variables))
  return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def freeze_apply_fn(apply_fn: Callable[..., Any], variables: Any) -> Callable[..., Any]:
  """Wraps ``apply_fn(variables, ...)`` so no gradient flows into the frozen leaves."""
  mask = trainable_mask(variables)

  def apply(params, *args, **kwargs):
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
    return apply_fn(params, *args, **kwargs)

  return apply


def merge_lora(variables: Any, *, rank: int, alpha: float) -> Any:
  """Folds the adapters into their kernels: ``W + (alpha / rank) reshape(A @ B, W.shape)``.

  Args:
    variables: variables of a :func:`lora_model`.
    rank: the LoRA rank used.
    alpha: the LoRA alpha used.

  Returns:
    Variables of the unwrapped model (adapters removed), in the kernels' dtype.
  """
  scale = alpha / rank

  def merge(tree):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for name, value in tree.items():
      if isinstance(name, str) and name.endswith(_SUFFIXES):
        continue
      a, b = tree.get(f"{name}_lora_a"), tree.get(f"{name}_lora_b")
      if a is not None and b is not None:
        delta = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
        value = (jnp.asarray(value, jnp.float32) + scale * delta.reshape(value.shape)).astype(
          value.dtype
        )
      out[name] = merge(value)
    return out

  return merge(jax.tree.map(lambda x: x, variables))
