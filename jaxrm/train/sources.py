"""Reward and prompt sources of the policy loop (:mod:`jaxrm.train.policy`).

Rewards (:class:`RewardConfig`, :func:`make_reward`), each a pure
``reward_fn(params, tokens [b, s], mask [b, s]) -> [b]`` with its ``params``:

* ``'rm'``: a reward-model run directory (:func:`jaxrm.io.rm_io.load_reward_model`); several
  directories make an ensemble (:func:`jaxrm.io.rm_io.load_reward_ensemble`) combined by an
  objective of :func:`jaxrm.math.objectives.ensemble_objective` (mean, worst case,
  uncertainty-weighted);
* ``'token_frequency'``: the fraction of response tokens equal to ``token_id``
  (:func:`jaxrm.steps.rollout.token_frequency`), a rule-based reward;
* ``'synthetic_gold'``: the gold reward of the synthetic world
  (:func:`jaxrm.data.synthetic.gold_reward`).

Diagnostics (:func:`make_reward_source`): logged-only per-sequence quantities next to the
reward, ``diagnostics_fn(reward_params, diagnostics_params, tokens, mask) -> {name: [b]}``:

* ``gold``: the synthetic world's gold reward, whenever the policy is the synthetic world's
  (so gold is logged next to a proxy's ``score`` in any run, and over-optimisation shows);
* ``ensemble_std``: for an ensemble of reward models, the standard deviation of the members'
  raw rewards (population, before any normalisation) of each sequence (member disagreement).

Prompts (:class:`PromptConfig`, :func:`make_prompts`): a deterministic function
``step -> {'prompts' [b, p], 'prompt_mask' [b, p]}`` (so a resumed run sees the prompts of an
uninterrupted one): the synthetic world's prompts, the prompts of JSONL preference files
(left-padded, BOS first, a new permutation per pass) or BOS-only prompts.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.data import synthetic, tokenizer
from jaxrm.io import rm_io
from jaxrm.io.rundir import ConfigError
from jaxrm.math import objectives
from jaxrm.models import ensemble as ensemble_lib
from jaxrm.steps import rollout as rollout_lib

REWARD_SOURCES = ("rm", "token_frequency", "synthetic_gold")
PROMPT_SOURCES = ("synthetic", "jsonl", "bos")


@dataclasses.dataclass
class RewardConfig:
  """What the policy is optimised against.

  Attributes:
    source: ``'rm'``, ``'token_frequency'`` or ``'synthetic_gold'``.
    rm_dirs: reward-model run directories (``source='rm'``); several make an ensemble.
    rm_checkpoint: which checkpoint of each run (:data:`jaxrm.io.rm_io.WHICH`).
    ensemble_objective: how an ensemble's member rewards are combined
      (:data:`jaxrm.math.objectives.OBJECTIVES`).
    uncertainty_coef: ``lambda`` of ``mean - lambda * var`` (``uncertainty_weighted``).
    token_id: the rewarded token (``source='token_frequency'``).
  """

  source: str = "synthetic_gold"
  rm_dirs: tuple[str, ...] = ()
  rm_checkpoint: str = "latest"
  ensemble_objective: str = "mean"
  uncertainty_coef: float = 0.5
  token_id: int = 3


@dataclasses.dataclass
class PromptConfig:
  """Where the prompts come from.

  Attributes:
    source: ``'synthetic'`` (the world's prompts; synthetic policy), ``'jsonl'`` (the prompts
      of JSONL preference ``files``, encoded with the policy's tokenizer) or ``'bos'`` (BOS
      only).
    files: JSONL(.gz) preference files (``source='jsonl'``).
    prompt_len: prompt tokens of byte-level prompts (the world fixes its own).
  """

  source: str = "synthetic"
  files: tuple[str, ...] = ()
  prompt_len: int = 64


def validate_reward_config(c: RewardConfig, *, prefix: str = "reward") -> None:
  """Raises :class:`ConfigError` naming the first bad field (``reward.rm_dirs``, ...)."""

  def need(ok, name, message):
    if not ok:
      raise ConfigError(f"{prefix}.{name}", getattr(c, name), message)

  need(c.source in REWARD_SOURCES, "source", f"must be one of {list(REWARD_SOURCES)}")
  if c.source == "rm":
    need(len(c.rm_dirs) > 0, "rm_dirs", "must name at least one reward-model run directory")
    for d in c.rm_dirs:
      need(
        os.path.isdir(os.path.join(d, rm_io.CHECKPOINT_DIR)),
        "rm_dirs",
        f"{d} is not a reward-model run directory (no {rm_io.CHECKPOINT_DIR}/ in it)",
      )
      ckpt_dir = os.path.join(d, rm_io.CHECKPOINT_DIR)
      need(
        any(n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir)),
        "rm_dirs",
        f"{d} holds no saved checkpoint yet (its {rm_io.CHECKPOINT_DIR}/ is empty); train it first",
      )
  need(c.rm_checkpoint in rm_io.WHICH, "rm_checkpoint", f"must be one of {list(rm_io.WHICH)}")
  need(
    c.ensemble_objective in objectives.OBJECTIVES,
    "ensemble_objective",
    f"must be one of {list(objectives.OBJECTIVES)}",
  )
  need(c.uncertainty_coef >= 0, "uncertainty_coef", "must be >= 0")
  need(isinstance(c.token_id, int) and c.token_id >= 0, "token_id", "must be an int >= 0")


class RewardSource(NamedTuple):
  """A reward with its logged-only diagnostics (:func:`make_reward_source`).

  Attributes:
    fn: ``fn(params, tokens [b, s], mask [b, s]) -> [b]``, the reward optimised.
    params: its parameters.
    diagnostics_fn: ``diagnostics_fn(params, diagnostics_params, tokens, mask) -> {name:
      [b]}`` (module docstring), or None.
    diagnostics_params: the diagnostics' own parameters (the gold model), or None.
  """

  fn: Callable[..., jax.Array]
  params: Any
  diagnostics_fn: Callable[..., dict[str, jax.Array]] | None = None
  diagnostics_params: Any = None

  def for_step(self) -> tuple[Callable[..., jax.Array], Callable[..., Any] | None, Any]:
    """``(reward_fn, diagnostics_fn, params)`` for the RL steps (:mod:`jaxrm.steps.rl`), both
    functions of the one pytree ``params = (self.params, self.diagnostics_params)``."""
    fn, diag = self.fn, self.diagnostics_fn
    reward_fn = lambda p, tokens, mask: fn(p[0], tokens, mask)
    diagnostics_fn = None
    if diag is not None:
      diagnostics_fn = lambda p, tokens, mask: diag(p[0], p[1], tokens, mask)
    return reward_fn, diagnostics_fn, (self.params, self.diagnostics_params)


def make_reward(
  c: RewardConfig,
  **kwargs: Any,
) -> tuple[Callable[..., jax.Array], Any]:
  """``(reward_fn, reward_params)`` of a reward source (:func:`make_reward_source`'s ``fn``
  and ``params``; same arguments)."""
  source = make_reward_source(c, **kwargs)
  return source.fn, source.params


def _gold_fn(world_cfg: synthetic.WorldConfig) -> Callable[..., jax.Array]:
  def gold(params, tokens, mask):
    gold_params, stats = params
    return synthetic.gold_reward(synthetic.World(None, gold_params, stats), world_cfg, tokens, mask)

  return gold


def make_reward_source(
  c: RewardConfig,
  *,
  tokenizer_name: str,
  vocab_size: int,
  seq_len: int,
  prompt_len: int,
  world: synthetic.World | None = None,
  world_cfg: synthetic.WorldConfig | None = None,
  prefix: str = "reward",
) -> RewardSource:
  """The :class:`RewardSource` of a reward config for a policy's sequences: the reward and
  its diagnostics (``gold`` whenever ``world`` is given, ``ensemble_std`` for ensembles).

  Args:
    c: the source.
    tokenizer_name: the policy's tokenizer (``'synthetic'`` or ``'byte'``); a reward model
      must use the same.
    vocab_size, seq_len, prompt_len: the policy's vocabulary, sequence and prompt lengths.
    world, world_cfg: the synthetic world (``synthetic_gold`` needs them; with them every
      source also logs ``gold``).
    prefix: the config path of ``c`` in errors.

  Raises:
    ConfigError: a reward that cannot score the policy's sequences, naming the field.
  """
  fn, params, members = _reward(
    c,
    tokenizer_name=tokenizer_name,
    vocab_size=vocab_size,
    seq_len=seq_len,
    prompt_len=prompt_len,
    world=world,
    world_cfg=world_cfg,
    prefix=prefix,
  )
  gold = None if world is None else _gold_fn(world_cfg)
  if gold is None and members is None:
    return RewardSource(fn, params)

  def diagnostics(reward_params, diagnostics_params, tokens, mask):
    out = {}
    if gold is not None:
      out["gold"] = gold(diagnostics_params, tokens, mask)
    if members is not None:
      out["ensemble_std"] = jnp.std(members(reward_params, tokens, mask), axis=0)
    return out

  diagnostics_params = None if world is None else (world.gold_params, world.stats)
  return RewardSource(fn, params, diagnostics, diagnostics_params)


def _reward(c, *, tokenizer_name, vocab_size, seq_len, prompt_len, world, world_cfg, prefix):
  """``(reward_fn, reward_params, members_fn or None)``; ``members_fn(params, tokens, mask)
  -> [members, b]`` for an ensemble."""
  if c.source == "token_frequency":
    if c.token_id >= vocab_size:
      raise ConfigError(
        f"{prefix}.token_id",
        c.token_id,
        f"is outside the policy's vocabulary [0, {vocab_size})",
      )
    fn = functools.partial(rollout_lib.token_frequency, token_id=c.token_id, prompt_len=prompt_len)
    return (lambda params, tokens, mask: fn(tokens, mask)), None, None
  if c.source == "synthetic_gold":
    if world is None:
      raise ConfigError(f"{prefix}.source", c.source, "synthetic_gold needs the synthetic policy")
    return _gold_fn(world_cfg), (world.gold_params, world.stats), None
  field = f"{prefix}.rm_dirs"
  kw = {"which": c.rm_checkpoint}
  extra = rm_io.read_extra(c.rm_dirs[0], **kw)
  model_cfg = rm_io.config_from_json(extra["model_config"])
  if extra.get("tokenizer") != tokenizer_name:
    raise ConfigError(
      field,
      c.rm_dirs,
      f"the reward model uses the {extra.get('tokenizer')!r} tokenizer, "
      f"the policy {tokenizer_name!r}",
    )
  if model_cfg.vocab_size != vocab_size or model_cfg.max_len < seq_len:
    raise ConfigError(
      field,
      c.rm_dirs,
      f"the reward model (vocab {model_cfg.vocab_size}, max_len {model_cfg.max_len}) cannot "
      f"score the policy's sequences (vocab {vocab_size}, length {seq_len})",
    )
  if len(c.rm_dirs) == 1:
    apply_fn, params, _ = rm_io.load_reward_model(c.rm_dirs[0], **kw)
    return (lambda p, tokens, mask: apply_fn(p, tokens, mask)), params, None
  try:
    apply_fn, stacked = rm_io.load_reward_ensemble(list(c.rm_dirs), **kw)
  except ValueError as e:
    raise ConfigError(field, c.rm_dirs, str(e)) from None
  hyper = {"coef": c.uncertainty_coef} if c.ensemble_objective == "uncertainty_weighted" else {}
  objective = objectives.ensemble_objective(c.ensemble_objective, **hyper)
  members = lambda p, tokens, mask: ensemble_lib.apply_ensemble(apply_fn, p, tokens, mask)
  return (lambda p, tokens, mask: objective(members(p, tokens, mask))), stacked, members


def read_prompt_texts(paths: tuple[str, ...], *, field: str = "prompts.files") -> list[str]:
  """The prompts of JSONL preference files (a bad line: :class:`ConfigError` naming file:line)."""
  from jaxrm.data import preference_files, preferences  # pylint: disable=import-outside-toplevel

  texts = []
  for path in paths:
    if not os.path.isfile(path):
      raise ConfigError(field, path, f"no such file: {path}")
    try:
      for line_no, raw in preference_files.iter_lines(path):
        if not raw.strip():
          continue
        try:
          texts.append(preferences.parse_preference_line(raw).prompt)
        except preferences.PreferenceDataError as e:
          raise ConfigError(field, path, str(e.with_location(path, line_no))) from None
    except preferences.PreferenceDataError as e:  # the file itself (not gzip, truncated)
      raise ConfigError(field, path, str(e)) from None
  if not texts:
    raise ConfigError(field, ",".join(paths), "no prompts in the files")
  return texts


def make_prompts(
  c: PromptConfig,
  key: jax.Array,
  *,
  batch_size: int,
  seed: int,
  world_cfg: synthetic.WorldConfig | None = None,
  tok: Any = None,
  distinct_field: str | None = None,
) -> Callable[[int], dict[str, np.ndarray]]:
  """A deterministic function ``step -> {'prompts', 'prompt_mask'}`` (resuming is exact).

  Args:
    c: the source.
    key: the key of the synthetic prompts (``fold_in(key, step)`` per step).
    batch_size: prompts per step.
    seed: the seed of the file prompts' order (one permutation per pass).
    world_cfg: the synthetic world (``source='synthetic'``).
    tok: the policy's :class:`jaxrm.data.run_tokenizer.RunTokenizer` (``'jsonl'``, ``'bos'``);
      None: the byte tokenizer.
    distinct_field: the config field that sets ``batch_size``; when given, a batch must not
      repeat a file prompt, and a ``batch_size`` above the files' prompts is a
      :class:`ConfigError` naming that field (a repeat would overstate a sample).
  """
  b = batch_size
  if c.source == "synthetic":
    sample = jax.jit(synthetic.sample_prompts, static_argnums=(0, 2))

    def synthetic_prompts(step):
      prompts = np.asarray(sample(world_cfg, jax.random.fold_in(key, step), b))
      return {"prompts": prompts, "prompt_mask": np.ones(prompts.shape, bool)}

    return synthetic_prompts
  if c.source == "bos":
    bos = tokenizer.BOS_ID if tok is None else tok.bos_id
    if bos is None:
      raise ConfigError("prompts.source", c.source, "the policy's tokenizer has no BOS token")
    ones = np.full((b, c.prompt_len), bos, np.int32)
    return lambda step: {"prompts": ones, "prompt_mask": np.ones(ones.shape, bool)}
  encoder = tokenizer.ByteTokenizer() if tok is None else tok.tok
  enc = encoder.batch_encode(
    read_prompt_texts(tuple(c.files)),
    max_len=c.prompt_len,
    truncation_side="left",
    padding_side="left",
    add_bos=True if tok is None else tok.add_bos,
  )
  n = enc.tokens.shape[0]
  if distinct_field is not None and b > n:
    raise ConfigError(distinct_field, b, f"exceeds the {n} prompts of prompts.files")
  logging.info(
    "%d prompts from %s (%d truncated to %d tokens)",
    n,
    ",".join(c.files),
    enc.num_truncated,
    c.prompt_len,
  )

  def file_prompts(step):
    """Prompts ``step * b .. step * b + b - 1`` of a new permutation per pass (epoch)."""
    positions = step * b + np.arange(b)
    epochs, offsets = positions // n, positions % n
    perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(epochs)}
    idx = np.array([perms[e][o] for e, o in zip(epochs, offsets)])
    return {"prompts": enc.tokens[idx], "prompt_mask": enc.mask[idx]}

  return file_prompts
