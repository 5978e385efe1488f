r"""Trace, compile and run time of the over-optimisation study's RL chunk per XLA optimisation level.

The chunk (``experiments.overoptimization_rl.chunk_fn``: ``rl_log_every`` PPO steps of every
member, optionally the held-out evaluation) is the main cost of every study's ``--quick`` run
and of the slowest tests, and it is almost all compile time. This builds the quick config's
world 0 (``--config``: ``quick`` or the default ``''``) and times ``lower``, ``compile`` of
the gold chunk (no persistent cache) at each ``--opt_levels`` entry (XLA's
``xla_backend_optimization_level``, passed per program as the studies'
``rl_compile_opt_level`` does; ``-1`` = XLA's default), then the steady-state seconds per chunk over ``--run_chunks``
calls. Commands (the figures in BUILD_NOTES.md)::

  python benchmarks/rl_chunk_compile.py --members=1 --noevaluate
  python benchmarks/rl_chunk_compile.py --opt_levels=-1,0,1,2 --members=3 --noevaluate
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
from jaxrm.io import compile_cache  # noqa: E402
from jaxrm.steps import rl as rl_lib  # noqa: E402

_MEMBERS = flags.DEFINE_integer("members", 1, "Vmapped RL members (arms x seeds).")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Include the held-out evaluation.")
_CONFIG = flags.DEFINE_string("config", "quick", "Study config variant ('' is the default run).")
_LEVELS = flags.DEFINE_list("opt_levels", ["-1"], "XLA backend optimisation levels (-1: default).")
_RUN_CHUNKS = flags.DEFINE_integer("run_chunks", 5, "Timed chunk calls after the first.")


def main(argv):
  del argv
  cfg = configs.get_config(_CONFIG.value).for_world(0)
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

  def fresh_states():
    keys = jax.random.split(jax.random.key(0), m)
    return jax.vmap(lambda k, c: rl_lib.create_rl_state(start, optimizer, k, kl_coef=c))(
      keys, jnp.zeros(m)
    )

  params = jax.tree.map(lambda x: jnp.stack([x] * m), data.world)
  prompts, eval_key = rl.eval_batch(cfg)
  t = time.perf_counter()
  lowered = chunk.lower(fresh_states(), data.world, params, prompts, eval_key)
  lower_s = time.perf_counter() - t
  print(
    f"config {_CONFIG.value or 'default'} | members {m} | {cfg.rl_log_every} steps per chunk | "
    f"evaluate {_EVALUATE.value} | XLA_FLAGS {os.environ.get('XLA_FLAGS', '') or '(none)'}"
  )
  print(f"trace+lower {lower_s:.1f} s")
  print("opt level | XLA compile s | s per chunk")
  for level in (int(v) for v in _LEVELS.value):
    t = time.perf_counter()
    compiled = lowered.compile(compiler_options=compile_cache.backend_options(level))
    compile_s = time.perf_counter() - t
    states = fresh_states()
    states, out = compiled(states, data.world, params, prompts, eval_key)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(_RUN_CHUNKS.value):
      states, out = compiled(states, data.world, params, prompts, eval_key)
    jax.block_until_ready(out)
    run_s = (time.perf_counter() - t) / _RUN_CHUNKS.value
    print(f"{level:>9} | {compile_s:>13.1f} | {run_s:>11.3f}", flush=True)


if __name__ == "__main__":
  app.run(main)
