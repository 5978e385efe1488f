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
  log-sum-exp, row sums from the output): the lever off. The same gradients.

Per variant: first call (compile included), median steady step, pairs/s, the process's
user and system CPU seconds per steady step, and the loss of the first and the last step (the
last one follows ``--reps`` updates). Command (figures in BUILD_NOTES.md)::

  python benchmarks/attention_share.py
  python benchmarks/attention_share.py --variants=block64,block64+noguard --vocab_size=50257 \
    --matmul_dtype=bfloat16 --layers=4 --width=256 --heads=4 --seq_len=128 --batch_pairs=16
"""

import contextlib
import dataclasses
import functools
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import timing  # noqa: E402
from jaxrm.models import attention as attention_lib  # noqa: E402
from jaxrm.models import transformer  # noqa: E402
from jaxrm.steps import train_state  # noqa: E402

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
_VARIANTS = flags.DEFINE_list(
  "variants", ["full", "identity", "block128", "block64", "block32"], "Attention variants."
)


MODIFIERS = ("noguard", "remat", "autodiff")


def variant(name: str, backbone: transformer.TransformerConfig):
  """The variant's backbone, the attention function to run it with, whether the non-finite
  guard stays and whether the attention's own backward does."""
  attention, *modifiers = name.split("+")
  for modifier in modifiers:
    if modifier not in MODIFIERS:
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
  return backbone, attend, guard, "autodiff" not in modifiers


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


def time_variant(attend, guard, batches, backbone, own_backward: bool = True) -> dict:
  with patched(attend, guard, own_backward):
    step, state = timing.hh_reward_model_step(backbone, _SEQ.value)
    batches = [step.shard_batch(b) for b in batches]
    start = time.perf_counter()
    state, m = step(state, batches[0])
    first_loss = float(jax.device_get(m["loss"]))
    first_s = time.perf_counter() - start
    times = []
    cpu0 = cpu_seconds()
    for i in range(_REPS.value):
      start = time.perf_counter()
      state, m = step(state, batches[i % len(batches)])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
    cpu1 = cpu_seconds()
  n = _REPS.value
  return {
    "first_s": first_s,
    "step_s": statistics.median(times),
    "user_s": (cpu1[0] - cpu0[0]) / n,
    "sys_s": (cpu1[1] - cpu0[1]) / n,
    "loss": first_loss,
    "last_loss": float(jax.device_get(m["loss"])),
  }


def main(argv):
  del argv
  if _REPS.value < 1:
    raise app.UsageError("--reps must be >= 1")
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
  batches = timing.full_length_pairs(
    pairs=_PAIRS.value, seq_len=_SEQ.value, count=3, vocab_size=_VOCAB.value
  )
  print(
    f"device: {jax.devices()[0].platform} | RM step {_LAYERS.value}x{_WIDTH.value} "
    f"({_HEADS.value} heads), {_PAIRS.value} pairs x {_SEQ.value} tokens | median of "
    f"{_REPS.value} steps | vocabulary {_VOCAB.value:,}"
  )
  print(
    "variant | first call s | step s | pairs/s | user s/step | sys s/step | first loss | last loss"
  )
  variants = {name: variant(name, backbone) for name in _VARIANTS.value}
  for name, (variant_backbone, attend, guard, own_backward) in variants.items():
    r = time_variant(attend, guard, batches, variant_backbone, own_backward)
    print(
      f"{name} | {r['first_s']:.2f} | {r['step_s']:.4f} | {_PAIRS.value / r['step_s']:.1f} | "
      f"{r['user_s']:.3f} | {r['sys_s']:.3f} | {r['loss']:.7f} | {r['last_loss']:.7f}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
