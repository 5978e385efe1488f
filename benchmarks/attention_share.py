r"""How much of the reward-model training step is attention, and what causal blocking would save.

Times jaxrm's reward-model training step (``jaxrm.train.reward_model.step_fn`` with the
README's HH settings, ``experiments/configs/reward_model.py:hh``) on random full-length batches
with the library's attention swapped (``jaxrm.models.transformer._attend``, patched in this
process only, one freshly jitted step per variant):

- ``library``: the library's attention;
- ``identity``: no attention at all (the output is the query): a lower bound on the step
  without attention, not a model;
- ``blocksN``: the queries split into ``N`` causal blocks, block ``i`` attending only keys
  ``[0, (i + 1) * seq / N)`` (the keys every later position masks anyway), each block the
  library's attention. Exact for the causal training forward; its loss is printed beside the
  library's.

Per variant: first call (compile included), median steady step, pairs/s, and the process's
user and system CPU seconds per steady step. Command (figures in BUILD_NOTES.md)::

  python benchmarks/attention_share.py
"""

import contextlib
import resource
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
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
  "variants", ["library", "identity", "blocks2", "blocks4", "blocks8"], "Attention variants."
)


def causal_blocks(num_blocks: int, attend):
  """``attend`` applied per causal query block (falls back to ``attend`` when the query and key
  lengths differ, as with a KV cache, or the length is not a multiple of ``num_blocks``)."""

  def blocked(q, k, v, attn_mask):
    t = q.shape[1]
    if k.shape[2] != t or t % num_blocks:
      return attend(q, k, v, attn_mask)
    size = t // num_blocks
    outs = [
      attend(
        q[:, i * size : (i + 1) * size],
        k[:, :, : (i + 1) * size],
        v[:, :, : (i + 1) * size],
        attn_mask[:, i * size : (i + 1) * size, : (i + 1) * size],
      )
      for i in range(num_blocks)
    ]
    return jnp.concatenate(outs, axis=1)

  return blocked


def variant_attend(name: str):
  library = transformer._attend  # pylint: disable=protected-access
  if name == "library":
    return library
  if name == "identity":
    return lambda q, k, v, attn_mask: q
  if name.startswith("blocks") and name[6:].isdigit() and int(name[6:]) >= 1:
    return causal_blocks(int(name[6:]), library)
  raise app.UsageError(f"--variants: unknown variant {name!r} (library, identity, blocksN)")


@contextlib.contextmanager
def patched_attention(attend):
  saved = transformer._attend  # pylint: disable=protected-access
  transformer._attend = attend
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
  attends = {name: variant_attend(name) for name in _VARIANTS.value}
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
  for name, attend in attends.items():
    r = time_variant(attend, batches, config, backbone)
    print(
      f"{name} | {r['first_s']:.2f} | {r['step_s']:.4f} | {_PAIRS.value / r['step_s']:.1f} | "
      f"{r['user_s']:.3f} | {r['sys_s']:.3f} | {r['loss']:.7f}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
