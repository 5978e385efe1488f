"""The benchmarks' HH run config, its backbone shape given on the command line
(``--shape=LAYERSxWIDTHxHEADS``) as a preset, and its ``--microbatch_size`` flag."""

import re

from absl import app

from experiments.configs import reward_model as rm_configs
from jaxrm.models import presets
from jaxrm.steps import microbatch


def shape_preset(shape: str, max_len: int) -> str:
  """Registers ``shape`` (``LAYERSxWIDTHxHEADS``) as a preset of ``max_len`` tokens and returns
  its name; raises ``app.UsageError`` naming ``--shape`` when it is malformed."""
  match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", shape)
  layers, width, heads = (int(g) for g in match.groups()) if match else (0, 0, 0)
  if not (layers and width and heads) or width % heads:
    raise app.UsageError(
      f"--shape={shape}: give LAYERSxWIDTHxHEADS, positive, the heads dividing the width"
    )
  name = f"phases_{shape}"
  presets.PRESETS[name] = (layers, width, heads, max_len)
  return name


def hh_config(*, data: str, max_len: int, batch_size: int, matmul_dtype: str, shape: str):
  """The ``hh`` config (``experiments/configs/reward_model.py``) on ``data`` with these
  settings; ``shape`` ``''`` keeps its preset."""
  config = rm_configs.get_config("hh")
  config.data.files = (data,)
  config.data.max_len = max_len
  config.batch_size = batch_size
  config.model.matmul_dtype = matmul_dtype
  if shape:
    config.model.preset = shape_preset(shape, max_len)
  return config


def hh_microbatch_size(value: int) -> int:
  """A benchmark's microbatch setting: -1 is the hh config's, else ``value`` itself."""
  return rm_configs.get_config("hh").microbatch_size if value == -1 else value


MICROBATCH_HELP = (
  "Pairs per forward and backward slice of the step (TrainConfig.microbatch_size; 0: the whole "
  "batch at once); -1: the hh config's."
)


def microbatch_size(flag, batch_pairs: int, *, batch_flag: str = "batch_pairs") -> int:
  """The ``--microbatch_size`` flag (:data:`MICROBATCH_HELP`) resolved, -1 as the hh config's;
  raises ``app.UsageError`` naming it when it is below -1 or splits the ``batch_pairs`` of
  ``--<batch_flag>`` unevenly."""
  if flag.value < -1:
    raise app.UsageError(f"--{flag.name} must be >= -1 (-1: the hh config's), got {flag.value}")
  size = hh_microbatch_size(flag.value)
  if not microbatch.is_valid_size(size, batch_pairs):
    hh = f" (the hh config's {size})" if flag.value == -1 else ""
    raise app.UsageError(
      f"--{flag.name}={flag.value}{hh}: pairs per slice must divide the {batch_pairs} of "
      f"--{batch_flag} or be at least that many (0: the whole batch)"
    )
  return size
