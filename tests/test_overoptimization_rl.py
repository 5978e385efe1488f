"""Tests of the over-optimisation study's RL stage (experiments/overoptimization_rl.py)."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ensembles_rl
from experiments import overoptimization_lib as lib
from experiments import overoptimization_rl as orl
from jaxrm.data import synthetic
from jaxrm.io import program_cache
from jaxrm.io.rundir import ConfigError
from jaxrm.models.policy import transformer_policy

WORLD = {
  "num_calibration": 256,
  "policy_layers": 1,
  "policy_width": 16,
  "gold_layers": 1,
  "gold_width": 32,
}


def _config(**kw):
  cfg = lib.StudyConfig(
    world=synthetic.WorldConfig(**WORLD),
    num_comparisons=128,
    num_heldout=64,
    num_seeds=2,
    rm_epochs=1,
    rm_batch_size=32,
    proxy_sizes=("1x8x2",),
    rl_steps=8,
    rl_batch_size=8,
    rl_learning_rate=3e-3,
    rl_log_every=4,
    rl_eval_prompts=32,
    kl_sweep=(0.0, 3.0),
    world_seeds=(kw.pop("world_seed", 0),),  # a per-world config, as the study's stages get
  )
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("overopt_rl"))
  cfg = _config()
  lib.validate(cfg)
  data = lib.build_world(cfg, workdir)
  proxies = lib.train_proxies(cfg, data, workdir)
  out = orl.run_rl(cfg, data, proxies, workdir)
  return cfg, data, proxies, workdir, out


def test_output_follows_the_contract_schema(study):
  cfg, _, _, _, out = study
  windows = cfg.rl_steps // cfg.rl_log_every
  np.testing.assert_array_equal(out["step"], [4, 8])
  names = ["L1W8", "gold", "L1W8_kl0", "L1W8_kl3", "gold_kl0", "gold_kl3"]
  assert list(out["arms"]) == names == list(out["arm_info"])
  assert out["arm_info"]["L1W8_kl3"] == {"reward": "L1W8", "kl_coef": 3.0}
  assert out["arm_info"]["gold"] == {"reward": "gold", "kl_coef": 0.0}
  for arm in out["arms"].values():
    assert set(arm) == set(orl.CURVE_KEYS)
    for v in arm.values():
      assert v.shape == (cfg.num_seeds, windows) and np.all(np.isfinite(v))
  gold = out["arms"]["gold"]
  np.testing.assert_allclose(gold["proxy"], gold["gold"], atol=1e-5)  # the oracle optimises gold
  back = json.loads(json.dumps(orl.to_json(out)))
  np.testing.assert_array_equal(back["arms"]["L1W8_kl3"]["gold"], out["arms"]["L1W8_kl3"]["gold"])
  assert back["arm_info"] == out["arm_info"] and back["step"] == [4, 8]
  # Same seeds, same keys, same reward: the default arm (kl_coef 0) is the sweep's kl0 arm.
  for k in orl.CURVE_KEYS:
    np.testing.assert_array_equal(out["arms"]["gold"][k], out["arms"]["gold_kl0"][k])


def test_gold_parts_sum_to_gold(study):
  for arm in study[-1]["arms"].values():
    np.testing.assert_allclose(arm["gold_rest"] + arm["gold_feature"], arm["gold"], atol=2e-5)


def test_a_kl_penalty_ends_at_lower_kl_on_the_same_seeds(study):
  arms = study[-1]["arms"]
  for reward in ("L1W8", "gold"):
    free, penalised = arms[f"{reward}_kl0"], arms[f"{reward}_kl3"]
    assert np.all(free["kl_exact"][:, -1] > 0.05), free["kl_exact"]  # the policy moved
    assert np.all(penalised["kl_exact"][:, -1] < free["kl_exact"][:, -1]), reward


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_heldout_gold_and_exact_kl_match_an_independent_computation(study):
  cfg, data, proxies, _, _ = study
  wc = cfg.world
  size, proxy = cfg.sizes[0], proxies[0]
  traces = dict(orl.TRACES)
  # 6 members (3 KL coefficients x 2 seeds), the shape of run_rl's L1W8 group: no new compile.
  curves, states = orl.train_members(
    cfg,
    data,
    size,
    jax.tree.map(lambda x: jnp.concatenate([x] * 3), proxy["params"]),
    np.array([0.0, 0.0, 0.5, 0.5, 3.0, 3.0]),
    jax.random.split(jax.random.key(5), 6),
  )
  assert orl.TRACES == traces
  prompts, key = orl.eval_batch(cfg)
  # The eval prompts are the fixed held-out batch, not the training stream.
  np.testing.assert_array_equal(prompts, orl.eval_batch(cfg)[0])
  policy = transformer_policy(wc.policy_config(), value_head=True)
  for i in (0, 3):
    params = jax.tree.map(lambda x, i=i: x[i], states.params)
    b = prompts.shape[0]
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(b))
    out = policy.sample(
      params,
      prompts,
      jnp.ones(prompts.shape, bool),
      keys,
      max_new_tokens=12,
      eos_id=None,
      temperature=1.0,
    )
    gold = np.asarray(synthetic.gold_reward(data.world, wc, out.tokens, out.mask), np.float64)
    np.testing.assert_allclose(curves["gold"][i, -1], gold.mean(), rtol=1e-5, atol=1e-5)
    member = jax.tree.map(lambda x, i=i: x[i % 2], proxy["params"])
    score = lib.proxy_model(cfg, size).apply(member, out.tokens, out.mask)
    np.testing.assert_allclose(curves["proxy"][i, -1], np.mean(score), rtol=1e-5, atol=1e-5)
    # Exact sequence KL in float64 from the full next-token distributions.
    logits, _ = policy.apply(params, out.tokens, out.mask)
    ref_logits, _ = policy.apply(
      orl.start_params(cfg, data), out.tokens, out.mask
    )  # pi_init (zero value head)
    p = wc.prompt_len
    lp = _np_log_softmax(np.asarray(logits, np.float64)[:, p - 1 : -1])
    lq = _np_log_softmax(np.asarray(ref_logits, np.float64)[:, p - 1 : -1])
    kl = (np.exp(lp) * (lp - lq)).sum(-1).sum(-1)  # [b]
    np.testing.assert_allclose(curves["kl_exact"][i, -1], kl.mean(), rtol=1e-4, atol=1e-6)
    tok = np.asarray(out.tokens)[:, p:]
    k1 = np.take_along_axis(lp - lq, tok[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(curves["kl_k1"][i, -1], k1.mean(), rtol=1e-4, atol=1e-5)
    assert kl.mean() > 1e-3  # the policy moved, so the check is not 0 == 0


def test_resuming_from_cached_arms_gives_identical_curves(study):
  cfg, data, proxies, workdir, out = study
  copy = workdir + "_resume"
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "rl", "gold_kl3.npz"))  # one arm of the gold group lost
  again = orl.run_rl(cfg, data, proxies, copy)
  for arm, curves in out["arms"].items():
    for k, v in curves.items():
      np.testing.assert_array_equal(again["arms"][arm][k], v, err_msg=f"{arm} {k}")
  # The lost arm is written again.
  assert os.path.exists(os.path.join(copy, "rl", "gold_kl3.npz"))


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("rl_algorithm", "trpo", "rl_algorithm"),
    ("rl_eval_prompts", 0, "rl_eval_prompts"),
    ("kl_sweep", (0.1, -1.0), "kl_sweep"),
    ("kl_sweep", (0.1, 0.1), "kl_sweep"),
    ("kl_sweep_reward", "L9W9", "kl_sweep_reward"),
    ("rl_compile_opt_level", 7, "rl_compile_opt_level"),
  ],
)
def test_bad_rl_fields_name_the_field(field, value, message):
  cfg = _config(**{field: value})
  with pytest.raises(ConfigError, match=message):
    orl.validate_rl(cfg)


def test_sweep_reward_defaults_to_the_smallest_but_one_proxy():
  assert orl.sweep_reward(_config(proxy_sizes=("2x32x4", "1x4x1", "1x8x2"))) == "L1W8"
  assert orl.sweep_reward(_config(kl_sweep_reward="2x32x4", proxy_sizes=("2x32x4",))) == "L2W32"
  assert "L1W8_kl1" in orl.arms(lib.StudyConfig())
  assert len(lib.StudyConfig().kl_sweep) >= 4


def test_another_world_reuses_the_compiled_chunk(study):
  cfg, _, _, workdir, _ = study
  other = _config(world_seed=1)
  data = lib.build_world(other, workdir + "_world1")
  traces = dict(orl.TRACES)
  n = 3 * other.num_seeds  # the gold group's member count
  stacked = jax.tree.map(lambda x: jnp.stack([x] * n), data.world)
  keys = jax.random.split(jax.random.key(0), n)
  curves, _ = orl.train_members(other, data, None, stacked, np.zeros(n), keys)
  assert orl.TRACES == traces  # world 1's parameters are arguments of world 0's program
  assert np.all(np.isfinite(curves["gold"]))


def test_rloo_is_a_config_value(study):
  """A grouped algorithm without a value head: ``num_samples`` rows per prompt, same outputs."""
  _, data, _, _, _ = study
  cfg = _config(rl_algorithm="rloo", rl_steps=2, rl_log_every=2)
  orl.validate_rl(cfg)
  assert not isinstance(orl.start_params(cfg, data)["params"].get("value_head"), dict)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * 2), data.world)
  curves, _ = orl.train_members(
    cfg, data, None, stacked, np.zeros(2), jax.random.split(jax.random.key(0), 2)
  )
  assert set(curves) == set(orl.CURVE_KEYS) | {"train_proxy"}
  for v in curves.values():
    assert v.shape == (2, 1) and np.all(np.isfinite(v))
  assert np.all(curves["kl_exact"] > 0)  # one update moved the policy


def test_training_leaves_the_callers_keys_and_coefficients_usable(study):
  """The chunk donates the members' states; the keys and KL coefficients the caller passed in
  are not those states' buffers, so they survive the call (the same seeds can train again)."""
  _, data, _, _, _ = study
  cfg = _config(rl_algorithm="rloo", rl_steps=2, rl_log_every=2)  # test_rloo's program
  stacked = jax.tree.map(lambda x: jnp.stack([x] * 2), data.world)
  keys, coefs = jax.random.split(jax.random.key(0), 2), jnp.zeros(2)
  first, _ = orl.train_members(cfg, data, None, stacked, coefs, keys)
  assert not keys.is_deleted() and not coefs.is_deleted()
  again, _ = orl.train_members(cfg, data, None, stacked, coefs, keys)
  for k, v in first.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def _in_a_new_process(monkeypatch, cfg, data, size, params, n, **kw):
  """``train(**more)``: ``train_members`` of ``n`` members as a new process runs it (a fresh
  ``chunk_fn`` cache), keys ``split(key(0), n)``, KL coefficients 0; returns the curves."""

  def train(**more):
    monkeypatch.setattr(orl, "chunk_fn", functools.cache(orl.chunk_fn.__wrapped__))
    keys = jax.random.split(jax.random.key(0), n)
    return orl.train_members(cfg, data, size, params, np.zeros(n), keys, **kw, **more)[0]

  return train


def _assert_stored_then_loaded(train, expected, store):
  """The first ``train()`` stores one ``rl_chunk`` program in ``store``, the second loads it
  without tracing; both give ``expected``'s curves bit for bit."""
  stored = train()
  (name,) = os.listdir(store)
  assert name.startswith("rl_chunk-")
  traces = dict(orl.TRACES)
  loaded = train()
  assert orl.TRACES == traces and os.listdir(store) == [name]
  for curves in (stored, loaded):
    assert set(curves) == set(expected)
    for k, v in expected.items():
      np.testing.assert_array_equal(curves[k], v, err_msg=k)


def test_a_later_process_loads_the_stored_chunk_without_tracing_it(study, tmp_path, monkeypatch):
  """With the scripts' program cache on (jaxrm.io.program_cache), the first process stores the
  chunk's lowered program; a later one (here: a fresh chunk_fn cache) loads it instead of
  tracing the chunk, and trains to the same curves as jax.jit, bit for bit."""
  cfg, data, _, _, _ = study
  n = 3 * cfg.num_seeds  # the gold group's member count
  worlds = jax.tree.map(lambda x: jnp.stack([x] * n), data.world)
  train = _in_a_new_process(monkeypatch, cfg, data, None, worlds, n)
  monkeypatch.setattr(program_cache, "_directory", None)  # restored after the test
  expected = train()  # jax.jit
  program_cache.enable(str(tmp_path))
  _assert_stored_then_loaded(train, expected, tmp_path)


def test_a_named_custom_reward_is_stored_and_loaded_like_the_others(study, tmp_path, monkeypatch):
  """An ensemble objective (a custom reward_fn) with its reward_key: the first process stores
  the chunk, a later one loads it without tracing, and both train to jax.jit's curves bit for
  bit. Without the key nothing is stored: plain jax.jit, traced in every process."""
  cfg, data, proxies, _, _ = study
  size, proxy = cfg.sizes[0], proxies[0]
  m, k = 2, cfg.num_seeds  # 2 members, each an ensemble of the proxy's seeds
  reward = ensembles_rl.ensemble_reward(cfg.world, size)
  params = {
    "params": jax.tree.map(lambda x: jnp.stack([x] * m), proxy["params"]),
    "mean": jnp.zeros((m, k)),
    "std": jnp.ones((m, k)),
    "kind": jnp.array([1, 3], jnp.int32),  # mean, uncertainty-weighted
    "coef": jnp.full((m,), 0.5, jnp.float32),
  }
  train = _in_a_new_process(
    monkeypatch, cfg, data, size, params, m, evaluate=False, reward_fn=reward
  )
  with pytest.raises(ValueError, match="reward_key='x' names a reward_fn, but reward_fn is None"):
    orl.train_members(cfg, data, size, params, np.zeros(m), jnp.zeros(m), reward_key="x")
  monkeypatch.setattr(program_cache, "_directory", None)  # restored after the test
  program_cache.enable(str(tmp_path))
  expected = train()  # no key: jax.jit
  assert os.listdir(tmp_path) == []
  _assert_stored_then_loaded(lambda: train(reward_key=ensembles_rl.REWARD_KEY), expected, tmp_path)
