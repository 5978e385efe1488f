"""Tests for jaxrm.io.rm_io: config JSON, loading reward-model runs and ensembles."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.io import rm_io
from jaxrm.io.checkpoint import CheckpointManager
from jaxrm.models import ensemble
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import RopeScaling, TransformerConfig
from jaxrm.steps import train_state

CFG = TransformerConfig(vocab_size=11, num_layers=1, width=8, num_heads=2, max_len=12)


def tokens_and_mask(seed=0, b=4, s=7):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, size=(b, s)).astype(np.int32)
  mask = np.arange(s)[None, :] < rng.integers(1, s + 1, size=(b, 1))
  return tokens, mask


@functools.cache
def jitted(cfg, pooling):
  """(init, apply, make_state) of RewardModel(cfg, pooling), compiled once per architecture.

  ``make_state(params, delta, key)`` is the TrainState (AdamW) of ``params + delta``.
  """
  model = RewardModel(cfg, pooling=pooling)

  def make_state(params, delta, key):
    params = jax.tree.map(lambda x: x + delta, params)
    return train_state.create_train_state(params, optax.adamw(1e-3), key)

  return jax.jit(model.init), jax.jit(model.apply), jax.jit(make_state)


def write_run(
  workdir, seed, *, cfg=CFG, pooling="last", steps=(3,), accuracies=None, tokenizer="synthetic"
):
  """Saves a tiny RM TrainState per step (params perturbed per step) like the RM script."""
  model = RewardModel(cfg, pooling=pooling)
  tokens, mask = tokens_and_mask()
  params = jitted(cfg, pooling)[0](jax.random.key(seed), tokens, mask)
  saved = {}
  with CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=None) as ckpt:
    for i, step in enumerate(steps):
      state = jitted(cfg, pooling)[2](params, jnp.float32(0.01 * step), jax.random.key(seed))
      p = state.params
      metrics = {"eval_accuracy": accuracies[i]} if accuracies else {}
      ckpt.save(
        step,
        state,
        {
          "model_config": rm_io.config_to_json(cfg),
          "pooling": pooling,
          "tokenizer": tokenizer,
          "data": {"epoch": 0},
          "metrics": metrics,
        },
      )
      saved[step] = p
  return model, saved


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_config_round_trips_through_json(dtype):
  cfg = TransformerConfig(
    vocab_size=259, num_layers=2, width=16, num_heads=4, max_len=64, position="learned", dtype=dtype
  )
  d = rm_io.config_to_json(cfg)
  assert d["dtype"] == jnp.dtype(dtype).name
  assert rm_io.config_from_json(json.loads(json.dumps(d))) == cfg


def test_llama_family_config_round_trips_through_json():
  cfg = TransformerConfig(
    vocab_size=259,
    num_layers=2,
    width=16,
    num_heads=4,
    max_len=64,
    num_kv_heads=2,
    norm="rmsnorm",
    mlp="swiglu",
    mlp_dim=24,
    rope_scaling=RopeScaling("llama3", 8.0),
    param_dtype=jnp.bfloat16,
    tie_embeddings=True,
    head_bias=False,
  )
  d = json.loads(json.dumps(rm_io.config_to_json(cfg)))
  assert d["param_dtype"] == "bfloat16" and d["rope_scaling"]["kind"] == "llama3"
  assert rm_io.config_from_json(d) == cfg
  with pytest.raises(ValueError, match="'rope_scaling' is malformed"):
    rm_io.config_from_json({**d, "rope_scaling": {"kind": "linear", "scale": 2.0}})


def test_config_from_json_names_bad_fields():
  d = rm_io.config_to_json(CFG)
  with pytest.raises(ValueError, match="unknown fields \\['depth'\\]"):
    rm_io.config_from_json({**d, "depth": 3})
  with pytest.raises(ValueError, match="'dtype' must be one of"):
    rm_io.config_from_json({**d, "dtype": "float16"})
  with pytest.raises(ValueError, match="incomplete"):
    rm_io.config_from_json({k: v for k, v in d.items() if k != "width"})


def test_loaded_reward_model_applies_like_the_saved_one(tmp_path):
  model, saved = write_run(str(tmp_path), 0, pooling="mean", steps=(2, 5))
  apply_fn, params, extra = rm_io.load_reward_model(str(tmp_path))
  assert extra["step"] == 5 and extra["pooling"] == "mean" and extra["tokenizer"] == "synthetic"
  tokens, mask = tokens_and_mask(1)
  np.testing.assert_array_equal(
    jax.jit(apply_fn)(params, tokens, mask), jitted(CFG, "mean")[1](saved[5], tokens, mask)
  )


def test_which_best_picks_the_checkpoint_with_the_best_eval_accuracy(tmp_path):
  _, saved = write_run(str(tmp_path), 0, steps=(1, 2, 3), accuracies=[0.6, 0.8, 0.7])
  _, params, extra = rm_io.load_reward_model(str(tmp_path), which="best")
  assert extra["step"] == 2
  jax.tree.map(np.testing.assert_array_equal, params, saved[2])
  _, _, extra = rm_io.load_reward_model(str(tmp_path), which="best", best_mode="min")
  assert extra["step"] == 1
  with pytest.raises(ValueError, match="metrics\\['loss'\\]"):
    rm_io.load_reward_model(str(tmp_path), which="best", best_metric="loss")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  _, saved = write_run(str(tmp_path), 0, steps=(1, 2))
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"garbage")
  _, params, extra = rm_io.load_reward_model(str(tmp_path))
  assert extra["step"] == 1
  jax.tree.map(np.testing.assert_array_equal, params, saved[1])
  assert (tmp_path / "checkpoints" / "2").exists()  # loading never modifies the run


def test_ensemble_stacks_members_and_applies_each(tmp_path):
  dirs = [str(tmp_path / f"rm{i}") for i in range(3)]
  models = [write_run(d, i) for i, d in enumerate(dirs)]
  apply_fn, stacked = rm_io.load_reward_ensemble(dirs)
  assert ensemble.ensemble_size(stacked) == 3
  tokens, mask = tokens_and_mask(2)
  got = jax.jit(lambda p: ensemble.apply_ensemble(apply_fn, p, tokens, mask))(stacked)
  want = np.stack([jitted(CFG, "last")[1](s[3], tokens, mask) for _, s in models])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_ensemble_members_with_different_architectures_raise(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  write_run(a, 0)
  write_run(
    b, 1, cfg=TransformerConfig(vocab_size=11, num_layers=1, width=16, num_heads=2, max_len=12)
  )
  with pytest.raises(ValueError, match="model_config of .*b is"):
    rm_io.load_reward_ensemble([a, b])
  with pytest.raises(ValueError, match="non-empty list"):
    rm_io.load_reward_ensemble(a)


def test_missing_run_directory_and_bad_which_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a reward-model run directory"):
    rm_io.load_reward_model(str(tmp_path / "nope"))
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    rm_io.load_reward_model(str(tmp_path / "empty"))
  write_run(str(tmp_path / "run"), 0)
  with pytest.raises(ValueError, match="which must be one of"):
    rm_io.load_reward_model(str(tmp_path / "run"), which="first")


def test_malformed_extra_names_the_missing_field(tmp_path):
  tokens, mask = tokens_and_mask()
  params = jitted(CFG, "last")[0](jax.random.key(0), tokens, mask)
  state = jitted(CFG, "last")[2](params, jnp.float32(0.0), jax.random.key(0))
  with CheckpointManager(os.path.join(tmp_path, "checkpoints")) as ckpt:
    ckpt.save(1, state, {"model_config": rm_io.config_to_json(CFG)})
  with pytest.raises(ValueError, match="missing the field 'pooling'"):
    rm_io.load_reward_model(str(tmp_path))


def test_params_changed_after_saving_are_detected_and_the_previous_step_loaded(tmp_path):
  # Silent damage, made deterministic: step 2's arrays are swapped for other, well-formed
  # arrays of the same shapes (orbax reads them without complaint); its digests stay.
  _, saved = write_run(str(tmp_path / "run"), 0, steps=(1, 2))
  write_run(str(tmp_path / "other"), 1, steps=(2,))
  state_dir = tmp_path / "run" / "checkpoints" / "2" / "state"
  shutil.rmtree(state_dir)
  shutil.copytree(tmp_path / "other" / "checkpoints" / "2" / "state", state_dir)
  _, params, extra = rm_io.load_reward_model(str(tmp_path / "run"))
  assert extra["step"] == 1 and "__integrity__" not in extra
  jax.tree.map(np.testing.assert_array_equal, params, saved[1])


def test_read_extra_hides_the_digest_record_and_detects_an_edited_json(tmp_path):
  write_run(str(tmp_path), 0, steps=(1, 2))
  assert "__integrity__" not in rm_io.read_extra(str(tmp_path))
  path = tmp_path / "checkpoints" / "2" / "extra" / "metadata"
  path.write_text(path.read_text().replace('"pooling": "last"', '"pooling": "mean"'))
  assert rm_io.read_extra(str(tmp_path))["step"] == 1
