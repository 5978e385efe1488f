"""Readable samples of policy and best-of-n runs: decoded prompt, response, reward and gold.

Runs that generate text write ``<workdir>/samples.jsonl``, one strict-JSON object per sample:
``step``, ``index`` (the sample's position in its batch), ``prompt`` and ``response`` (decoded
with the run tokenizer, special tokens dropped; the synthetic world's token ids as a
space-separated string), ``response_tokens`` (its length in tokens, EOS included), ``reward``
(what the run optimises) and ``gold`` (the synthetic world's gold reward, or null when none is
known), plus any extra fields of the caller. A resumed run first drops the rows after its
restored step (:meth:`SampleWriter.truncate`), so the file never holds a step twice. The first
``SamplesConfig.log`` samples of each write are also logged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np

from jaxrm.io import rundir

SAMPLES_FILE = "samples.jsonl"


@dataclasses.dataclass
class SamplesConfig:
  """When and how many decoded samples a run writes.

  Attributes:
    every: period in steps (also at the last step); 0 writes none.
    num: samples per write (the first ``num`` prompts of the step's batch).
    log: samples per write shown in the log.
    max_chars: longest prompt shown in the log (its end is kept).
  """

  every: int = 50
  num: int = 4
  log: int = 2
  max_chars: int = 300


def validate_samples_config(c: SamplesConfig, *, prefix: str = "samples") -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the first bad field."""
  for name, low in (("every", 0), ("num", 1), ("log", 0), ("max_chars", 1)):
    value = getattr(c, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise rundir.ConfigError(f"{prefix}.{name}", value, f"must be an int >= {low}")


def synthetic_decode(ids: Any) -> str:
  """The synthetic world's tokens as a space-separated string of ids."""
  return " ".join(str(int(i)) for i in ids)


def decode_samples(
  tokens: np.ndarray,
  mask: np.ndarray,
  response_mask: np.ndarray,
  decode: Callable[[Any], str],
) -> list[dict[str, Any]]:
  """``{'prompt', 'response', 'response_tokens'}`` per row of ``[batch, seq]`` arrays."""
  tokens, mask, response_mask = (np.asarray(x) for x in (tokens, mask, response_mask))
  out = []
  for row, m, r in zip(tokens, mask.astype(bool), response_mask.astype(bool)):
    prompt = row[m & ~r]
    response = row[r]
    out.append(
      {
        "prompt": decode(prompt),
        "response": decode(response),
        "response_tokens": int(r.sum()),
      }
    )
  return out


def shorten(text: str, max_chars: int) -> str:
  """``text``, or its last ``max_chars`` characters after an ellipsis."""
  return text if len(text) <= max_chars else "…" + text[-max_chars:]


class SampleWriter:
  """Appends decoded samples to ``<workdir>/samples.jsonl`` (flushed per write)."""

  def __init__(self, workdir: str | os.PathLike, config: SamplesConfig):
    self.path = os.path.join(os.fspath(workdir), SAMPLES_FILE)
    self.config = config

  def truncate(self, max_step: int) -> int:
    """Drops rows after ``max_step`` (a resumed run re-writes them); returns how many."""
    return rundir.truncate_metrics(self.path, max_step=max_step)

  def due(self, step: int, last_step: int) -> bool:
    """Whether step ``step`` (1-based count of steps done) writes samples."""
    every = self.config.every
    return every > 0 and (step % every == 0 or step == last_step)

  def write(
    self,
    step: int,
    rows: list[Mapping[str, Any]],
    *,
    rewards: Any,
    gold: Any = None,
    **columns: Any,
  ) -> list[dict[str, Any]]:
    """Writes ``rows`` (from :func:`decode_samples`) with their rewards; returns the rows.

    Args:
      step: the run's step.
      rows: decoded samples.
      rewards: ``[n]`` rewards.
      gold: ``[n]`` gold rewards or None.
      **columns: more ``[n]`` columns (e.g. ``kl``).
    """
    rewards = np.asarray(rewards, np.float64)
    out = []
    for i, row in enumerate(rows):
      record = {"step": int(step), "index": i, **row, "reward": float(rewards[i])}
      record["gold"] = None if gold is None else float(np.asarray(gold)[i])
      for k, v in columns.items():
        record[k] = rundir.to_json(np.asarray(v)[i].item())
      out.append(rundir.to_json(record))
    with open(self.path, "a") as f:
      for record in out:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    for record in out[: self.config.log]:
      gold_text = "" if record["gold"] is None else f" gold {record['gold']:.4g}"
      logging.info(
        "sample at step %d | reward %.4g%s | %d tokens\n  prompt: %r\n  response: %r",
        step,
        record["reward"],
        gold_text,
        record["response_tokens"],
        shorten(record["prompt"], self.config.max_chars),
        record["response"],
      )
    return out
