r"""jaxrm against TRL's ``RewardTrainer`` and HF ``generate`` on the same machine (issue 14).

Same data (HH-RLHF JSONL via ``--data``; TRL gets jaxrm's own token ids, already truncated to
the sequence length: jaxrm's byte tokens, or ``--tokenizer``'s subword tokens, e.g. GPT-2's
from ``benchmarks/gpt2_tokenizer.py``, the vocabulary's size on both sides), same GPT-2-style
shapes (layers, width, heads, sequence length), same batch of pairs and steps. TRL's model is
``transformers.GPT2ForSequenceClassification`` (random init, ``num_labels=1``, learned
positions; jaxrm's presets use rotary positions).

Per workload and round, interleaved (jaxrm, TRL, jaxrm, TRL, ...):

* **per step**: jaxrm's library step (:func:`jaxrm.steps.rm_step.reward_model_step`, AdamW,
  ``make_parallel_step``) timed in this process on real batches padded to the full length,
  compile excluded (the first call is reported as ``first step s``); TRL: ``RewardTrainer.train()``
  in a subprocess with ``pad_to_multiple_of=seq_len`` (the same full-length shape), the median
  time between its ``on_step_begin`` and ``on_step_end`` callbacks after two warm-up steps;
* **end to end**: wall time of a whole training process, ``steps * batch / seconds``: jaxrm's
  :func:`jaxrm.train.reward_model.train_and_evaluate` (the library path of
  ``experiments/train_reward_model.py``, config variant ``hh`` with the workload's shape as a
  registered preset; it also evaluates every 50 steps, checkpoints and writes its report) and
  TRL's ``RewardTrainer.train()``, padding to the longest in the batch, without evaluation, or
  with ``--trl_evaluate`` evaluating jaxrm's test split at jaxrm's evaluation steps; TRL's
  process gets pre-tokenised ids, jaxrm's builds its dataset; TRL's imports neither jax nor
  jaxrm (before session 37 it imported jax, about a second of its wall time);
* **TRL's settings** (``--trl_precisions``, each its own peer column and ratio): ``defaults``,
  TRL's CPU defaults (bf16 autocast, gradient checkpointing; side ``trl``), and ``float32``,
  float32 without checkpointing (side ``trl_float32``; ``--trl_float32`` is short for
  ``--trl_precisions=float32``);
* **jaxrm's precision** (``--jaxrm_matmul_dtype``): ``float32``, or ``bfloat16``, mixed
  precision (``model.matmul_dtype``: bfloat16 matmul operands summed in float32, float32
  parameters), the arithmetic of TRL's defaults; its matmul ceiling is measured as well;
* **jaxrm's devices** (``--jaxrm_cpu_devices``): 1, or the CPU split into that many JAX
  devices (``jax_num_cpu_devices``), jaxrm's steps and runs then data-parallel (``shard_map``);
* **jaxrm's outputs** (``--jaxrm_outputs``): ``full``, the scripts' defaults (learning-curve
  figures and the held-out report as well), or ``trl``, what TRL's runs write (metrics and the
  final model), for the same work on both sides;
* **FLOP utilisation**: model FLOPs (:func:`jaxrm.models.presets.flops_per_token`, at the full
  length) per second over the float32 matmul ceiling measured at the start of this run.

Ratios are jaxrm's speed over TRL's (TRL seconds / jaxrm seconds) per round; the table
reports their medians with the range of the rounds (the seed sweep's ratios likewise). Then
the sampler:
jaxrm's KV-cached :func:`jaxrm.models.sampling.sample` against HF ``generate`` (GPT-2 LM head,
same shape, random init, the same left-padded prompts, temperature 1 sampling without top-k,
``--new_tokens`` tokens each) at each ``--sampler_batches``, jaxrm also with the batch split
into ``--sampler_thread_groups`` concurrent calls (``sample(thread_groups=...)``, per-example
keys). Issue 14's seed sweep, timed before the sampler (no torch computation has run in the
process then), has no peer: the time per step of ``--seed_sweep_seeds`` synthetic-world
proxies (``--seed_sweep_proxy``, the over-optimisation study's proxy architecture, 64 pairs
per seed and step) trained at once by :class:`jaxrm.steps.rm_sweep.RewardModelSweep`, in
each ``--seed_sweep_thread_groups`` count of thread groups and each layout of
``--seed_sweep_seed_batches`` (vmapped, or one seed after another in each group's program),
over one seed's time per round: the faster of one seed vmapped and one seed alone
(``benchmarks/seed_sweep.py`` sweeps seed counts).

Needs torch, transformers and trl: ``pip install -e '.[peer]'`` (install torch first from
the local CPU wheel, see BUILD_NOTES.md). Writes ``<workdir>/peer_results.jsonl`` (one row per
measurement) and ``<workdir>/peer_summary.json``.

Usage::

  python benchmarks/peer_trl.py --workdir=/tmp/peer --quick     # smoke run, about a minute
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=hh,gpt2_4x256 --rounds=2
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=hh --trl_precisions=defaults,float32
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=gpt2_4x256 --jaxrm_matmul_dtype=bfloat16
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=hh --jaxrm_cpu_devices=2
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=hh --trl_evaluate
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=hh --trl_evaluate --jaxrm_outputs=trl
  python benchmarks/peer_trl.py --workdir=runs/peer --workloads=hh --tokenizer=/tmp/gpt2_tokenizer
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = "/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
INSTALL_HINT = "pip install -e '.[peer]'"
BYTE_VOCAB = {"vocab_size": 259, "pad_id": 0, "bos_id": 1, "eos_id": 2}  # bytes are 3..258


@dataclasses.dataclass(frozen=True)
class Workload:
  """One shape: ``layers`` x ``width`` with ``heads``, ``seq_len`` tokens, ``batch_pairs``
  pairs per step, ``steps`` optimizer steps of the end-to-end runs (0: no end-to-end run)."""

  layers: int
  width: int
  heads: int
  seq_len: int
  batch_pairs: int
  steps: int


WORKLOADS = {
  # The README's HH model: experiments/configs/reward_model.py:hh (preset 'tiny', max_len 256,
  # batch 32).
  "hh": Workload(layers=2, width=64, heads=2, seq_len=256, batch_pairs=32, steps=100),
  # The GPT-2 shapes.
  "gpt2_4x256": Workload(layers=4, width=256, heads=4, seq_len=128, batch_pairs=16, steps=20),
  "gpt2_6x512": Workload(layers=6, width=512, heads=8, seq_len=256, batch_pairs=8, steps=0),
  "quick": Workload(layers=2, width=32, heads=2, seq_len=64, batch_pairs=4, steps=6),
}

# Peer side name in the rows and summary -> TRL setting (``--trl_precisions``).
TRL_PRECISIONS = {"defaults": "trl", "float32": "trl_float32"}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder (results, run directories).")
flags.DEFINE_string("data", DEFAULT_DATA, "HH-RLHF-format JSONL(.gz) preference file.")
flags.DEFINE_list("workloads", ["hh", "gpt2_4x256", "gpt2_6x512"], f"Of {sorted(WORKLOADS)}.")
flags.DEFINE_integer("layers", None, "Override every workload's layer count.")
flags.DEFINE_integer("width", None, "Override every workload's width.")
flags.DEFINE_integer("heads", None, "Override every workload's head count.")
flags.DEFINE_integer("seq_len", None, "Override every workload's sequence length.")
flags.DEFINE_integer("batch_pairs", None, "Override every workload's pairs per step.")
flags.DEFINE_integer("steps", None, "Override every workload's end-to-end steps (0: none).")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds (jaxrm, TRL) per workload.")
flags.DEFINE_integer("step_reps", 4, "Timed steps per round for the per-step figures.")
flags.DEFINE_list("sampler_batches", ["16", "64"], "Sampler batch sizes (empty: no sampler).")
flags.DEFINE_string("sampler_workload", "gpt2_4x256", "Shape of the sampler's model.")
flags.DEFINE_integer(
  "sampler_thread_groups",
  2,
  "jaxrm's sampler also with the batch split into this many concurrent calls "
  "(sample(thread_groups=...)); 1: only the single call.",
)
flags.DEFINE_integer("prompt_len", 32, "Sampler prompt length (left-padded).")
flags.DEFINE_integer("new_tokens", 64, "Sampler tokens generated per sequence.")
flags.DEFINE_integer(
  "seed_sweep_seeds", 8, "Seeds of the seed sweep timed against one seed (0: no seed sweep)."
)
flags.DEFINE_string(
  "seed_sweep_proxy",
  "1x16x2",
  "The seed sweep's proxy, layers x width x heads (the study's L1W16).",
)
flags.DEFINE_list(
  "seed_sweep_thread_groups", ["1", "2"], "Thread-group counts of the seed sweep, one row each."
)
flags.DEFINE_list(
  "seed_sweep_seed_batches",
  ["0", "1"],
  "Seeds vmapped together in each group's program (RewardModelSweep.train's seed_batch; "
  "0: all of them), one row each per thread-group count.",
)
flags.DEFINE_integer("seed_sweep_steps", 200, "Steps per timed seed-sweep call (one chunk).")
flags.DEFINE_integer("matmul_size", 2048, "n of the [n, n] @ [n, n] ceiling matmul.")
flags.DEFINE_string(
  "jaxrm_cache_dir",
  "",
  "If set: jaxrm's end-to-end runs use this persistent compilation cache (as the scripts do by "
  "default), filled first by one unmeasured run per workload; empty: every run compiles cold.",
)
flags.DEFINE_list(
  "trl_precisions",
  ["defaults"],
  f"TRL settings, each its own peer column, of {sorted(TRL_PRECISIONS)}: 'defaults' is TRL's "
  "CPU defaults (bf16 autocast, gradient checkpointing), 'float32' is float32 without "
  "checkpointing (jaxrm's arithmetic).",
)
flags.DEFINE_bool(
  "trl_float32", False, "Shorthand for --trl_precisions=float32 (in a child: its setting)."
)
flags.DEFINE_bool(
  "trl_evaluate",
  False,
  "TRL's end-to-end runs also evaluate jaxrm's test split at jaxrm's evaluation steps (every "
  "eval.every of the hh config, 50, and at the last step), the held-out work jaxrm's runs do; "
  "off: TRL's runs only train.",
)
flags.DEFINE_integer(
  "attention_query_block",
  None,
  "jaxrm's model.attention_query_block (unset: the hh config's; 0: the full score matrix).",
)
flags.DEFINE_enum(
  "jaxrm_matmul_dtype",
  "float32",
  ["float32", "bfloat16"],
  "jaxrm's model.matmul_dtype in its training runs: 'bfloat16' is mixed precision (bfloat16 "
  "matmul operands, float32 sums and parameters), the arithmetic of TRL's CPU defaults.",
)
flags.DEFINE_integer(
  "jaxrm_pack_pairs",
  0,
  "jaxrm's model.pack_pairs in its end-to-end runs (0: two rows per pair; N: one packed row "
  "per pair, in multiples of N tokens; jaxrm.data.packing). The per-step figures stay two-row "
  "(benchmarks/packed_step.py times the packed step).",
)
flags.DEFINE_integer(
  "jaxrm_microbatch_size",
  -1,
  "jaxrm's microbatch_size in its steps and runs (pairs per forward and backward slice; 0: the "
  "whole batch at once); -1: the hh config's (4).",
)
flags.DEFINE_integer(
  "jaxrm_cpu_devices",
  1,
  "jaxrm's processes split the CPU into this many JAX devices (jax_num_cpu_devices, "
  "JAX_NUM_CPU_DEVICES for the scripts); above 1 its runs and steps are data-parallel "
  "(config.parallel 'auto': shard_map), the batch split among the devices.",
)
flags.DEFINE_enum(
  "jaxrm_outputs",
  "full",
  ["full", "trl"],
  "What jaxrm's end-to-end runs write besides metrics and the final checkpoint: 'full', the "
  "scripts' defaults (learning-curve figures, the held-out report); 'trl', only what TRL's "
  "runs write (log.plots=False, eval.report=False).",
)
flags.DEFINE_string(
  "tokenizer",
  "",
  "jaxrm's data.tokenizer for both sides' token ids: a tokenizer folder with tokenizer.json "
  "(GPT-2's: benchmarks/gpt2_tokenizer.py); empty: jaxrm's byte tokenizer. TRL's model gets "
  "its vocabulary size and pad/EOS ids. The sampler stays on bytes.",
)
flags.DEFINE_bool("quick", False, "Tiny shapes, 1 round, few steps: a smoke run.")
flags.DEFINE_enum("child", "", ["", "jaxrm_train", "trl_train"], "Internal: subprocess role.")
flags.DEFINE_string("ids_file", "", "Internal (trl_train): token ids JSONL.")
flags.DEFINE_string("eval_ids_file", "", "Internal (trl_train): test split's token ids JSONL.")
flags.DEFINE_integer("eval_steps", 0, "Internal (trl_train): evaluate every this many steps.")
flags.DEFINE_bool("pad_full", False, "Internal (trl_train): pad every batch to seq_len.")
flags.DEFINE_string("out", "", "Internal: the child's JSON result file.")


def require_peer_packages():
  """Imports torch, transformers, trl and datasets, or exits naming the install command."""
  try:
    import datasets  # noqa: F401
    import torch
    import transformers
    import trl
  except ImportError as e:
    raise SystemExit(
      f"peer_trl.py needs torch, transformers, trl and datasets ({e}); install them with "
      f"`{INSTALL_HINT}` (torch first: `pip install torch==2.13.0`, a CPU build)"
    ) from None
  return torch, transformers, trl


def resolve_workloads() -> dict[str, Workload]:
  """The ``--workloads`` with the shape overrides applied (``--quick``: only 'quick')."""
  names = ["quick"] if FLAGS.quick else FLAGS.workloads
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    raise app.UsageError(f"--workloads: unknown {unknown}; known: {sorted(WORKLOADS)}")
  over = {
    k: FLAGS[k].value
    for k in ("layers", "width", "heads", "seq_len", "batch_pairs", "steps")
    if FLAGS[k].value is not None
  }
  for k, v in over.items():
    if v < (0 if k == "steps" else 1):
      raise app.UsageError(f"--{k} must be positive, got {v}")
  out = {n: dataclasses.replace(WORKLOADS[n], **over) for n in names}
  for n, w in out.items():
    if w.width % w.heads:
      raise app.UsageError(f"--heads: {w.heads} does not divide width {w.width} ({n})")
  return out


def check_microbatch_size(workloads: dict[str, Workload]) -> None:
  """Refuses a ``--jaxrm_microbatch_size`` (for -1 the hh config's) that splits a workload's
  pairs on each device unevenly, naming the flag and the workloads."""
  from benchmarks.shapes import hh_microbatch_size
  from jaxrm.steps import microbatch

  size = hh_microbatch_size(FLAGS.jaxrm_microbatch_size)
  devices = FLAGS.jaxrm_cpu_devices
  bad = [
    n for n, w in workloads.items() if not microbatch.is_valid_size(size, w.batch_pairs // devices)
  ]
  if bad:
    raise app.UsageError(
      f"--jaxrm_microbatch_size={FLAGS.jaxrm_microbatch_size} (slices of {size} pairs) must "
      f"divide each device's pairs per step of {bad} or be at least that many (0: the whole "
      "batch at once)"
    )


def data_config(data: str, seq_len: int, tokenizer: str = ""):
  """jaxrm's HH data settings (variant 'hh': 10% held out) at ``seq_len`` tokens of
  ``tokenizer`` (a folder; empty: bytes)."""
  from jaxrm.data.pairs import DataConfig

  return DataConfig(files=(data,), test_fraction=0.1, max_len=seq_len, tokenizer=tokenizer)


def load_run_data(config, workdir: str):
  """:func:`jaxrm.data.pairs.load_data` of the data settings ``config`` (:func:`data_config`)
  with their tokenizer, as a run tokenises them, under ``<workdir>/tokens_<max_len>``."""
  from jaxrm.data import pairs
  from jaxrm.data.run_tokenizer import RunTokenizer

  tok = RunTokenizer.from_source(config.tokenizer)
  return pairs.load_data(config, os.path.join(workdir, f"tokens_{config.max_len}"), tok=tok)


def run_vocab(tokenizer: str = "") -> dict[str, int]:
  """``tokenizer``'s vocabulary size and pad, BOS and EOS ids (:data:`BYTE_VOCAB` for bytes;
  a tokenizer without a pad token pads with EOS, as jaxrm does)."""
  if not tokenizer:
    return dict(BYTE_VOCAB)
  from jaxrm.data.run_tokenizer import RunTokenizer

  tok = RunTokenizer.from_source(tokenizer)
  eos = tok.eos_id if tok.eos_id is not None else tok.pad_id
  bos = tok.bos_id if tok.bos_id is not None else eos
  return {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": bos, "eos_id": eos}


def export_token_ids(data: str, seq_len: int, workdir: str, tokenizer: str = "") -> tuple[str, int]:
  """Writes jaxrm's training split as ``{"chosen_ids", "rejected_ids"}`` JSON lines (the
  tokenised, truncated sequences, unpadded), its test split the same way to
  :func:`heldout_ids_path` of that file, and :func:`run_vocab` to :func:`vocab_path` of it.
  Returns ``(path, number of training pairs)``."""
  from jaxrm.data import preference_files

  run = load_run_data(data_config(data, seq_len, tokenizer), workdir)
  path = os.path.join(workdir, f"token_ids_{seq_len}.jsonl")
  for split, split_path in ((run.train, path), (run.test, heldout_ids_path(path))):
    with open(split_path, "w") as f:
      for e in preference_files.get_examples(split, range(len(split))):
        ids = {k + "_ids": [int(t) for t in getattr(e, k)] for k in ("chosen", "rejected")}
        f.write(json.dumps(ids) + "\n")
  with open(vocab_path(path), "w") as f:
    json.dump(dict(run_vocab(tokenizer), tokenizer=run.tokenizer), f)
  return path, len(run.train)


def heldout_ids_path(ids_file: str) -> str:
  """Where :func:`export_token_ids` writes the test split beside the training split's file."""
  return ids_file[: -len(".jsonl")] + "_test.jsonl"


def vocab_path(ids_file: str) -> str:
  """Where :func:`export_token_ids` writes the ids' vocabulary (:func:`run_vocab`)."""
  return ids_file[: -len(".jsonl")] + "_vocab.json"


def trl_eval_steps(w: Workload) -> int:
  """TRL's ``eval_steps`` for jaxrm's evaluation steps: the hh config's ``eval.every`` (jaxrm
  also evaluates at its last step, a checkpoint), or the run's length when that is shorter.
  Raises ``app.UsageError`` when the run's length is not a multiple of it, as TRL would then
  not evaluate at the last step."""
  from experiments.configs import reward_model as rm_configs

  every = min(rm_configs.get_config("hh").eval.every, w.steps)  # train_config's eval section
  if w.steps % every:
    raise app.UsageError(
      f"--trl_evaluate: {w.steps} steps are not a multiple of jaxrm's eval.every ({every}), "
      "so TRL would not evaluate at the last step; give --steps a multiple of it"
    )
  return every


def register_preset(w: Workload) -> str:
  """Adds the workload's shape to jaxrm's preset table (in this process) and names it."""
  from jaxrm.models import presets

  name = f"peer_{w.layers}x{w.width}h{w.heads}"
  presets.PRESETS[name] = (w.layers, w.width, w.heads, w.seq_len)
  return name


def train_config(w: Workload, data: str, steps: int):
  """The README's HH run (``experiments/configs/reward_model.py:hh``) at the workload's shape."""
  from experiments.configs import reward_model as rm_configs

  config = rm_configs.get_config("hh")
  config.data = data_config(data, w.seq_len, FLAGS.tokenizer)
  config.model.preset = register_preset(w)
  config.batch_size = w.batch_pairs
  config.steps = max(steps, 1)
  if FLAGS.attention_query_block is not None:
    config.model.attention_query_block = FLAGS.attention_query_block or None
  if FLAGS.jaxrm_matmul_dtype != "float32":
    config.model.matmul_dtype = FLAGS.jaxrm_matmul_dtype
  config.model.pack_pairs = FLAGS.jaxrm_pack_pairs
  if FLAGS.jaxrm_microbatch_size >= 0:
    config.microbatch_size = FLAGS.jaxrm_microbatch_size
  if FLAGS.jaxrm_outputs == "trl":
    config.log.plots = False
    config.eval.report = False
  return config


# ----------------------------------------------------------------------------- jaxrm side


def jaxrm_step_times(w: Workload, data: str, workdir: str, reps: int, cache: dict) -> dict:
  """jaxrm's training step on real full-length batches: first call (compile included) and
  the median of ``reps`` steady calls, seconds. ``cache`` keeps the compiled step per shape."""
  import jax

  from jaxrm.data import pairs
  from jaxrm.models.reward_model import RewardModel
  from jaxrm.steps import parallel
  from jaxrm.train import reward_model as rm_train
  from jaxrm.train.rm_config import init_state, make_optimizer, preset_backbone

  key = (w.layers, w.width, w.heads, w.seq_len, w.batch_pairs)
  first_s = None
  if key not in cache:
    config = train_config(w, data, steps=1000)
    run = load_run_data(config.data, workdir)
    backbone = preset_backbone(config, vocab_size=run.vocab_size, max_len=w.seq_len)
    model = RewardModel(backbone, pooling=config.model.pooling)
    optimizer, _ = make_optimizer(config)
    pstep = parallel.make_parallel_step(
      rm_train.step_fn(config, model, optimizer), mode=config.parallel
    )
    it = pairs.make_iterator(
      run.train, batch_size=w.batch_pairs, seed=0, bucket=False, max_len=w.seq_len, train=True
    )
    keys = ("chosen", "chosen_mask", "rejected", "rejected_mask", "weight")
    batches = [pstep.shard_batch({k: b[k] for k in keys}) for b in (next(it) for _ in range(4))]
    state = pstep.put_state(init_state(config, model, optimizer, w.seq_len))
    start = time.perf_counter()
    state, m = pstep(state, batches[0])
    jax.block_until_ready(m)
    first_s = time.perf_counter() - start
    cache[key] = [pstep, state, batches]
  pstep, state, batches = cache[key]
  times = []
  for i in range(reps + 1):
    start = time.perf_counter()
    state, m = pstep(state, batches[i % len(batches)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  cache[key][1] = state
  return {"first_step_s": first_s, "step_s": statistics.median(times[1:])}


def jaxrm_train_child(w: Workload, data: str, run_dir: str, out: str) -> None:
  """Child process: one whole jaxrm training run; writes its summary figures to ``out``."""
  from experiments import cli
  from jaxrm.io import rundir
  from jaxrm.train import reward_model

  rundir.quiet_orbax_logging()
  if FLAGS.jaxrm_cache_dir:
    from jaxrm.io import compile_cache

    compile_cache.enable_compilation_cache(FLAGS.jaxrm_cache_dir)
  cli.freeze_objects()  # as the scripts' experiments.cli.run, before main and after it
  summary = reward_model.train_and_evaluate(train_config(w, data, w.steps), run_dir)
  with open(out, "w") as f:
    json.dump({"step": summary["step"], "pairs_per_sec_steady": summary["pairs_per_sec"]}, f)
  cli.freeze_objects()


# ------------------------------------------------------------------------------- TRL side


def ids_tokenizer(transformers, vocab: dict[str, int]):
  """A Hugging Face tokenizer object over ``vocab``'s ids (:func:`run_vocab`), one placeholder
  token per id; TRL only reads its pad/eos ids, as the dataset is already tokenised."""
  from tokenizers import Tokenizer, models

  names = {vocab["pad_id"]: "<pad>", vocab["bos_id"]: "<bos>", vocab["eos_id"]: "<eos>"}
  table = {names.get(i, f"<{i}>"): i for i in range(vocab["vocab_size"])}
  tok = Tokenizer(models.WordLevel(vocab=table, unk_token=names[vocab["eos_id"]]))
  specials = {f"{k}_token": names[vocab[f"{k}_id"]] for k in ("pad", "bos", "eos")}
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def gpt2_config(
  transformers,
  w: Workload,
  *,
  n_positions: int,
  num_labels: int | None,
  vocab: dict[str, int] = BYTE_VOCAB,
):
  """GPT-2 configuration at the workload's shape over ``vocab`` (:func:`run_vocab`)."""
  extra = {} if num_labels is None else {"num_labels": num_labels}
  return transformers.GPT2Config(
    n_positions=n_positions,
    n_embd=w.width,
    n_layer=w.layers,
    n_head=w.heads,
    vocab_size=vocab["vocab_size"],
    **{f"{k}_token_id": vocab[f"{k}_id"] for k in ("pad", "bos", "eos")},
    **extra,
  )


def trl_train_child(
  w: Workload,
  ids_file: str,
  run_dir: str,
  out: str,
  *,
  pad_full: bool,
  eval_ids_file: str = "",
  eval_steps: int = 0,
):
  """Child process: ``RewardTrainer.train()`` for ``w.steps`` steps, with ``eval_ids_file``
  evaluating that split every ``eval_steps`` steps; writes the step times (``on_step_begin``
  -> ``on_step_end``, seconds) and settings to ``out``. Imports neither jax nor jaxrm."""
  torch, transformers, trl = require_peer_packages()
  import datasets

  times, marks = [], {}

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      marks["begin"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter() - marks["begin"])

  with open(vocab_path(ids_file)) as f:
    vocab = json.load(f)
  torch.manual_seed(0)
  cfg = gpt2_config(transformers, w, n_positions=w.seq_len, num_labels=1, vocab=vocab)
  model = transformers.GPT2ForSequenceClassification(cfg)

  def read(path):
    with open(path) as f:
      return datasets.Dataset.from_list([json.loads(line) for line in f])

  precision = {"bf16": False, "gradient_checkpointing": False} if FLAGS.trl_float32 else {}
  evaluation = {}
  if eval_ids_file:
    evaluation = dict(
      eval_strategy="steps",
      eval_steps=eval_steps,
      per_device_eval_batch_size=w.batch_pairs,
    )
  args = trl.RewardConfig(
    output_dir=run_dir,
    per_device_train_batch_size=w.batch_pairs,
    max_steps=w.steps,
    max_length=w.seq_len,
    pad_to_multiple_of=w.seq_len if pad_full else None,
    save_strategy="no",
    report_to="none",
    logging_steps=max(w.steps // 4, 1),
    seed=0,
    use_cpu=True,
    **precision,
    **evaluation,
  )
  trainer = trl.RewardTrainer(
    model=model,
    args=args,
    train_dataset=read(ids_file),
    eval_dataset=read(eval_ids_file) if eval_ids_file else None,
    processing_class=ids_tokenizer(transformers, vocab),
    callbacks=[StepTimer()],
  )
  trainer.train()
  with open(out, "w") as f:
    json.dump(
      {
        "step_times": times,
        "bf16": bool(args.bf16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "train_pairs": len(trainer.train_dataset),
        "eval_steps": evaluation.get("eval_steps"),
        "eval_pairs": len(trainer.eval_dataset) if eval_ids_file else 0,
      },
      f,
    )


# ----------------------------------------------------------------------- subprocess runs


def run_child(role: str, w: Workload, workdir: str, tag: str, **extra) -> tuple[float, dict]:
  """Runs this script as ``--child=role`` in a fresh run folder; returns (wall s, its JSON).

  The JSON gets ``exit_s``: from the child's writing it (its last act) to the process's end,
  the interpreter's shutdown."""
  run_dir = os.path.join(workdir, "runs", tag)
  shutil.rmtree(run_dir, ignore_errors=True)
  os.makedirs(run_dir)
  out = os.path.join(run_dir, "child.json")
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={role}", f"--workdir={run_dir}"]
  cmd += [f"--data={FLAGS.data}", f"--out={out}", f"--jaxrm_cache_dir={FLAGS.jaxrm_cache_dir}"]
  if FLAGS.attention_query_block is not None:
    cmd += [f"--attention_query_block={FLAGS.attention_query_block}"]
  cmd += [f"--jaxrm_matmul_dtype={FLAGS.jaxrm_matmul_dtype}"]
  cmd += [f"--jaxrm_cpu_devices={FLAGS.jaxrm_cpu_devices}"]
  cmd += [f"--jaxrm_pack_pairs={FLAGS.jaxrm_pack_pairs}"]
  cmd += [f"--jaxrm_microbatch_size={FLAGS.jaxrm_microbatch_size}"]
  cmd += [f"--jaxrm_outputs={FLAGS.jaxrm_outputs}", f"--tokenizer={FLAGS.tokenizer}"]
  cmd += [f"--{k}={v}" for k, v in dataclasses.asdict(w).items()]
  cmd += [f"--{k}={v}" for k, v in extra.items()]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  wall, end = time.perf_counter() - start, time.time()
  if proc.returncode:
    raise RuntimeError(f"{role} child failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
  with open(out) as f:
    return wall, dict(json.load(f), exit_s=end - os.path.getmtime(out))


def trl_step_s(step_times: list[float]) -> float:
  """Median step time after two warm-up steps (all of them if there are fewer than three)."""
  return statistics.median(step_times[2:] if len(step_times) > 2 else step_times)


def model_config(w: Workload, max_len: int):
  """jaxrm's :class:`TransformerConfig` at the workload's shape (a preset's defaults)."""
  from jaxrm.models import presets

  shape = dict(num_layers=w.layers, width=w.width, num_heads=w.heads)
  return presets.preset("tiny", vocab_size=BYTE_VOCAB["vocab_size"], max_len=max_len, **shape)


def rm_flops_per_pair(w: Workload) -> float:
  """Forward+backward model FLOPs of one pair (two sequences) at the full length."""
  from jaxrm.models.presets import flops_per_token

  cfg = model_config(w, w.seq_len)
  return 2 * w.seq_len * flops_per_token(cfg, w.seq_len, head="reward", backward=True)


def one_round(
  name: str, w: Workload, r: int, ids: str, cache: dict, precisions: list[str]
) -> list[dict]:
  """One interleaved round of a workload: jaxrm step, TRL step (each of ``precisions``), jaxrm
  run, TRL run (each of ``precisions``)."""
  workdir, rows = FLAGS.workdir, []
  row = dict(workload=name, round=r)

  def trl(precision: str, workload: Workload, kind: str, **extra) -> tuple[str, float, dict]:
    side = TRL_PRECISIONS[precision]
    wall, res = run_child(
      "trl_train",
      workload,
      workdir,
      f"{name}_{side}_{kind}_{r}",
      ids_file=ids,
      trl_float32=precision == "float32",
      **extra,
    )
    return side, wall, res

  jx = jaxrm_step_times(w, FLAGS.data, workdir, FLAGS.step_reps, cache)
  rows.append(dict(row, side="jaxrm", kind="step", **jx))
  short = dataclasses.replace(w, steps=FLAGS.step_reps + 2)
  for p in precisions:
    side, _, tr = trl(p, short, "step", pad_full=True)
    rows.append(dict(row, side=side, kind="step", step_s=trl_step_s(tr["step_times"])))
  if w.steps:
    wall, res = run_child("jaxrm_train", w, workdir, f"{name}_jaxrm_e2e_{r}")
    rows.append(dict(row, side="jaxrm", kind="e2e", wall_s=wall, **res))
    held_out = {}
    if FLAGS.trl_evaluate:
      held_out = dict(eval_ids_file=heldout_ids_path(ids), eval_steps=trl_eval_steps(w))
    for p in precisions:
      side, wall, res = trl(p, w, "e2e", **held_out)
      res["step_s_median"] = trl_step_s(res.pop("step_times"))
      rows.append(dict(row, side=side, kind="e2e", wall_s=wall, **res))
  return rows


# -------------------------------------------------------------------------- the sampler


def sampler_rows(w: Workload, batches: list[int], peak: float) -> list[dict]:
  """Tokens/s of jaxrm's sampler and HF ``generate`` at each batch size (best of 2 calls
  after a warm-up each), both on the same prompts and model shape."""
  from benchmarks.timing import benchmark_sampler, sampler_prompts

  torch, transformers, _ = require_peer_packages()
  total = FLAGS.prompt_len + FLAGS.new_tokens
  cfg = model_config(w, total)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(
    gpt2_config(transformers, w, n_positions=total, num_labels=None)
  )
  model.eval()
  rows = []
  groups = FLAGS.sampler_thread_groups
  for b in batches:
    run = functools.partial(
      benchmark_sampler,
      cfg,
      batch=b,
      prompt_len=FLAGS.prompt_len,
      new_tokens=FLAGS.new_tokens,
      reps=2,
    )
    jx = run()
    row = dict(
      kind="sampler",
      batch=b,
      jaxrm_tokens_per_s=jx["sampler_tokens_per_s"],
      jaxrm_mfu=jx["sampler_flops_per_s"] / peak,
    )
    if groups > 1 and b % groups == 0:
      threads = run(thread_groups=groups)
      row["jaxrm_thread_groups"] = groups
      row["jaxrm_threads_tokens_per_s"] = threads["sampler_tokens_per_s"]
      row["jaxrm_threads_mfu"] = threads["sampler_flops_per_s"] / peak
    tokens, mask = sampler_prompts(
      vocab_size=BYTE_VOCAB["vocab_size"], batch=b, prompt_len=FLAGS.prompt_len
    )
    row["hf_tokens_per_s"] = (
      b * FLAGS.new_tokens / hf_generate_s(torch, model, tokens, mask, FLAGS.new_tokens)
    )
    rows.append(row)
  return rows


def hf_generate_s(torch, model, tokens, mask, new_tokens: int) -> float:
  """Best of two timed ``generate`` calls (after one warm-up) that each produce exactly
  ``new_tokens`` tokens per row, seconds."""
  ids, att = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
  kwargs = dict(
    attention_mask=att,
    max_new_tokens=new_tokens,
    min_new_tokens=new_tokens,
    do_sample=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    pad_token_id=0,
  )
  best = float("inf")
  with torch.no_grad():
    for i in range(3):
      start = time.perf_counter()
      out = model.generate(ids, **kwargs)
      if out.shape[1] != tokens.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - tokens.shape[1]} new tokens")
      if i:
        best = min(best, time.perf_counter() - start)
  return best


SEED_SWEEP_PAIRS = 64  # pairs per seed and step (seed_sweep.py's default)


def seed_sweep_shape() -> tuple[int, int, int]:
  """``--seed_sweep_proxy`` as ``(layers, width, heads)``; ``UsageError`` naming the flag."""
  parts = FLAGS.seed_sweep_proxy.split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(
      f"--seed_sweep_proxy={FLAGS.seed_sweep_proxy}: give layers x width x heads, e.g. 1x16x2"
    )
  return tuple(int(p) for p in parts)


def seed_sweep_rows(rounds: int) -> list[dict]:
  """Per round: one seed's time per step vmapped (a batch axis of one) and alone (its own
  unbatched program), then ``--seed_sweep_seeds`` seeds' in each ``--seed_sweep_thread_groups``
  count and ``--seed_sweep_seed_batches`` layout, each the second of two calls of
  ``--seed_sweep_steps`` steps (:func:`benchmarks.timing.seed_sweep_seconds`); ``ratio`` is
  the seeds' time per step over one seed's faster time in the same round."""
  from benchmarks.timing import seed_sweep_seconds, synthetic_sweep

  layers, width, heads = seed_sweep_shape()
  sweep, pairs, _ = synthetic_sweep(
    layers=layers, width=width, heads=heads, batch_size=SEED_SWEEP_PAIRS
  )
  seeds, steps = FLAGS.seed_sweep_seeds, FLAGS.seed_sweep_steps
  per_step = lambda **kw: seed_sweep_seconds(sweep, pairs, steps=steps, **kw)[1] / steps
  rows = []
  for r in range(rounds):
    vmapped, alone = per_step(seeds=1), per_step(seeds=1, seed_batch=1)
    one = min(vmapped, alone)
    for groups in (int(g) for g in FLAGS.seed_sweep_thread_groups):
      for batch in (int(b) for b in FLAGS.seed_sweep_seed_batches):
        seconds = per_step(seeds=seeds, thread_groups=groups, seed_batch=batch or None)
        rows.append(
          dict(
            kind="seed_sweep",
            round=r,
            proxy=FLAGS.seed_sweep_proxy,
            batch_pairs=SEED_SWEEP_PAIRS,
            seeds=seeds,
            thread_groups=groups,
            seed_batch=batch,
            one_seed_vmapped_step_s=vmapped,
            one_seed_alone_step_s=alone,
            one_seed_step_s=one,
            seeds_step_s=seconds,
            ratio=seconds / one,
          )
        )
  return rows


# --------------------------------------------------------------------------- the report


def summarise_seed_sweep(rows: list[dict]) -> list[dict]:
  """Per thread-group count and seed batch: medians over rounds of the times per step and of
  the ratio, and the per-round ratios in round order (``ratios``)."""
  med = statistics.median
  layout = lambda r: (r["thread_groups"], r["seed_batch"])
  times = ("one_seed_vmapped_step_s", "one_seed_alone_step_s", "one_seed_step_s", "seeds_step_s")
  out = []
  for key in dict.fromkeys(map(layout, rows)):
    mine = [r for r in rows if layout(r) == key]
    out.append(
      {k: mine[0][k] for k in ("proxy", "batch_pairs", "seeds", "thread_groups", "seed_batch")}
      | {k: med(r[k] for r in mine) for k in (*times, "ratio")}
      | dict(rounds=len(mine), ratios=[r["ratio"] for r in mine])
    )
  return out


def summarise(rows: list[dict], workloads: dict[str, Workload], peak: float) -> list[dict]:
  """Per workload: medians over rounds of pairs/s, FLOP utilisation and jaxrm/peer ratios.

  jaxrm's figures are ``jaxrm_*``; each peer side ``P`` in the rows (``trl``, ``trl_float32``)
  gets ``P_step_pairs_s``, ``P_step_flop_util``, ``P_step_ratio`` (jaxrm's speed over P's) and,
  with end-to-end rows, ``P_e2e_pairs_s``, ``P_e2e_wall_s``, ``P_e2e_flop_util``,
  ``P_e2e_ratio``, ``P_bf16``, ``P_gradient_checkpointing``. Each ratio is the median of the
  per-round ratios, which are kept in round order as ``P_step_ratios`` and ``P_e2e_ratios``.
  """
  med = statistics.median
  out = []
  for name, w in workloads.items():
    flops = rm_flops_per_pair(w)
    mine = [r for r in rows if r["workload"] == name]
    get = lambda side, kind, mine=mine: [r for r in mine if (r["side"], r["kind"]) == (side, kind)]
    s = dict(workload=name, **dataclasses.asdict(w))
    js, je = get("jaxrm", "step"), get("jaxrm", "e2e")
    s["jaxrm_step_pairs_s"] = med(w.batch_pairs / r["step_s"] for r in js)
    s["jaxrm_step_flop_util"] = s["jaxrm_step_pairs_s"] * flops / peak
    s["jaxrm_first_step_s"] = js[0]["first_step_s"]
    if je:
      s["jaxrm_e2e_pairs_s"] = med(w.steps * w.batch_pairs / r["wall_s"] for r in je)
      s["jaxrm_e2e_wall_s"] = med(r["wall_s"] for r in je)
      s["jaxrm_e2e_exit_s"] = med(r["exit_s"] for r in je)
      s["jaxrm_e2e_flop_util"] = s["jaxrm_e2e_pairs_s"] * flops / peak
    for side in dict.fromkeys(r["side"] for r in mine if r["side"] != "jaxrm"):
      ts, te = get(side, "step"), get(side, "e2e")
      s[f"{side}_step_pairs_s"] = med(w.batch_pairs / r["step_s"] for r in ts)
      s[f"{side}_step_flop_util"] = s[f"{side}_step_pairs_s"] * flops / peak
      s[f"{side}_step_ratios"] = [t["step_s"] / j["step_s"] for j, t in zip(js, ts)]
      s[f"{side}_step_ratio"] = med(s[f"{side}_step_ratios"])
      if je:
        s[f"{side}_e2e_pairs_s"] = med(w.steps * w.batch_pairs / r["wall_s"] for r in te)
        s[f"{side}_e2e_wall_s"] = med(r["wall_s"] for r in te)
        s[f"{side}_e2e_exit_s"] = med(r["exit_s"] for r in te)
        s[f"{side}_e2e_flop_util"] = s[f"{side}_e2e_pairs_s"] * flops / peak
        s[f"{side}_e2e_ratios"] = [t["wall_s"] / j["wall_s"] for j, t in zip(je, te)]
        s[f"{side}_e2e_ratio"] = med(s[f"{side}_e2e_ratios"])
        s[f"{side}_bf16"] = te[0]["bf16"]
        s[f"{side}_gradient_checkpointing"] = te[0]["gradient_checkpointing"]
        s[f"{side}_eval_steps"] = te[0].get("eval_steps")
    out.append(s)
  return out


def peer_sides(summary: dict) -> list[str]:
  """The peer sides (``trl``, ``trl_float32``) of one workload's summary, in run order."""
  return [k[: -len("_step_ratio")] for k in summary if k.endswith("_step_ratio")]


def ratio_cell(summary: dict, key: str, bold: bool = False) -> str:
  """``summary[key]`` as ``'1.85x'`` (``**`` around it with ``bold``), and with more than one
  round the range of the per-round ratios (``summary[key + 's']``): ``'1.85x (rounds
  1.81-2.33)'``."""
  text = f"{summary[key]:.2f}x"
  text = f"**{text}**" if bold else text
  rounds = summary[key + "s"]
  return text + (f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else "")


def print_table(
  summary: list[dict],
  sampler: list[dict],
  matmul_dtype: str = "float32",
  outputs: str = "full",
  seed_sweep: list[dict] = (),
) -> None:
  """The readable table (markdown) of the summary, sampler and seed-sweep rows: one column
  per peer side, each ratio jaxrm's speed over that peer's (the seed sweep's: the seeds' time
  per step over one seed's); ``matmul_dtype``: jaxrm's training runs' (the sampler's model
  is float32); ``outputs``: ``--jaxrm_outputs`` of its end-to-end runs."""
  sides = list(dict.fromkeys(p for s in summary for p in peer_sides(s)))
  jaxrm = "jaxrm" if matmul_dtype == "float32" else f"jaxrm ({matmul_dtype} matmuls)"
  print(
    f"| workload | measure | {jaxrm} | " + " | ".join(f"{p} | jaxrm / {p}" for p in sides) + " |"
  )
  print("|---|---|---|" + "---|---|" * len(sides))
  for s in summary:
    w = (
      f"{s['workload']} ({s['layers']}x{s['width']}, seq {s['seq_len']}, {s['batch_pairs']} pairs)"
    )
    step = [
      f"{s[p + '_step_pairs_s']:.3g} ({s[p + '_step_flop_util']:.0%}) | "
      + ratio_cell(s, f"{p}_step_ratio")
      for p in sides
    ]
    print(
      f"| {w} | step pairs/s (FLOP util.) | {s['jaxrm_step_pairs_s']:.3g} "
      f"({s['jaxrm_step_flop_util']:.0%}) | " + " | ".join(step) + " |"
    )
    print(
      f"| {w} | jaxrm first step s (compile) | {s['jaxrm_first_step_s']:.1f} |"
      + " | |" * len(sides)
    )
    if "jaxrm_e2e_wall_s" in s:
      e2e = [
        f"{s[p + '_e2e_pairs_s']:.3g} ({s[p + '_e2e_wall_s']:.1f}) | "
        + ratio_cell(s, f"{p}_e2e_ratio", bold=True)
        for p in sides
      ]
      every = next((s[p + "_eval_steps"] for p in sides if s.get(p + "_eval_steps")), None)
      held_out = f", TRL evaluating every {every}" if every else ""
      if outputs == "trl":
        held_out += ", jaxrm without figures or report"
      print(
        f"| {w} | end to end, {s['steps']} steps{held_out}: pairs/s (wall s) | "
        f"{s['jaxrm_e2e_pairs_s']:.3g} ({s['jaxrm_e2e_wall_s']:.1f}) | " + " | ".join(e2e) + " |"
      )
  fill = " | |" * (len(sides) - 1)
  for r in sampler:
    hf = f"HF generate {r['hf_tokens_per_s']:,.0f}"
    print(
      f"| sampler, batch {r['batch']} | tokens/s | {r['jaxrm_tokens_per_s']:,.0f} | {hf} | "
      f"{r['jaxrm_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x |" + fill
    )
    if "jaxrm_threads_tokens_per_s" in r:
      print(
        f"| sampler, batch {r['batch']}, {r['jaxrm_thread_groups']} thread groups | tokens/s | "
        f"{r['jaxrm_threads_tokens_per_s']:,.0f} | {hf} | "
        f"{r['jaxrm_threads_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x |" + fill
      )
  for r in seed_sweep:
    batch = r["seed_batch"]
    layout = (
      "vmapped" if batch == 0 else "one after another" if batch == 1 else f"{batch} at a time"
    )
    print(
      f"| seed sweep, {r['proxy']} proxy, {r['batch_pairs']} pairs per seed, {r['seeds']} seeds "
      f"in {r['thread_groups']} thread group(s), {layout} | ms per step | "
      f"{r['seeds_step_s'] * 1e3:.2f} | 1 seed {r['one_seed_step_s'] * 1e3:.2f} (vmapped "
      f"{r['one_seed_vmapped_step_s'] * 1e3:.2f}, alone {r['one_seed_alone_step_s'] * 1e3:.2f}) | "
      f"{ratio_cell(r, 'ratio')} one seed's time |" + fill
    )


def versions() -> dict:
  import jax

  torch, transformers, trl = require_peer_packages()
  return dict(
    jax=jax.__version__,
    torch=torch.__version__,
    transformers=transformers.__version__,
    trl=trl.__version__,
    python=platform.python_version(),
    cpus=os.cpu_count(),
    torch_threads=torch.get_num_threads(),
  )


def run_benchmark(workloads: dict[str, Workload], precisions: list[str]) -> None:
  """The parent process: ceiling, interleaved rounds, sampler, table and files."""
  import jax

  from benchmarks.timing import measure_matmul_flops
  from jaxrm.io import environment

  rounds = 1 if FLAGS.quick else FLAGS.rounds
  if FLAGS.quick:
    FLAGS.step_reps, FLAGS.matmul_size, FLAGS.new_tokens, FLAGS.prompt_len = 2, 512, 8, 8
    FLAGS.seed_sweep_steps = 5
  batches = [int(b) for b in FLAGS.sampler_batches]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  info = versions()
  print(
    " | ".join(f"{k} {v}" for k, v in info.items()),
    f"| device {jax.devices()[0]}",
    f"| jaxrm's devices {jax.device_count()}",
  )
  print("allocator (both sides' processes inherit it):", environment.allocator())
  peak = measure_matmul_flops(FLAGS.matmul_size, 5)
  print(f"float32 matmul ceiling ({FLAGS.matmul_size}^2, best of 5): {peak / 1e9:.1f} GFLOP/s")
  peak_bf16 = None
  if FLAGS.jaxrm_matmul_dtype == "bfloat16":  # the FLOP utilisation stays against float32's
    peak_bf16 = measure_matmul_flops(FLAGS.matmul_size, 5, dtype=jax.numpy.bfloat16)
    print(f"bfloat16 (float32 sums) matmul ceiling: {peak_bf16 / 1e9:.1f} GFLOP/s")
  rows, cache = [], {}
  ids = {
    w.seq_len: export_token_ids(FLAGS.data, w.seq_len, FLAGS.workdir, FLAGS.tokenizer)
    for w in workloads.values()
  }
  with open(vocab_path(next(iter(ids.values()))[0])) as f:
    vocab = json.load(f)
  print(
    f"tokens: {vocab['tokenizer']} ({vocab['vocab_size']:,} ids, pad {vocab['pad_id']}, "
    f"eos {vocab['eos_id']}), jaxrm's ids on both sides"
  )
  if FLAGS.jaxrm_cache_dir:  # what a second run of the same script finds
    for name, w in workloads.items():
      if w.steps:
        run_child("jaxrm_train", w, FLAGS.workdir, f"{name}_jaxrm_fill_cache")
  for r in range(rounds):
    for name, w in workloads.items():
      new = one_round(name, w, r, ids[w.seq_len][0], cache, precisions)
      for row in new:
        print(json.dumps(row, default=float), flush=True)
      rows += new
  sampler_w = WORKLOADS["quick" if FLAGS.quick else FLAGS.sampler_workload]
  # Before the sampler: no torch computation has run in this process yet.
  sweeps = seed_sweep_rows(rounds) if FLAGS.seed_sweep_seeds else []
  sampler = sampler_rows(sampler_w, batches, peak) if batches else []
  summary = summarise(rows, workloads, peak)
  seed_sweep = summarise_seed_sweep(sweeps)
  print_table(summary, sampler, FLAGS.jaxrm_matmul_dtype, FLAGS.jaxrm_outputs, seed_sweep)
  with open(os.path.join(FLAGS.workdir, "peer_results.jsonl"), "w") as f:
    for row in rows + sampler + sweeps:
      f.write(json.dumps(row, default=float) + "\n")
  with open(os.path.join(FLAGS.workdir, "peer_summary.json"), "w") as f:
    json.dump(
      dict(
        versions=info,
        environment=environment.environment(),
        matmul_flops_per_s=peak,
        matmul_flops_per_s_bfloat16=peak_bf16,
        train_pairs={k: v[1] for k, v in ids.items()},
        tokens=vocab,
        workloads=summary,
        sampler=sampler,
        sampler_shape=dataclasses.asdict(sampler_w),
        seed_sweep=seed_sweep,
        jaxrm_compile_cache=FLAGS.jaxrm_cache_dir or "off (cold compile in every run)",
        jaxrm_matmul_dtype=FLAGS.jaxrm_matmul_dtype,
        jaxrm_cpu_devices=FLAGS.jaxrm_cpu_devices,
        jaxrm_pack_pairs=FLAGS.jaxrm_pack_pairs,
        jaxrm_microbatch_size=FLAGS.jaxrm_microbatch_size,
        jaxrm_outputs=FLAGS.jaxrm_outputs,
        trl_precisions={p: TRL_PRECISIONS[p] for p in precisions},
        argv=sys.argv,
      ),
      f,
      indent=1,
    )


def trl_precisions() -> list[str]:
  """``--trl_precisions`` checked (``--trl_float32`` alone: ``['float32']``)."""
  precisions = FLAGS.trl_precisions
  if FLAGS.trl_float32 and FLAGS["trl_precisions"].using_default_value:
    precisions = ["float32"]
  unknown = [p for p in precisions if p not in TRL_PRECISIONS]
  if unknown or not precisions or len(set(precisions)) < len(precisions):
    raise app.UsageError(
      f"--trl_precisions={','.join(precisions)}: give distinct settings of {sorted(TRL_PRECISIONS)}"
    )
  return precisions


def check_seed_sweep_flags() -> None:
  """The seed sweep's flags, each refused by name."""
  seeds = FLAGS.seed_sweep_seeds
  if seeds < 0:
    raise app.UsageError(f"--seed_sweep_seeds must be >= 0, got {seeds}")
  if FLAGS.seed_sweep_steps < 1:
    raise app.UsageError(f"--seed_sweep_steps must be >= 1, got {FLAGS.seed_sweep_steps}")
  _, width, heads = seed_sweep_shape()
  if width % heads:
    raise app.UsageError(f"--seed_sweep_proxy={FLAGS.seed_sweep_proxy}: heads must divide width")
  groups = FLAGS.seed_sweep_thread_groups
  if seeds and not all(g.isdigit() and int(g) >= 1 and seeds % int(g) == 0 for g in groups):
    raise app.UsageError(
      f"--seed_sweep_thread_groups={','.join(groups)}: give counts >= 1 that divide "
      f"--seed_sweep_seeds={seeds}"
    )
  batches = FLAGS.seed_sweep_seed_batches
  if seeds and not (batches and all(b.isdigit() for b in batches)):
    raise app.UsageError(
      f"--seed_sweep_seed_batches={','.join(batches)}: give seed batches >= 0 (0: all seeds)"
    )


def check_data_file(path: str) -> None:
  if not os.path.isfile(path):
    raise app.UsageError(f"--data: no such file {path!r}")
  with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
    first = f.readline()
  try:
    row = json.loads(first)
  except json.JSONDecodeError:
    raise app.UsageError(f"--data: {path!r} does not start with a JSON line") from None
  if not {"chosen", "rejected"} <= set(row):
    raise app.UsageError(f"--data: {path!r} lines need 'chosen' and 'rejected' fields")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if FLAGS.sampler_thread_groups < 1:
    raise app.UsageError(f"--sampler_thread_groups must be >= 1, got {FLAGS.sampler_thread_groups}")
  if FLAGS.attention_query_block is not None and FLAGS.attention_query_block < 0:
    raise app.UsageError(f"--attention_query_block must be >= 0, got {FLAGS.attention_query_block}")
  if FLAGS.jaxrm_cpu_devices < 1:
    raise app.UsageError(f"--jaxrm_cpu_devices must be >= 1, got {FLAGS.jaxrm_cpu_devices}")
  if FLAGS.jaxrm_pack_pairs < 0:
    raise app.UsageError(f"--jaxrm_pack_pairs must be >= 0, got {FLAGS.jaxrm_pack_pairs}")
  if FLAGS.jaxrm_microbatch_size < -1:
    raise app.UsageError(
      f"--jaxrm_microbatch_size must be >= -1 (-1: the hh config's), got "
      f"{FLAGS.jaxrm_microbatch_size}"
    )
  check_seed_sweep_flags()
  check_data_file(FLAGS.data)
  if FLAGS.tokenizer and not os.path.isfile(os.path.join(FLAGS.tokenizer, "tokenizer.json")):
    raise app.UsageError(f"--tokenizer: {FLAGS.tokenizer!r} is not a folder with tokenizer.json")
  workloads = resolve_workloads()
  bad = [n for n, w in workloads.items() if w.batch_pairs % FLAGS.jaxrm_cpu_devices]
  if bad:
    raise app.UsageError(
      f"--jaxrm_cpu_devices={FLAGS.jaxrm_cpu_devices} must divide the pairs per step of {bad}"
    )
  if not FLAGS.child:
    check_microbatch_size(workloads)
  precisions = trl_precisions()
  if FLAGS.child:
    w = Workload(**{k: FLAGS[k].value for k in Workload.__dataclass_fields__})
  if FLAGS.child == "trl_train":  # neither jax nor jaxrm in TRL's timed process
    trl_train_child(
      w,
      FLAGS.ids_file,
      FLAGS.workdir,
      FLAGS.out,
      pad_full=FLAGS.pad_full,
      eval_ids_file=FLAGS.eval_ids_file,
      eval_steps=FLAGS.eval_steps,
    )
    return
  import jax  # before any jax computation: the device count is fixed at the backend's start

  jax.config.update("jax_num_cpu_devices", FLAGS.jaxrm_cpu_devices)
  if FLAGS.child == "jaxrm_train":  # no torch in jaxrm's process: its imports cost seconds
    jaxrm_train_child(w, FLAGS.data, FLAGS.workdir, FLAGS.out)
    return
  if FLAGS.trl_evaluate:
    for w in workloads.values():
      if w.steps:
        trl_eval_steps(w)
  require_peer_packages()
  run_benchmark(workloads, precisions)


if __name__ == "__main__":
  app.run(main)
