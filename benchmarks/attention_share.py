r"""How much of the reward-model training step is attention, and what causal blocking would save.

Times jaxrm's reward-model training step (``jaxrm.train.reward_model.step_fn`` with the
README's HH settings, ``experiments/configs/reward_model.py:hh``) on random full-length batches
with the attention varied (one freshly jitted step per variant):

- ``full``: the library's attention over the whole score matrix (``attention_query_block=None``);
- ``identity``: no attention at all (the output is the query): a lower bound on the step
  without attention, not a model;
- ``blockN``: the library's attention with ``TransformerConfig.attention_query_block=N``:
  query blocks of ``N`` tokens, block ``[s, e)`` attending only keys ``[0, e)`` (the keys no
  later position masks). The same attention; its loss is printed beside the full one.

Per variant: first call (compile included), median steady step, pairs/s, and the process's
user and system CPU seconds per steady step. Command (figures in BUILD_NOTES.md)::

  python benchmarks/attention_share.py
"""

import contextlib
import dataclasses
import resource
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from experiments.configs import reward_model as rm_configs
from jaxrm.models import transformer
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import parallel
from jaxrm.train import reward_model as rm_train
from jaxrm.train.rm_config import init_state, make_optimizer

_LAYERS = flags.DEFINE_integer("layers", 2, "Backbone layers (README HH model: 2).")
_WIDTH = flags.DEFINE_integer("width", 64, "Backbone width (README HH model: 64).")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads (README HH model: 2).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per response (README HH run: 256).")
_PAIRS = flags.DEFINE_integer("batch_pairs", 32, "Pairs per step (README HH run: 32).")
_REPS = flags.DEFINE_integer("reps", 8, "Timed steady steps per variant.")
_VARIANTS = flags.DEFINE_list(
  "variants", ["full", "identity", "block128", "block64", "block32"], "Attention variants."
)


def variant(name: str, backbone: transformer.TransformerConfig):
  """The variant's backbone and the attention function to run it with (None: the library's)."""
  if name == "full":
    return backbone, None
  if name == "identity":
    return backbone, lambda q, k, v, attn_mask, query_block=None: q
  if name.startswith("block") and name[5:].isdigit() and int(name[5:]) >= 1:
    return dataclasses.replace(backbone, attention_query_block=int(name[5:])), None
  raise app.UsageError(f"--variants: unknown variant {name!r} (full, identity, blockN)")


@contextlib.contextmanager
def patched_attention(attend):
  saved = transformer._attend  # pylint: disable=protected-access
  transformer._attend = attend or saved
  try:
    yield
  finally:
    transformer._attend = saved


def cpu_seconds() -> tuple[float, float]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime


def time_variant(attend, batches, config, backbone) -> dict:
  with patched_attention(attend):
    model = RewardModel(backbone, pooling=config.model.pooling)
    optimizer, _ = make_optimizer(config)
    step = parallel.make_parallel_step(
      rm_train.step_fn(config, model, optimizer), mode=config.parallel
    )
    state = step.put_state(init_state(config, model, optimizer, _SEQ.value))
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
  }


def main(argv):
  del argv
  if _REPS.value < 1:
    raise app.UsageError("--reps must be >= 1")
  config = rm_configs.get_config("hh")
  backbone = transformer.TransformerConfig(
    vocab_size=259,
    num_layers=_LAYERS.value,
    width=_WIDTH.value,
    num_heads=_HEADS.value,
    max_len=_SEQ.value,
  )
  rng = np.random.default_rng(0)
  shape = (_PAIRS.value, _SEQ.value)
  batches = [
    {
      "chosen": rng.integers(3, 259, shape).astype(np.int32),
      "chosen_mask": np.ones(shape, bool),
      "rejected": rng.integers(3, 259, shape).astype(np.int32),
      "rejected_mask": np.ones(shape, bool),
      "weight": np.ones(_PAIRS.value, np.float32),
    }
    for _ in range(3)
  ]
  print(
    f"device: {jax.devices()[0].platform} | RM step {_LAYERS.value}x{_WIDTH.value} "
    f"({_HEADS.value} heads), {_PAIRS.value} pairs x {_SEQ.value} tokens | median of "
    f"{_REPS.value} steps"
  )
  print("variant | first call s | step s | pairs/s | user s/step | sys s/step | first loss")
  variants = {name: variant(name, backbone) for name in _VARIANTS.value}
  for name, (variant_backbone, attend) in variants.items():
    r = time_variant(attend, batches, config, variant_backbone)
    print(
      f"{name} | {r['first_s']:.2f} | {r['step_s']:.4f} | {_PAIRS.value / r['step_s']:.1f} | "
      f"{r['user_s']:.3f} | {r['sys_s']:.3f} | {r['loss']:.7f}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
