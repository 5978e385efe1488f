"""Backbone shapes given on the command line (``--shape=LAYERSxWIDTHxHEADS``) as presets."""

import re

from absl import app

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
