"""The benchmarks' HH run config, its backbone shape given on the command line
(``--shape=LAYERSxWIDTHxHEADS``) as a preset."""

import re

from absl import app

from experiments.configs import reward_model as rm_configs
from jaxrm.models import presets


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
