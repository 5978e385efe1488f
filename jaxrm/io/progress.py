"""A training loop's progress line: throughput and ETA measured from the end of the first
step this process ran, so compilation is not counted (:class:`Progress`); re-exported by
:mod:`jaxrm.io.rundir`."""

from __future__ import annotations

from collections.abc import Mapping
import math
import time
from typing import Any

import numpy as np


def format_duration(seconds: float | None) -> str:
  """``h:mm:ss``, or ``-`` when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "-"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Throughput and ETA of a loop, compilation excluded.

  Call :meth:`start` once the first step of this process has finished (its result fetched
  or blocked on): rates count only the steps after it, so the compile time of the first step
  never enters the ETA. :meth:`exclude` removes time spent outside training (evaluation,
  checkpoints).

  Args:
    total_steps: the step the loop ends at.
    items_per_step: examples per step (pairs, sequences) for the ``items/s`` rate.
    clock: a ``time.perf_counter``-like function (tests pass a fake one).
  """

  def __init__(self, total_steps: int, *, items_per_step: int = 1, clock=time.perf_counter):
    self.total_steps = total_steps
    self.items_per_step = items_per_step
    self._clock = clock
    self._t0: float | None = None
    self._step0 = 0
    self._excluded = 0.0

  def start(self, step: int) -> None:
    """Marks the end of this process's first finished step (``step`` steps done)."""
    if self._t0 is None:
      self._t0, self._step0 = self._clock(), step

  def exclude(self, seconds: float) -> None:
    """Removes ``seconds`` (evaluation, checkpoint writes) from the measured time."""
    if self._t0 is not None:
      self._excluded += seconds

  def steps_per_sec(self, step: int) -> float | None:
    """Steps per second since :meth:`start`, or None before a second step has finished."""
    if self._t0 is None or step <= self._step0:
      return None
    return (step - self._step0) / max(self._clock() - self._t0 - self._excluded, 1e-9)

  def items_per_sec(self, step: int) -> float | None:
    rate = self.steps_per_sec(step)
    return None if rate is None else rate * self.items_per_step

  def eta(self, step: int) -> float | None:
    """Seconds left at the measured rate, or None while unknown."""
    rate = self.steps_per_sec(step)
    return None if rate is None else (self.total_steps - step) / rate

  def line(self, step: int, metrics: Mapping[str, Any] = (), *, unit: str = "steps") -> str:
    """``step 20/100 | loss 0.6931 | 120.0 pairs/s | ETA 0:01:05`` (the one progress line)."""
    parts = [f"step {step}/{self.total_steps}"]
    for key, value in dict(metrics).items():
      if value is None:
        parts.append(f"{key} nan")
      elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        parts.append(f"{key} {int(value)}")
      else:
        parts.append(f"{key} {float(value):.4g}")
    rate = self.items_per_sec(step)
    parts.append(f"{'-' if rate is None else f'{rate:.1f}'} {unit}/s")
    parts.append(f"ETA {format_duration(self.eta(step))}")
    return " | ".join(parts)
