"""Tests for jaxrm.io.hf: Hugging Face checkpoints in and out, against reference logits.

The fixtures under tests/data/hf/ are tiny random checkpoints saved by Hugging Face
transformers, with logits computed by the transformers implementation in float32
(tests/data/hf/make_fixtures.py; torch is needed only to regenerate them).
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from jaxrm.io import hf
from jaxrm.math.preference import bradley_terry_loss
from jaxrm.models.policy import PolicyModel
from jaxrm.models.presets import preset
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.sampling import sample, sample_with_apply_fn
from jaxrm.steps import parallel
from jaxrm.steps.rm_step import reward_model_step
from jaxrm.steps.train_state import create_train_state

DATA = os.path.join(os.path.dirname(__file__), "data", "hf")
POLICIES = ["gpt2", "llama", "qwen2", "mistral"]
REWARDS = ["gpt2_reward", "llama_reward"]


def _reference(name):
  d = os.path.join(DATA, name)
  load = lambda f: np.load(os.path.join(d, f))
  return load("reference_tokens.npy"), load("reference_mask.npy"), load("reference_logits.npy")


def _all_tensors(path):
  return hf.load_tensors(path)


@pytest.mark.parametrize("name", POLICIES)
def test_imported_policy_matches_transformers_logits(name):
  model = hf.import_policy(os.path.join(DATA, name))
  tokens, mask, want = _reference(name)
  logits, values = PolicyModel(model.config).apply(model.variables, tokens, mask)
  assert values is None and logits.shape == want.shape
  np.testing.assert_allclose(np.asarray(logits)[mask], want[mask], atol=1e-4, rtol=1e-4)
  assert np.abs(want).max() > 1.0  # the reference is not trivially small


@pytest.mark.parametrize("name", REWARDS)
def test_imported_reward_model_matches_sequence_classification_scores(name):
  model = hf.import_reward_model(os.path.join(DATA, name))
  tokens, mask, want = _reference(name)
  assert not mask[1].all()  # row 1 is right-padded: the score is read at its last real token
  rewards = RewardModel(model.config).apply(model.variables, tokens, mask)
  np.testing.assert_allclose(np.asarray(rewards), want, atol=1e-4, rtol=1e-4)


def test_family_options_are_read_from_config_json():
  llama = hf.import_policy(os.path.join(DATA, "llama")).config
  assert (llama.norm, llama.mlp, llama.num_heads, llama.kv_heads) == ("rmsnorm", "swiglu", 4, 2)
  assert llama.rope_base == 500000.0 and llama.rope_scaling.kind == "llama3"
  assert not llama.tie_embeddings and not llama.qkv_bias
  qwen = hf.import_policy(os.path.join(DATA, "qwen2")).config
  assert qwen.qkv_bias and not qwen.attn_out_bias and qwen.tie_embeddings
  assert qwen.rope_scaling.kind == "linear" and qwen.rope_scaling.factor == 2.0
  gpt2 = hf.import_policy(os.path.join(DATA, "gpt2")).config
  assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.tie_embeddings) == (
    "learned",
    "layernorm",
    "gelu",
    True,
  )
  assert os.path.isfile(os.path.join(DATA, "llama", "model.safetensors.index.json"))  # sharded


@pytest.mark.parametrize("name", POLICIES)
def test_export_policy_reproduces_the_checkpoint_tensors_and_reimports_exactly(name, tmp_path):
  src = os.path.join(DATA, name)
  model = hf.import_policy(src)
  hf.export_policy(
    tmp_path,
    model.config,
    model.variables,
    model_type=model.model_type,
    base_config=model.hf_config,
  )
  want, got = _all_tensors(src), load_file(os.path.join(tmp_path, "model.safetensors"))
  assert sorted(got) == sorted(want)
  for n in want:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)
  again = hf.import_policy(tmp_path)
  assert again.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again.variables, model.variables)


@pytest.mark.parametrize("name", REWARDS)
def test_export_reward_model_round_trips_exactly(name, tmp_path):
  src = os.path.join(DATA, name)
  model = hf.import_reward_model(src)
  hf.export_reward_model(
    tmp_path,
    dataclasses.replace(model.config, attention_query_block=4),  # how, not what: exports
    model.variables,
    model_type=model.model_type,
    base_config=model.hf_config,
  )
  cfg = json.load(open(os.path.join(tmp_path, "config.json")))
  assert cfg["architectures"][0].endswith("ForSequenceClassification") and cfg["num_labels"] == 1
  want, got = _all_tensors(src), load_file(os.path.join(tmp_path, "model.safetensors"))
  assert sorted(got) == sorted(want)
  for n in want:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)
  again = hf.import_reward_model(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, again.variables, model.variables)


def test_reward_model_from_a_causal_lm_has_the_lm_backbone_and_a_zero_head():
  path = os.path.join(DATA, "llama")
  rm = hf.import_reward_model(path)
  policy = hf.import_policy(path, value_head=True)
  jax.tree.map(
    np.testing.assert_array_equal,
    rm.variables["params"]["backbone"],
    policy.variables["params"]["backbone"],
  )
  assert not np.asarray(rm.variables["params"]["head"]["kernel"]).any()
  tokens, mask, _ = _reference("llama")
  np.testing.assert_array_equal(RewardModel(rm.config).apply(rm.variables, tokens, mask), 0.0)
  _, values = PolicyModel(policy.config, value_head=True).apply(policy.variables, tokens, mask)
  np.testing.assert_array_equal(values, 0.0)


def test_bfloat16_import_stores_bfloat16_params_and_stays_close():
  model = hf.import_policy(
    os.path.join(DATA, "llama"), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16
  )
  assert {x.dtype for x in jax.tree.leaves(model.variables)} == {jnp.dtype(jnp.bfloat16)}
  tokens, mask, want = _reference("llama")
  logits, _ = PolicyModel(model.config).apply(model.variables, tokens, mask)
  err = np.abs(np.asarray(logits) - want)[mask]
  assert err.max() < 0.1 * np.abs(want).max(), err.max()


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(DATA, name), dst)
  return dst


def test_missing_tensor_error_names_checkpoint_tensor_and_shape(tmp_path):
  dst = _copy("qwen2", tmp_path)
  tensors = load_file(dst / "model.safetensors")
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(
    ValueError, match=r"qwen2.*'model\.layers\.1\.self_attn\.k_proj\.bias' is missing.*\(16,\)"
  ):
    hf.import_policy(dst)


def test_tensors_the_config_does_not_use_are_named_in_a_warning(tmp_path, caplog):
  # weights of a third layer with num_hidden_layers=2 would otherwise be dropped silently
  dst = _copy("qwen2", tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
  save_file(tensors, dst / "model.safetensors")
  with caplog.at_level("WARNING"):
    hf.import_policy(dst)
  assert "1 tensors not used: model.layers.2.mlp.up_proj.weight" in caplog.text


def test_wrong_shape_and_unknown_architecture_errors(tmp_path):
  dst = _copy("gpt2", tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors["transformer.ln_f.weight"] = np.ones(31, np.float32)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(
    ValueError, match=r"'transformer\.ln_f\.weight' has shape \(31,\), expected \(32,\)"
  ):
    hf.import_policy(dst)
  cfg = json.load(open(dst / "config.json"))
  cfg["model_type"] = "bert"
  json.dump(cfg, open(dst / "config.json", "w"))
  with pytest.raises(ValueError, match=r"gpt2.*unsupported architecture model_type='bert'"):
    hf.import_policy(dst)
  with pytest.raises(ValueError, match="has no config.json"):
    hf.import_policy(tmp_path / "nowhere")


def _damage_weights(dst, how):
  shard = dst / "model-00002-of-00002.safetensors"  # the llama fixture is sharded
  if how == "truncated":
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
  else:  # a clone without git-lfs holds pointers
    shard.write_text("version https://git-lfs.github.com/spec/v1\n")


def _damage_config(dst, field, value):
  cfg = json.load(open(dst / "config.json"))
  if value is None:
    del cfg[field]
  else:
    cfg[field] = value
  json.dump(cfg, open(dst / "config.json", "w"))


@pytest.mark.parametrize(
  "damage, message",
  [
    (
      lambda d: _damage_weights(d, "truncated"),
      "model-00002-of-00002.safetensors is not a readable safetensors",
    ),
    (lambda d: _damage_weights(d, "lfs"), "model-00002-of-00002.safetensors is a Git LFS pointer"),
    (lambda d: _damage_config(d, "hidden_size", None), "config.json has no field 'hidden_size'"),
    (
      lambda d: _damage_config(d, "num_hidden_layers", "2x"),
      "config.json field 'num_hidden_layers' must be an integer, got '2x'",
    ),
    (
      lambda d: _damage_config(d, "rope_parameters", {"rope_type": "llama3"}),
      "config.json rope_parameters has no field 'factor'",
    ),
    (
      lambda d: (d / "model.safetensors.index.json").write_text("{not json"),
      "model.safetensors.index.json is not valid JSON",
    ),
  ],
)
def test_a_damaged_checkpoint_is_one_error_naming_the_file_or_field(tmp_path, damage, message):
  dst = _copy("llama", tmp_path)
  damage(dst)
  with pytest.raises(ValueError, match=rf"checkpoint '{dst}': {message}"):
    hf.import_policy(dst)


def test_export_refuses_a_folder_that_is_not_empty(tmp_path):
  # a previous sharded checkpoint's index would be read instead of the new weights
  model = hf.import_policy(os.path.join(DATA, "llama"))
  out = tmp_path / "out"
  out.mkdir()
  (out / "model.safetensors.index.json").write_text("{}")
  with pytest.raises(ValueError, match="is not empty .*model.safetensors.index.json"):
    hf.export_policy(out, model.config, model.variables, model_type="llama")
  hf.export_policy(tmp_path / "new", model.config, model.variables, model_type="llama")
  assert sorted(os.listdir(tmp_path / "new")) == ["config.json", "model.safetensors"]


def test_export_rejects_a_config_the_family_cannot_express(tmp_path):
  cfg = preset("tiny", vocab_size=64)  # rotary LayerNorm GELU, untied, head bias: no HF family
  with pytest.raises(
    ValueError, match=r"cannot be exported as model_type='llama'.*norm='layernorm'"
  ):
    hf.export_policy(tmp_path, cfg, {"params": {}}, model_type="llama")


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_kv_cached_sampler_matches_full_forward_sampler_with_gqa(name):
  model = hf.import_policy(os.path.join(DATA, name))
  assert model.config.kv_heads < model.config.num_heads
  tokens, _, _ = _reference(name)
  prompt = tokens[:, :5].copy()
  mask = np.ones_like(prompt, bool)
  mask[1, :2] = False  # left padding
  kwargs = dict(max_new_tokens=6, eos_id=2, top_k=20)
  cached = sample(model.variables, prompt, mask, jax.random.key(3), config=model.config, **kwargs)
  full = sample_with_apply_fn(
    PolicyModel(model.config).apply, model.variables, prompt, mask, jax.random.key(3), **kwargs
  )
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.logprobs, full.logprobs, atol=1e-4)


@pytest.mark.parametrize("mode", ["shard_map", "fsdp"])
def test_reward_model_step_on_imported_gpt2_matches_single_device(mode):
  model = hf.import_reward_model(os.path.join(DATA, "gpt2_reward"))
  # SGD, not Adam: the key bias has an exactly-zero gradient (softmax is shift-invariant) that
  # Adam would turn into +-lr steps from rounding noise, which differs between summation orders.
  opt = optax.sgd(0.1)
  step = functools.partial(
    reward_model_step,
    apply_fn=RewardModel(model.config).apply,
    loss_fn=bradley_terry_loss,
    optimizer=opt,
  )
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 13, size=(2, 16))
  mask = np.arange(12)[None, None] < lengths[..., None]
  toks = np.where(mask, rng.integers(3, 320, size=(2, 16, 12)), 0).astype(np.int32)
  batch = {"chosen": toks[0], "chosen_mask": mask[0], "rejected": toks[1], "rejected_mask": mask[1]}

  def run(mode, **kw):
    pstep = parallel.make_parallel_step(step, mode=mode, **kw)
    state = pstep.put_state(create_train_state(model.variables, opt, jax.random.key(0)))
    for _ in range(2):
      state, metrics = pstep(state, pstep.shard_batch(batch))
    return state, jax.device_get(pstep.unreplicate(metrics)), pstep

  ref, ref_m, _ = run("jit")
  got, got_m, pstep = run(mode, **({"fsdp_min_size": 1024} if mode == "fsdp" else {}))
  np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), jax.device_get(ref.params), model.variables
  )
  assert max(jax.tree.leaves(moved)) > 1e-3  # training moved the parameters
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    jax.device_get(pstep.unreplicate(got).params),
    jax.device_get(ref.params),
  )
  if mode == "fsdp":  # the token embedding (the tied LM head) is split over the devices
    wte = got.params["params"]["backbone"]["embed"]["embedding"]
    assert wte.addressable_shards[0].data.size * 8 == wte.size
