r"""Trace and XLA-compile time of the over-optimisation study's RL chunk, under ``$XLA_FLAGS``.

The chunk (``experiments.overoptimization_rl.chunk_fn``: ``rl_log_every`` PPO steps of every
member, optionally the held-out evaluation) is the main cost of every study's ``--quick`` run
and of the slowest tests, and it is almost all compile time. This builds the quick config's
world 0 and times ``lower`` and ``compile`` of the gold chunk (no persistent cache). Commands
(the figures in BUILD_NOTES.md; run two at a time, one per core)::

  python benchmarks/rl_chunk_compile.py --members=1 --noevaluate
  XLA_FLAGS=--xla_backend_optimization_level=0 python benchmarks/rl_chunk_compile.py \
      --members=1 --noevaluate
"""

import os
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import overoptimization_lib as lib  # noqa: E402
from experiments import overoptimization_rl as rl  # noqa: E402
from experiments.configs import overoptimization as configs  # noqa: E402
from jaxrm.steps import rl as rl_lib  # noqa: E402

_MEMBERS = flags.DEFINE_integer("members", 1, "Vmapped RL members (arms x seeds).")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Include the held-out evaluation.")


def main(argv):
  del argv
  cfg = configs.get_config("quick").for_world(0)
  with tempfile.TemporaryDirectory() as workdir:
    data = lib.build_world(cfg, workdir)
  m = _MEMBERS.value
  chunk = rl.chunk_fn(
    cfg.world,
    None,
    rl._rl_config(cfg),
    cfg.rl_algorithm,
    float(cfg.rl_learning_rate),
    cfg.rl_batch_size,
    cfg.rl_log_every,
    _EVALUATE.value,
  )
  optimizer = optax.adam(cfg.rl_learning_rate)
  start = rl.start_params(cfg, data)
  keys = jax.random.split(jax.random.key(0), m)
  states = jax.vmap(lambda k, c: rl_lib.create_rl_state(start, optimizer, k, kl_coef=c))(
    keys, jnp.zeros(m)
  )
  params = jax.tree.map(lambda x: jnp.stack([x] * m), data.world)
  prompts, eval_key = rl.eval_batch(cfg)
  t = time.perf_counter()
  lowered = chunk.lower(states, data.world, params, prompts, eval_key)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - t
  flags_text = os.environ.get("XLA_FLAGS", "") or "(none)"
  print(f"members {m} | evaluate {_EVALUATE.value} | XLA_FLAGS {flags_text}")
  print(f"trace+lower {lower_s:.1f} s | XLA compile {compile_s:.1f} s")


if __name__ == "__main__":
  app.run(main)
