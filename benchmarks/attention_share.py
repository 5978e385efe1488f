r"""How much of the reward-model training step is attention, and what causal blocking would save.

Times jaxrm's reward-model training step (``jaxrm.train.reward_model.step_fn`` with the
README's HH settings, ``experiments/configs/reward_model.py:hh``) on random full-length batches
with the attention varied (one freshly jitted step per variant):

- ``full``: the library's attention over the whole score matrix (``attention_query_block=None``);
- ``identity``: no attention at all (the output is the query): a lower bound on the step
  without attention, not a model;
- ``blockN``: the library's attention with ``TransformerConfig.attention_query_block=N``:
  query blocks of ``N`` tokens, block ``[s, e)`` attending only keys ``[0, e)`` (the keys no
  later position masks). The same attention; its losses are printed beside the full one's;
- ``<variant>+noguard``: the variant with the non-finite guard
  (``train_state.apply_if_finite``: finiteness checks of the loss, gradients, update, new
  parameters and optimizer state, and a select or a ``lax.cond``) replaced by a plain optax
  update, to measure what the guard costs. The same updates while they are finite; never
  train like this;
- ``<variant>+remat``: the variant's attention under ``jax.checkpoint``: the backward pass
  recomputes the score and probability tensors instead of keeping them from the forward pass.
  The same gradients;
- ``<variant>+autodiff``: the library's attention differentiated by JAX's autodiff (the
  probabilities kept from the forward pass, the softmax's row sums taken over the score
  tensors) instead of its own backward (probabilities recomputed from the saved
  log-sum-exp, row sums from the output): the lever off. The same gradients;
- ``<variant>+microN``: the step over slices of ``N`` pairs (``TrainConfig.microbatch_size``;
  ``micro0``: the whole batch at once) instead of ``--microbatch_size``'s. The same update.

Per variant: first call (compile included), median steady step, pairs/s, the process's
user and system CPU seconds per steady step, and the loss of the first and the last step (the
last one follows ``--rounds`` x ``--reps`` updates). With ``--rounds`` above 1 the variants are
timed in interleaved rounds of ``--reps`` steps each, so that a drift in the machine's speed
reaches them all, and each variant after the first gets its speed-up over the first: the
first's median step over its own, per round (median and range). Commands (figures in
BUILD_NOTES.md)::

  python benchmarks/attention_share.py
  python benchmarks/attention_share.py --variants=block64,block64+noguard --vocab_size=50257 \
    --matmul_dtype=bfloat16 --layers=4 --width=256 --heads=4 --seq_len=128 --batch_pairs=16
  python benchmarks/attention_share.py --variants=block64+micro0,block64+micro4 --rounds=8 \
    --reps=20 --matmul_dtype=bfloat16
"""

import contextlib
import dataclasses
import functools
import os
import resource
import statistics
import sys
import time
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import shapes, timing  # noqa: E402
from jaxrm.models import attention as attention_lib  # noqa: E402
from jaxrm.models import transformer  # noqa: E402
from jaxrm.steps import microbatch, train_state  # noqa: E402

_LAYERS = flags.DEFINE_integer("layers", 2, "Backbone layers (README HH model: 2).")
_WIDTH = flags.DEFINE_integer("width", 64, "Backbone width (README HH model: 64).")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads (README HH model: 2).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per response (README HH run: 256).")
_PAIRS = flags.DEFINE_integer("batch_pairs", 32, "Pairs per step (README HH run: 32).")
_REPS = flags.DEFINE_integer("reps", 8, "Timed steady steps per variant.")
_VOCAB = flags.DEFINE_integer(
  "vocab_size", timing.VOCAB, "Token ids (259: jaxrm's bytes; 50257: GPT-2's tokenizer)."
)
_MATMUL = flags.DEFINE_enum(
  "matmul_dtype",
  "float32",
  ["float32", "bfloat16"],
  "The backbone's matmul dtype (bfloat16: mixed precision, model.matmul_dtype).",
)
_MICRO = flags.DEFINE_integer("microbatch_size", -1, shapes.MICROBATCH_HELP)
_ROUNDS = flags.DEFINE_integer(
  "rounds", 1, "Interleaved rounds of --reps steps per variant (above 1: speed-ups per round)."
)
_VARIANTS = flags.DEFINE_list(
  "variants", ["full", "identity", "block128", "block64", "block32"], "Attention variants."
)


MODIFIERS = ("noguard", "remat", "autodiff", "microN")


class Variant(NamedTuple):
  backbone: transformer.TransformerConfig
  attend: Any  # the attention function to run the backbone with
  guard: bool  # whether the non-finite guard stays
  own_backward: bool  # whether the attention's own backward does
  micro: int  # pairs per microbatch (0: the whole batch)


def variant(name: str, backbone: transformer.TransformerConfig, micro: int) -> Variant:
  """The variant called ``name``; ``micro`` unless a ``microN`` modifier says otherwise."""
  attention, *modifiers = name.split("+")
  for modifier in modifiers:
    size = modifier[5:]
    if modifier.startswith("micro") and size.isdigit():
      micro = int(size)
      if not microbatch.is_valid_size(micro, _PAIRS.value):
        raise app.UsageError(
          f"--variants: {modifier!r} in {name!r} must divide the {_PAIRS.value} of --batch_pairs"
        )
    elif modifier not in MODIFIERS:
      raise app.UsageError(
        f"--variants: unknown modifier {modifier!r} in {name!r} ({', '.join(MODIFIERS)})"
      )
  guard = "noguard" not in modifiers
  attend = attention_lib.attend
  if attention == "identity":
    attend = lambda q, k, v, attn_mask, query_block=None: q  # noqa: E731
  elif attention.startswith("block") and attention[5:].isdigit() and int(attention[5:]) >= 1:
    backbone = dataclasses.replace(backbone, attention_query_block=int(attention[5:]))
  elif attention != "full":
    raise app.UsageError(
      f"--variants: unknown variant {name!r} (full, identity, blockN; +{', +'.join(MODIFIERS)})"
    )
  if "remat" in modifiers:
    attend = rematerialised(attend)
  return Variant(backbone, attend, guard, "autodiff" not in modifiers, micro)


def rematerialised(attend):
  """``attend`` under ``jax.checkpoint`` (``query_block`` stays a Python int)."""

  def remat_attend(q, k, v, attn_mask, query_block=None):
    return jax.checkpoint(functools.partial(attend, query_block=query_block))(q, k, v, attn_mask)

  return remat_attend


def unguarded_update(state, grads, loss, optimizer, *, nonfinite="skip", axis_name=None):
  """``apply_if_finite`` without its checks and select: the plain optax update."""
  del loss, nonfinite, axis_name
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state._replace(step=state.step + 1, params=params, opt_state=opt_state), jnp.array(False)


def autodiff_attention(q, k, v, attn_mask, blocks):
  """The library's attention forward pass, left to JAX's autodiff."""
  return attention_lib._attention_fwd(q, k, v, attn_mask, blocks)[0]  # pylint: disable=protected-access


@contextlib.contextmanager
def patched(attend, guard: bool, own_backward: bool = True):
  # pylint: disable=protected-access
  saved = attention_lib.attend, train_state.apply_if_finite, attention_lib._attention
  attention_lib.attend = attend
  train_state.apply_if_finite = saved[1] if guard else unguarded_update
  attention_lib._attention = saved[2] if own_backward else autodiff_attention
  try:
    yield
  finally:
    attention_lib.attend, train_state.apply_if_finite, attention_lib._attention = saved


def cpu_seconds() -> tuple[float, float]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime


class Timed:
  """One variant's compiled step, state and batches, and what its calls measured."""

  def __init__(self, v: Variant, batches):
    self.variant = v
    with self.patching():
      self.step, self.state = timing.hh_reward_model_step(
        v.backbone, _SEQ.value, microbatch_size=v.micro
      )
      self.batches = [self.step.shard_batch(b) for b in batches]
      start = time.perf_counter()
      self.state, m = self.step(self.state, self.batches[0])
      self.first_loss = float(jax.device_get(m["loss"]))
      self.first_s = time.perf_counter() - start
    self.rounds, self.cpu, self.last_loss = [], [0.0, 0.0], self.first_loss

  def patching(self):
    """The context in which the variant's functions stand in for the library's."""
    v = self.variant
    return patched(v.attend, v.guard, v.own_backward)

  def time_round(self, reps: int) -> None:
    """``reps`` steady steps."""
    times = []
    with self.patching():
      cpu0 = cpu_seconds()
      for i in range(reps):
        start = time.perf_counter()
        self.state, m = self.step(self.state, self.batches[i % len(self.batches)])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
      cpu1 = cpu_seconds()
    self.rounds.append(times)
    self.cpu = [self.cpu[0] + cpu1[0] - cpu0[0], self.cpu[1] + cpu1[1] - cpu0[1]]
    self.last_loss = float(jax.device_get(m["loss"]))

  def row(self, name: str) -> str:
    times = [t for r in self.rounds for t in r]
    step_s, n = statistics.median(times), len(times)
    return (
      f"{name} | {self.first_s:.2f} | {step_s:.4f} | {_PAIRS.value / step_s:.1f} | "
      f"{self.cpu[0] / n:.3f} | {self.cpu[1] / n:.3f} | {self.first_loss:.7f} | "
      f"{self.last_loss:.7f}"
    )


def speedups(first: Timed, other: Timed) -> list[float]:
  """``first``'s median step over ``other``'s, round by round."""
  return [
    statistics.median(a) / statistics.median(b)
    for a, b in zip(first.rounds, other.rounds, strict=True)
  ]


def main(argv):
  del argv
  for flag in (_REPS, _ROUNDS):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1")
  if _VOCAB.value < 4:
    raise app.UsageError(f"--vocab_size must be >= 4 (ids 0..2 are special), got {_VOCAB.value}")
  backbone = transformer.TransformerConfig(
    vocab_size=_VOCAB.value,
    num_layers=_LAYERS.value,
    width=_WIDTH.value,
    num_heads=_HEADS.value,
    max_len=_SEQ.value,
    dtype=jnp.dtype(_MATMUL.value),
  )
  micro = shapes.microbatch_size(_MICRO, _PAIRS.value)
  batches = timing.full_length_pairs(
    pairs=_PAIRS.value, seq_len=_SEQ.value, count=3, vocab_size=_VOCAB.value
  )
  print(
    f"device: {jax.devices()[0].platform} | RM step {_LAYERS.value}x{_WIDTH.value} "
    f"({_HEADS.value} heads), {_PAIRS.value} pairs x {_SEQ.value} tokens, microbatches of "
    f"{micro or _PAIRS.value} | median of {_ROUNDS.value} x {_REPS.value} steps | vocabulary "
    f"{_VOCAB.value:,}"
  )
  variants = {name: variant(name, backbone, micro) for name in _VARIANTS.value}
  timed = {name: Timed(v, batches) for name, v in variants.items()}
  for _ in range(_ROUNDS.value):
    for t in timed.values():
      t.time_round(_REPS.value)
  print(
    "variant | first call s | step s | pairs/s | user s/step | sys s/step | first loss | last loss"
  )
  for name, t in timed.items():
    print(t.row(name), flush=True)
  (first_name, first), *others = timed.items()
  if _ROUNDS.value > 1:
    for name, t in others:
      ratios = speedups(first, t)
      print(
        f"{name} over {first_name}: {statistics.median(ratios):.3f}x per round "
        f"(rounds {min(ratios):.3f}-{max(ratios):.3f})"
      )


if __name__ == "__main__":
  app.run(main)
