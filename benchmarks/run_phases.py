r"""Where a whole reward-model run's time goes, phase by phase: the README's HH run.

Runs :func:`jaxrm.train.reward_model.train_and_evaluate` in this process on the ``hh`` config
(``experiments/configs/reward_model.py``: the README's HH model and data, here ``--steps``
steps and ``--matmul_dtype`` matmuls, as ``benchmarks/peer_trl.py --workloads=hh`` runs it end
to end) and times each phase by wrapping the library function that does it:

- ``data``: :func:`jaxrm.data.pairs.load_data` (tokenise into the TFDS dataset, read it back);
- ``init``: :func:`jaxrm.train.rm_config.init_state` (the step-0 train state);
- ``first step``: from the end of ``init`` to the first step's result (placing the state,
  tracing the step and compiling or loading it from the compilation cache, running it);
- ``steps``: the rest of the loop (the other steps, host work per step, logging);
- ``evaluation``: :func:`jaxrm.train.rm_eval.score_pairs` and
  :func:`jaxrm.io.report.heldout_metrics` at each evaluation;
- ``checkpoints``: :meth:`jaxrm.io.checkpoint.CheckpointManager.save`;
- ``curves``: closing the metrics writer, which draws the learning curves;
- ``report``: :func:`jaxrm.train.rm_eval.write_report`;

and before the run, the imports (from this script's first line). The interpreter's start and
teardown are outside every figure: ``benchmarks/peer_trl.py`` times whole processes. As in
the scripts, the objects alive after the imports are frozen
(:func:`experiments.cli.freeze_objects`; ``--nofreeze`` leaves them to the collector);
``garbage collection`` is the time of the collector's passes during the run, within the
phases above. With a warm compilation cache (``--cache_dir`` filled by an earlier run) this
is the second run of the same command, as in the peer benchmark. ``--shape`` and
``--batch_size`` time another backbone and batch on the same data (the peer benchmark's
``gpt2_4x256``: ``--shape=4x256x4 --batch_size=16 --max_len=128 --steps=20``);
``--microbatch_size=0`` runs the step over the whole batch at once instead of the config's
slices. Commands (figures in BUILD_NOTES.md)::

  python benchmarks/run_phases.py --workdir=/tmp/phases --cache_dir=/tmp/phases_cache
  python benchmarks/run_phases.py --workdir=/tmp/phases --cache_dir=/tmp/phases_cache \
    --shape=4x256x4 --batch_size=16 --max_len=128 --steps=20
  python benchmarks/run_phases.py --workdir=/tmp/phases --cache_dir=/tmp/phases_cache \
    --microbatch_size=0
"""

import time

_START = time.perf_counter()

import collections  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import shapes  # noqa: E402
from benchmarks.shapes import hh_config  # noqa: E402
from experiments import cli  # noqa: E402
from experiments.configs import reward_model as rm_configs  # noqa: E402
from jaxrm.data import pairs  # noqa: E402
from jaxrm.io import checkpoint, compile_cache, report, rundir  # noqa: E402
from jaxrm.train import reward_model, rm_eval  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (emptied first).", required=True)
_CACHE = flags.DEFINE_string("cache_dir", "", "Compilation cache directory ('': none).")
_DATA = flags.DEFINE_string("data", rm_configs.HH_FILE, "HH-RLHF JSONL(.gz) file.")
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps (the peer benchmark's hh: 100).")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "Tokens per response (the hh config's: 256).")
_SHAPE = flags.DEFINE_string(
  "shape",
  "",
  "The backbone as LAYERSxWIDTHxHEADS, e.g. 4x256x4 (the peer benchmark's gpt2_4x256); '': the "
  "hh config's preset, 'tiny' (2x64x2).",
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Pairs per step (the hh config's: 32).")
_FREEZE = flags.DEFINE_bool(
  "freeze", True, "Freeze the objects alive after the imports, as the scripts do."
)
_PACK = flags.DEFINE_integer(
  "pack_pairs", 0, "model.pack_pairs: 0 two rows per pair; N one packed row, multiples of N."
)
_MICRO = flags.DEFINE_integer("microbatch_size", -1, shapes.MICROBATCH_HELP)
_MATMUL = flags.DEFINE_enum(
  "matmul_dtype", "bfloat16", ["float32", "bfloat16"], "model.matmul_dtype (peer benchmark's)."
)

PHASES = (
  ("data", pairs, "load_data"),
  ("init", reward_model, "init_state"),
  ("evaluation", rm_eval, "score_pairs"),
  ("evaluation", report, "heldout_metrics"),
  ("checkpoints", checkpoint.CheckpointManager, "save"),
  ("curves", rundir.MetricsWriter, "__exit__"),
  ("report", rm_eval, "write_report"),
)


def timed(seconds: dict, ends: dict, name: str, fn):
  """``fn`` adding its time to ``seconds[name]`` and its last end to ``ends[name]``."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    start = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      ends[name] = time.perf_counter()
      seconds[name] += ends[name] - start

  return wrapper


def main(argv):
  del argv
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps must be >= 1, got {_STEPS.value}")
  if _BATCH.value < 1:
    raise app.UsageError(f"--batch_size must be >= 1, got {_BATCH.value}")
  if not os.path.isfile(_DATA.value):
    raise app.UsageError(f"--data: no file {_DATA.value}")
  imports = time.perf_counter() - _START
  if _FREEZE.value:
    cli.freeze_objects()
  collecting = {"start": 0.0, "seconds": 0.0}

  def collector(phase, _):
    if phase == "start":
      collecting["start"] = time.perf_counter()
    else:
      collecting["seconds"] += time.perf_counter() - collecting["start"]

  gc.callbacks.append(collector)
  rundir.quiet_orbax_logging()
  if _CACHE.value:
    compile_cache.enable_compilation_cache(_CACHE.value)
  config = hh_config(
    data=_DATA.value,
    max_len=_MAX_LEN.value,
    batch_size=_BATCH.value,
    matmul_dtype=_MATMUL.value,
    shape=_SHAPE.value,
  )
  config.steps = _STEPS.value
  config.model.pack_pairs = _PACK.value
  config.microbatch_size = shapes.microbatch_size(_MICRO, _BATCH.value, batch_flag="batch_size")
  seconds, ends = collections.defaultdict(float), {}
  for name, owner, attr in PHASES:
    setattr(owner, attr, timed(seconds, ends, name, getattr(owner, attr)))
  start_progress = rundir.Progress.start  # called when the first step's result is ready

  def first_step_done(self, step):
    ends["first step"] = time.perf_counter()
    return start_progress(self, step)

  rundir.Progress.start = first_step_done
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  start = time.perf_counter()
  try:
    summary = reward_model.train_and_evaluate(config, _WORKDIR.value)
  except rundir.ConfigError as e:  # e.g. --max_len=0, named as its config field
    raise app.UsageError(e.flag_message()) from None
  total = time.perf_counter() - start
  seconds["first step"] = ends["first step"] - ends["init"]
  seconds["steps"] = total - sum(seconds.values())
  rows = {"imports": imports, **dict(seconds), "run": total, "process so far": imports + total}
  rows["garbage collection"] = collecting["seconds"]
  shape = _SHAPE.value or "2x64x2 (tiny)"
  packed = f" packed (rows in multiples of {_PACK.value})" if _PACK.value else ""
  if config.microbatch_size:
    packed += f" in microbatches of {config.microbatch_size}"
  print(
    f"{_STEPS.value} steps of {_BATCH.value} pairs{packed}, backbone {shape}, steady "
    f"{summary['pairs_per_sec']:.1f} pairs/s"
  )
  for name, value in rows.items():
    print(f"{name:>15} | {value:6.2f} s")
  with open(os.path.join(_WORKDIR.value, "run_phases.json"), "w") as f:
    extra = {"pairs_per_sec": summary["pairs_per_sec"], "num_steps": _STEPS.value}
    json.dump(
      {
        **rows,
        **extra,
        "shape": shape,
        "batch_size": _BATCH.value,
        "pack_pairs": _PACK.value,
        "microbatch_size": config.microbatch_size,
      },
      f,
    )


if __name__ == "__main__":
  app.run(main)
