"""Supervised fine-tuning loop: demonstrations in; a starting policy for RL and best-of-n out.

:func:`train_and_evaluate` fine-tunes a policy (:func:`jaxrm.io.policy_io.load_policy`: a
preset, a local Hugging Face checkpoint with its tokenizer, or a previous SFT run) on
demonstration JSONL files or the chosen side of preference files
(:mod:`jaxrm.data.demonstrations`), with the loss on response tokens only
(:func:`jaxrm.steps.sft.sft_step`, launched by :func:`jaxrm.steps.parallel.make_parallel_step`).

Sequences are ``[BOS] + prompt + response + [EOS]`` under the run tokenizer's convention
(:func:`jaxrm.data.tokenizer.encode_prompt_response`: the prompt keeps its end, at most
``data.max_prompt_len`` tokens; the response its beginning), right-padded to ``data.max_len``.
The tokenised demonstrations are held in memory.

Everything about a run lives under ``workdir`` (:mod:`jaxrm.io.rundir`):

* ``config.json``; ``tokenizer/`` (the run tokenizer, :mod:`jaxrm.data.run_tokenizer`);
* ``metrics.jsonl``: ``{"split": "train", ...}`` every ``log.log_every`` steps (means of loss,
  perplexity and gradient norm since the last row, response tokens, learning rate,
  sequences/s, ETA) and ``{"split": "eval", ...}`` (held-out loss and perplexity per response
  token) every ``eval_every`` steps and at the end;
* ``checkpoints/<step>``: the :class:`jaxrm.steps.train_state.TrainState`; the JSON extra holds
  ``config``, ``metrics``, ``kind='policy'``, ``model_config``, ``tokenizer`` (its name) and
  ``hf`` (the Hugging Face family and ``config.json`` the policy descends from, or null), so
  the run is itself a policy source (``policy=<workdir>``) and exports to ``*ForCausalLM``
  (:func:`jaxrm.io.hf_runs.export_policy_run`).

Batches: step ``s`` takes positions ``s*b .. s*b+b-1`` of a sequence of permutations of the
training demonstrations (one per epoch, seeded by ``(seed, epoch)``), so the batch of a step is
a function of the step alone and a resumed run ends bitwise equal to an uninterrupted one
(same machine and mode). Only ``eval_every``, ``log``, ``parallel``, ``microbatch_size`` and
``nonfinite`` may change on resume (:data:`CHANGEABLE_ON_RESUME`; ``steps`` sets the
learning-rate schedule).

Example::

  config = SFTConfig(policy="tests/data/hf/llama", tokenizer="tests/data/hf/tokenizer",
                     data=SFTDataConfig(files=("hh.jsonl.gz",), max_len=64), steps=100)
  summary = train_and_evaluate(config, "runs/sft")
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from jaxrm.data import demonstrations, pairs
from jaxrm.data.tokenizer import encode_prompt_response
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import policy_io, rm_io, rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.models.policy import PolicyModel
from jaxrm.steps import parallel, sft
from jaxrm.steps import train_state as train_state_lib
from jaxrm.train import rm_eval
from jaxrm.train.rm_config import DTYPES, OptimizerConfig, make_optimizer

PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap", "fsdp")
CHANGEABLE_ON_RESUME = ("eval_every", "log", "parallel", "microbatch_size", "nonfinite")
# Fields added after runs were saved without them, with the value those runs computed with
# (:func:`jaxrm.io.rundir.check_resumable`).
ADDED_ON_RESUME = {"matmul_dtype": ""}


@dataclasses.dataclass
class SFTDataConfig:
  """The demonstrations.

  Attributes:
    files: JSONL(.gz) demonstration or preference files (:mod:`jaxrm.data.demonstrations`).
    test_fraction: share of the lines held out (seeded hash of each line), in ``[0, 1)``.
    split_seed: the hash's seed.
    max_len: tokens per sequence (BOS and EOS included).
    max_prompt_len: prompt token budget (BOS included); 0: ``max_len // 2``.
  """

  files: tuple[str, ...] = ()
  test_fraction: float = 0.1
  split_seed: int = 0
  max_len: int = 256
  max_prompt_len: int = 0


@dataclasses.dataclass
class SFTConfig:
  """Every setting of an SFT run.

  Attributes:
    policy: the starting policy: a preset, a Hugging Face checkpoint folder or an SFT run
      directory (:func:`jaxrm.io.policy_io.load_policy`).
    tokenizer: a folder with ``tokenizer.json``; '' : the checkpoint's own (or the byte
      tokenizer for a preset).
    data: the demonstrations.
    optimizer: AdamW, warm-up and cosine decay (:func:`jaxrm.train.rm_config.make_optimizer`).
    steps: optimizer steps.
    batch_size: sequences per step (global).
    microbatch_size: sequences per microbatch on each device (0: the whole batch at once):
      the step runs forward and backward over slices of this many sequences one after
      another and sums their gradients (:func:`jaxrm.steps.sft.sft_step`), the same update up
      to float rounding with one slice's activations at a time (gradient accumulation). Must
      divide the sequences each device's step gets (``fsdp`` and ``jit``: the whole batch),
      or be at least that many.
    eval_every: held-out evaluation period in steps (also at the end).
    seed: seed of the data order, the step keys and a preset's initialisation.
    parallel: ``'auto'``, ``'jit'``, ``'shard_map'``, ``'pmap'`` or ``'fsdp'``.
    nonfinite: ``'skip'`` a step with a non-finite loss or gradient, or ``'raise'``.
    log: metrics rows, checkpoints, plots, TensorBoard / W&B.
    dtype: ``'float32'`` or ``'bfloat16'`` parameters and matmuls of a preset or checkpoint.
    matmul_dtype: ``''`` (matmuls in ``dtype``) or ``'bfloat16'`` with float32 parameters:
      mixed precision, the projections on bfloat16 operands with float32 sums, forward and
      backward (:mod:`jaxrm.models.precision`), parameters and optimizer state in float32
      (the reward-model runs' ``model.matmul_dtype``). The run's policy keeps the setting
      (RL and best-of-n from it compute the same way).
    remat: rematerialise block activations in the backward pass.
  """

  policy: str = "tiny"
  tokenizer: str = ""
  data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
  optimizer: OptimizerConfig = dataclasses.field(
    default_factory=lambda: OptimizerConfig(learning_rate=1e-4, warmup_steps=10)
  )
  steps: int = 200
  batch_size: int = 16
  microbatch_size: int = 0
  eval_every: int = 50
  seed: int = 0
  parallel: str = "auto"
  nonfinite: str = "skip"
  log: rundir.LogConfig = dataclasses.field(default_factory=rundir.LogConfig)
  dtype: str = "float32"
  matmul_dtype: str = ""
  remat: bool = False

  def to_json(self) -> dict[str, Any]:
    return rundir.config_to_json(self)


def validate_config(c: SFTConfig, *, num_devices: int | None = None) -> None:
  """Raises :class:`ConfigError` naming the first bad setting by its dotted path."""
  need = functools.partial(rundir.check, c)
  need(
    isinstance(c.policy, str) and bool(policy_io.policy_kind(c.policy)),
    "policy",
    "must be a preset, a Hugging Face checkpoint folder (config.json) or an SFT run directory",
  )
  need(
    not c.tokenizer or os.path.isfile(os.path.join(c.tokenizer, "tokenizer.json")),
    "tokenizer",
    "must be '' or a folder with tokenizer.json",
  )
  d = c.data
  need(len(d.files) > 0, "data.files", "must name at least one JSONL file")
  for path in d.files:
    need(os.path.isfile(path), "data.files", f"file not found: {path}")
  need(len(set(d.files)) == len(d.files), "data.files", "must not repeat a data file")
  need(0 <= d.test_fraction < 1, "data.test_fraction", "must be in [0, 1)")
  need(rundir.is_int(d.split_seed) and d.split_seed >= 0, "data.split_seed", "must be an int >= 0")
  need(
    rundir.is_int(d.max_len) and 8 <= d.max_len <= pairs.MAX_LEN_LIMIT,
    "data.max_len",
    f"must be an int in [8, {pairs.MAX_LEN_LIMIT}] (tokens per sequence and the model's positions)",
  )
  need(
    rundir.is_int(d.max_prompt_len) and 0 <= d.max_prompt_len < d.max_len - 1,
    "data.max_prompt_len",
    "must be an int in [0, data.max_len - 1) (0: max_len // 2)",
  )
  o = c.optimizer
  need(o.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
  need(
    rundir.is_int(o.warmup_steps) and o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0"
  )
  need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  need(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0: none)")
  for name in ("steps", "batch_size", "eval_every"):
    need(rundir.is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "must be an int >= 1")
  need(rundir.is_int(c.seed) and c.seed >= 0, "seed", "must be an int >= 0")
  need(c.parallel in PARALLEL_MODES, "parallel", f"must be one of {list(PARALLEL_MODES)}")
  need(
    c.nonfinite in train_state_lib.NONFINITE_MODES,
    "nonfinite",
    f"must be one of {list(train_state_lib.NONFINITE_MODES)}",
  )
  rundir.validate_log_config(c.log)
  need(c.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}")
  need(
    c.matmul_dtype in ("", *DTYPES),
    "matmul_dtype",
    f"must be '' (dtype) or one of {list(DTYPES)}",
  )
  need(isinstance(c.remat, bool), "remat", "must be True or False")
  n = jax.device_count() if num_devices is None else num_devices
  mode = c.parallel if c.parallel != "auto" else ("shard_map" if n > 1 else "jit")
  if mode != "jit":
    need(c.batch_size % n == 0, "batch_size", f"must be divisible by the {n} devices of {mode}")
  rundir.check_microbatch_size(c, devices=n, mode=mode, unit="sequences")


def _resolve(c: SFTConfig) -> SFTConfig:
  data = dataclasses.replace(c.data, files=tuple(os.path.abspath(p) for p in c.data.files))
  policy = c.policy if policy_io.policy_kind(c.policy) == "preset" else os.path.abspath(c.policy)
  tok = os.path.abspath(c.tokenizer) if c.tokenizer else ""
  return dataclasses.replace(c, data=data, policy=policy, tokenizer=tok)


def encode_demonstrations(
  demos: list[demonstrations.Demonstration], tok: Any, data: SFTDataConfig
) -> dict[str, np.ndarray]:
  """``tokens``, ``mask``, ``response_mask`` ``[n, max_len]`` of demonstrations."""
  enc = encode_prompt_response(
    tok.tok,
    [d.prompt for d in demos],
    [d.response for d in demos],
    max_len=data.max_len,
    max_prompt_len=data.max_prompt_len or None,
    add_bos=tok.add_bos,
    add_eos=tok.add_eos,
  )
  return {"tokens": enc.tokens, "mask": enc.mask, "response_mask": enc.response_mask}


def batch_indices(step: int, *, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of step ``step``'s batch: a new permutation of ``n`` per epoch."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = positions // n, positions % n
  perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(epochs.tolist())}
  return np.array([perms[e][o] for e, o in zip(epochs.tolist(), offsets.tolist())])


@functools.lru_cache(maxsize=4)
def _nll_fn(config):
  model = PolicyModel(config)

  def fn(params, batch):
    logits, _ = model.apply(params, batch["tokens"], batch["mask"])
    return sft.response_nll(logits, batch["tokens"], batch["response_mask"])

  return jax.jit(fn)


def heldout_loss(config, params, arrays: dict[str, np.ndarray], *, batch_size: int) -> dict:
  """Mean NLL per response token over ``arrays`` (and its perplexity)."""
  fn = _nll_fn(config)
  total, count = 0.0, 0.0
  n = arrays["tokens"].shape[0]
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # a full last batch: one compiled shape
    real = min(batch_size, n - start)
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["response_mask"] = batch["response_mask"] & (np.arange(batch_size) < real)[:, None]
    nll, cnt = jax.device_get(fn(params, batch))
    total, count = total + float(nll), count + float(cnt)
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)), "num_tokens": int(count)}


def train_and_evaluate(config: SFTConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Fine-tunes (or resumes) a policy; see the module docstring.

  Returns:
    ``{'workdir', 'step', 'resumed_from', 'train' (last row), 'eval' (last held-out
    metrics), 'sequences_per_sec'}``.

  Raises:
    ConfigError: a bad setting, naming it.
    jaxrm.data.PreferenceDataError: a malformed data line (file, line, field).
  """
  validate_config(config)
  c = _resolve(config)
  workdir = rundir.prepare(workdir)
  max_len = c.data.max_len
  root = jax.random.key(c.seed)
  try:
    policy = policy_io.load_policy(
      c.policy,
      max_len=max_len,
      tokenizer=c.tokenizer,
      key=jax.random.fold_in(root, 0),
      dtype=DTYPES[c.dtype],
      remat=c.remat,
      matmul_dtype=DTYPES.get(c.matmul_dtype),
    )
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise ConfigError("policy", c.policy, str(e)) from None
  try:
    policy.tok.save(workdir)
  except ValueError as e:
    raise ConfigError("tokenizer", c.tokenizer, str(e)) from None
  demos = demonstrations.read_demonstrations(
    c.data.files, test_fraction=c.data.test_fraction, split_seed=c.data.split_seed
  )
  train = encode_demonstrations(demos["train"], policy.tok, c.data)
  test = encode_demonstrations(demos["test"], policy.tok, c.data) if demos["test"] else None
  n = train["tokens"].shape[0]
  if n < c.batch_size:
    raise ConfigError("batch_size", c.batch_size, f"exceeds the {n} training demonstrations")
  model = PolicyModel(policy.config)
  optimizer, schedule = make_optimizer(c)
  host_state = train_state_lib.create_train_state(
    policy.variables, optimizer, jax.random.fold_in(root, 1)
  )
  description = {
    "kind": "policy",
    "model_config": rm_io.config_to_json(policy.config),
    "tokenizer": policy.tok.name,
    "hf": policy.hf,
    "policy_source": policy.kind,
  }
  step_fn = functools.partial(
    sft.sft_step,
    apply_fn=model.apply,
    optimizer=optimizer,
    nonfinite=c.nonfinite,
    microbatch_size=c.microbatch_size or None,
  )
  log = c.log
  with checkpoint_lib.CheckpointManager(
    os.path.join(workdir, rundir.CHECKPOINT_DIR), max_to_keep=log.keep_checkpoints
  ) as ckpt:
    peek = ckpt.latest_extra()  # the resume rule before any array is restored (another
    if peek is not None:  # policy's checkpoint would fail inside orbax's restore)
      rundir.check_resumable(
        peek[0].get("config", {}),
        c.to_json(),
        changeable=CHANGEABLE_ON_RESUME,
        added=ADDED_ON_RESUME,
        workdir=workdir,
      )
    restored = ckpt.restore_latest(template=host_state)
    start, last_eval = 0, None
    if restored is not None:
      host_state, extra, start = restored
      rundir.check_resumable(
        extra.get("config", {}),
        c.to_json(),
        changeable=CHANGEABLE_ON_RESUME,
        added=ADDED_ON_RESUME,
        workdir=workdir,
      )
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    rundir.truncate_metrics(os.path.join(workdir, rundir.METRICS_FILE), max_step=start)
    rundir.write_config(workdir, c, **description)
    pstep = parallel.make_parallel_step(step_fn, mode=c.parallel)
    state = pstep.put_state(host_state)
    del host_state
    logging.info(
      "SFT of %s (%s policy, tokenizer %s) for %d steps on %d demonstrations (%d held out), "
      "batch %d, mode %s; workdir %s",
      c.policy,
      policy.kind,
      policy.tok.name,
      c.steps,
      n,
      0 if test is None else test["tokens"].shape[0],
      c.batch_size,
      pstep.mode,
      workdir,
    )
    progress = rundir.Progress(c.steps, items_per_step=c.batch_size)
    step, last_row, pending = start, None, []
    with rundir.MetricsWriter(workdir, log=log, config=c) as writer:
      while step < c.steps:
        idx = batch_indices(step, n=n, batch_size=c.batch_size, seed=c.seed)
        state, metrics = pstep(state, pstep.shard_batch({k: v[idx] for k, v in train.items()}))
        step += 1
        pending.append(metrics)
        if step == start + 1:
          jax.block_until_ready(metrics)
          progress.start(step)
        if c.nonfinite == "raise":
          train_state_lib.raise_if_nonfinite(pstep.unreplicate(metrics), step=step - 1)
        if step % log.log_every == 0 or step == c.steps:
          rows = jax.device_get([pstep.unreplicate(m) for m in pending])
          mean = lambda k, rows=rows: float(np.mean([float(r[k]) for r in rows]))
          last_row = {
            "split": "train",
            "step": step,
            "loss": mean("loss"),
            "perplexity": mean("perplexity"),
            "grad_norm": mean("grad_norm"),
            "num_tokens": mean("num_tokens"),
            "nonfinite_steps": int(sum(bool(r["nonfinite"]) for r in rows)),
            "num_skipped": int(rows[-1]["num_skipped"]),
            "learning_rate": float(schedule(step - 1)),
            "sequences_per_sec": progress.items_per_sec(step),
            "eta_sec": progress.eta(step),
          }
          writer.write(last_row)
          logging.info("%s", progress.line(step, {"loss": last_row["loss"]}, unit="sequences"))
          pending = []
        checkpoint_now = step % log.checkpoint_every == 0 or step == c.steps
        if test is not None and (step % c.eval_every == 0 or step == c.steps):
          t0 = time.perf_counter()
          params = pstep.unreplicate(state).params
          last_eval = heldout_loss(policy.config, params, test, batch_size=c.batch_size)
          writer.write({"split": "eval", "step": step, **last_eval})
          logging.info(
            "eval at step %d | loss %.4f | perplexity %.3f | %d response tokens",
            step,
            last_eval["loss"],
            last_eval["perplexity"],
            last_eval["num_tokens"],
          )
          progress.exclude(time.perf_counter() - t0)
        if checkpoint_now:
          t0 = time.perf_counter()
          saved = {"step": step}
          if last_row is not None:
            saved["train_loss"] = last_row["loss"]
          if last_eval is not None:
            saved.update({f"eval_{k}": v for k, v in last_eval.items()})
          host = rm_eval.to_host(pstep.unreplicate(state))
          ckpt.save(step, host, rundir.checkpoint_extra(c, metrics=saved, **description))
          progress.exclude(time.perf_counter() - t0)
  return {
    "workdir": workdir,
    "step": step,
    "resumed_from": start if restored is not None else None,
    "train": last_row,
    "eval": last_eval,
    "sequences_per_sec": progress.items_per_sec(step),
  }
