"""``jaxrm.data.pairs.validate_fixed_length_rl``: the RL settings of the synthetic studies."""

import pytest

from jaxrm.data import synthetic
from jaxrm.data.pairs import validate_fixed_length_rl
from jaxrm.io.rundir import ConfigError
from jaxrm.steps.rl import RLConfig

WORLD = synthetic.WorldConfig()


def test_accepts_the_worlds_fixed_length():
  validate_fixed_length_rl(
    RLConfig(max_new_tokens=WORLD.response_len, eos_id=None), WORLD, field="ppo"
  )


@pytest.mark.parametrize(
  "rl, field, fragment",
  [
    ("ppo", "ppo", "must be a jaxrm.steps.rl.RLConfig"),
    (RLConfig(max_new_tokens=WORLD.response_len + 1), "ppo.max_new_tokens", "response_len=12"),
    (RLConfig(max_new_tokens=WORLD.response_len, eos_id=3), "ppo.eos_id", "must be None"),
  ],
)
def test_rejects_with_the_field_named(rl, field, fragment):
  with pytest.raises(ConfigError) as e:
    validate_fixed_length_rl(rl, WORLD, field="ppo")
  assert e.value.field == field and fragment in str(e.value)


def test_reruns_the_configs_own_checks_after_overrides():
  rl = RLConfig(max_new_tokens=WORLD.response_len)
  rl.num_minibatches = 0  # as a command-line override sets it, past __post_init__
  with pytest.raises(ConfigError) as e:
    validate_fixed_length_rl(rl, WORLD, field="rl")
  assert e.value.field == "rl"
