"""Text policies of the policy loop (:mod:`jaxrm.train.policy`): SFT or imported starting
points, a separate KL reference, and the decoded samples written during training.

* :func:`load_text_policy` resolves ``config.policy`` (a preset, a local Hugging Face
  checkpoint folder or an SFT run directory, :func:`jaxrm.io.policy_io.load_policy`) with
  ``config.tokenizer`` and, if set, ``config.reference`` (which must share the policy's
  architecture and tokenizer); the response end token ``rl.eos_id`` must be the tokenizer's
  EOS.
* :class:`PolicySampler` writes, every ``samples.every`` steps and at the end, ``samples.num``
  responses to the prompts of the step just taken, sampled from the current policy with the
  run's temperature under a key stream of its own (``fold_in(key(seed + 7919), step)``, so
  training is unaffected), decoded with the run tokenizer and scored by the run's reward (and
  the synthetic world's gold when there is one), to ``samples.jsonl``
  (:mod:`jaxrm.train.samples`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax

from jaxrm.data import synthetic
from jaxrm.io import policy_io
from jaxrm.io.rundir import ConfigError
from jaxrm.models import sampling
from jaxrm.train import samples as samples_lib


def is_text_policy_source(source: Any) -> bool:
  """Whether ``source`` is a Hugging Face checkpoint folder or an SFT run directory."""
  return isinstance(source, str) and policy_io.policy_kind(source) in ("hf", "run")


def validate_text_policy(c: Any) -> None:
  """Checks ``tokenizer``, ``reference`` and ``samples`` of a policy config (ConfigError)."""
  if not isinstance(c.tokenizer, str) or (
    c.tokenizer and not os.path.isfile(os.path.join(c.tokenizer, "tokenizer.json"))
  ):
    raise ConfigError("tokenizer", c.tokenizer, "must be '' or a folder with tokenizer.json")
  if not isinstance(c.reference, str) or (c.reference and not policy_io.policy_kind(c.reference)):
    raise ConfigError(
      "reference",
      c.reference,
      "must be '' (the starting policy), a preset, a Hugging Face checkpoint folder or an "
      "SFT run directory",
    )
  if c.policy == "synthetic":
    for name in ("tokenizer", "reference"):
      if getattr(c, name):
        raise ConfigError(name, getattr(c, name), "must be '' for the synthetic policy")
  samples_lib.validate_samples_config(c.samples)


class TextPolicy(NamedTuple):
  """The starting policy (:class:`jaxrm.io.policy_io.LoadedPolicy`) and the reference's
  variables."""

  policy: policy_io.LoadedPolicy
  ref_params: Any


def _load(source: str, field: str, *, max_len: int, tokenizer: str, key: jax.Array):
  try:
    return policy_io.load_policy(source, max_len=max_len, tokenizer=tokenizer, key=key)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise ConfigError(field, source, str(e)) from None


def load_text_policy(c: Any, *, max_len: int, key: jax.Array) -> TextPolicy:
  """Loads ``c.policy`` and ``c.reference`` for sequences of ``max_len`` tokens.

  Raises:
    ConfigError: a source that cannot be loaded, a reference of another architecture or
      tokenizer, or an ``rl.eos_id`` other than the tokenizer's EOS.
  """
  policy = _load(c.policy, "policy", max_len=max_len, tokenizer=c.tokenizer, key=key)
  ref_params = policy.variables
  if c.reference:
    ref = _load(c.reference, "reference", max_len=max_len, tokenizer=c.tokenizer, key=key)
    # How either computes (dtypes, remat, query blocks) may differ: an SFT run trained with
    # bfloat16 matmuls keeps the KL to the float32 checkpoint it started from.
    same = ref.config.architecture() == policy.config.architecture()
    if not same or ref.tok.name != policy.tok.name:
      raise ConfigError(
        "reference",
        c.reference,
        "must have the policy's architecture and tokenizer (the KL compares their "
        "token distributions)",
      )
    ref_params = ref.variables
  eos = policy.tok.eos_id
  if c.rl.eos_id is not None and c.rl.eos_id != eos:
    raise ConfigError(
      "rl.eos_id",
      c.rl.eos_id,
      f"the policy's tokenizer ends text with id {eos}; set --config.rl.eos_id={eos}",
    )
  return TextPolicy(policy, ref_params)


class PolicySampler:
  """Writes decoded samples of a :class:`jaxrm.train.policy.Run` (see the module docstring)."""

  def __init__(self, run: Any, workdir: str):
    self.run = run
    c = run.config
    self.writer = samples_lib.SampleWriter(workdir, c.samples)
    self.key = jax.random.key(c.seed + 7919)
    tok = run.text_tokenizer
    self.decode = samples_lib.synthetic_decode if tok is None else tok.decode
    self.gold_fn = None
    if run.world is not None:
      world = synthetic.World(None, run.world.gold_params, run.world.stats)
      self.gold_fn = jax.jit(functools.partial(synthetic.gold_reward, world, c.world))

  def write(self, params: Any, *, step: int) -> list[dict[str, Any]]:
    """Samples, scores, decodes and writes ``samples.num`` responses; returns the rows."""
    run, c = self.run, self.run.config
    batch = run.prompts(step - 1)
    n = min(c.samples.num, batch["prompts"].shape[0])
    out = sampling.sample(
      params,
      batch["prompts"][:n],
      batch["prompt_mask"][:n],
      jax.random.fold_in(self.key, step),
      config=run.policy_config,
      max_new_tokens=c.rl.max_new_tokens,
      temperature=c.rl.temperature,
      eos_id=c.rl.eos_id,
    )
    rewards = run.reward_fn(run.reward_params, out.tokens, out.mask)
    gold = None if self.gold_fn is None else self.gold_fn(out.tokens, out.mask)
    rows = samples_lib.decode_samples(
      jax.device_get(out.tokens),
      jax.device_get(out.mask),
      jax.device_get(out.response_mask),
      self.decode,
    )
    return self.writer.write(
      step,
      rows,
      rewards=jax.device_get(rewards),
      gold=None if gold is None else jax.device_get(gold),
    )
