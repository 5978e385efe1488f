"""Helpers shared by the training-loop tests."""

import contextlib

from jaxrm.io import rundir


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
