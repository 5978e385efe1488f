"""The environment record written beside study results."""

import json

import jax
import numpy as np

from jaxrm.io.environment import environment


def test_environment_names_versions_and_devices():
  env = environment()
  json.dumps(env)  # JSON-able
  assert env["jax"] == jax.__version__ and env["numpy"] == np.__version__
  assert env["backend"] == jax.default_backend()
  assert env["device_count"] == len(jax.devices()) == 8  # tests force 8 host devices
  assert env["cpu"] and env["cpu_count"] >= 1
