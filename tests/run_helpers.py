"""Helpers shared by the training-loop tests, and a counter of JAX's compile events."""

import contextlib
import os
import shutil

import jax
import pytest

from jaxrm.io import rundir
from jaxrm.steps import microbatch

LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # jax.monitoring's event names
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def saved_without(monkeypatch, field: str):
  """Inside the block, runs write their config (``config.json`` and the checkpoints' copy)
  without the dotted ``field``, as runs saved before the field existed did."""
  config_to_json = rundir.config_to_json
  *parents, name = field.split(".")

  def without_the_field(config):
    out = config_to_json(config)
    node = out
    for part in parents:
      if not isinstance(node.get(part), dict):
        return out
      node = node[part]
    node.pop(name, None)
    return out

  with monkeypatch.context() as patch:
    patch.setattr(rundir, "config_to_json", without_the_field)
    yield


def resume_after_the_field_was_added(
  monkeypatch, train, config, changed, workdir, *, field: str, value: str, last_step: int
):
  """A run of ``config`` saved without the dotted ``field`` (:func:`saved_without`) and
  crashed after its second-to-last checkpoint (``last_step`` removed): resuming with
  ``changed`` (``field`` set to ``value``) is refused naming the field, and resuming with
  ``config`` continues. Returns that run's summary."""
  with saved_without(monkeypatch, field):
    train(config, workdir)
  saved = rundir.read_checkpoint_extra(workdir, last_step)["config"]
  *parents, name = field.split(".")
  for part in parents:
    saved = saved[part]
  assert name not in saved
  shutil.rmtree(os.path.join(workdir, rundir.CHECKPOINT_DIR, str(last_step)))
  with pytest.raises(rundir.ConfigError, match=f"{field}='{value}'.*<absent>"):
    train(changed, workdir)
  return train(config, workdir)


@contextlib.contextmanager
def recorded(event: str):
  """Inside the block, the list it yields gets the keyword arguments of every ``event``
  (e.g. :data:`LOWERING`) that ``jax.monitoring`` reports."""
  seen = []

  def listener(name, duration, **kwargs):
    if name == event:
      seen.append(kwargs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def slice_sizes(monkeypatch) -> list[int]:
  """From here on, each trace of a microbatched step appends the examples per slice
  (:func:`jaxrm.steps.microbatch.accumulate`'s parts) to the list returned."""
  sizes = []
  accumulate = microbatch.accumulate

  def traced(grad_fn, params, parts, *args, **kwargs):
    sizes.append(jax.tree.leaves(parts)[0].shape[1])
    return accumulate(grad_fn, params, parts, *args, **kwargs)

  monkeypatch.setattr(microbatch, "accumulate", traced)
  return sizes
