"""Tests for jaxrm.math.pg_losses: values and gradients against float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxrm.math import pg_losses as pg


def _mask(rng, batch, seq):
  """Random contiguous response masks (left prompt, right padding) plus one empty row."""
  rows = []
  for _ in range(batch - 1):
    start = rng.integers(0, seq - 1)
    end = rng.integers(start + 1, seq + 1)
    row = np.zeros(seq, bool)
    row[start:end] = True
    rows.append(row)
  rows.append(np.zeros(seq, bool))
  return np.stack(rows)


def _np_weights(mask, aggregation):
  """d aggregate / d x: the weight of every token in the masked aggregate."""
  m = mask.astype(np.float64)
  if aggregation == "token_mean":
    return m / max(m.sum(), 1.0)
  per_seq = m.sum(1, keepdims=True)
  num_seqs = max(np.sum(per_seq > 0), 1)
  return m / np.maximum(per_seq, 1.0) / num_seqs


def _np_aggregate(x, mask, aggregation):
  return np.sum(np.where(mask, x, 0.0) * _np_weights(mask, aggregation))


def _np_ppo(logp, old_logp, a, mask, eps, aggregation):
  ratio = np.exp(logp - old_logp)
  unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
  per_token = -np.minimum(unclipped, clipped)
  uses_unclipped = unclipped <= clipped
  grad = np.where(uses_unclipped, -ratio * a, 0.0) * _np_weights(mask, aggregation)
  aux = {
    "clip_fraction": _np_aggregate((clipped < unclipped).astype(float), mask, aggregation),
    "approx_kl": _np_aggregate(ratio - 1 - np.log(ratio), mask, aggregation),
    "ratio_mean": _np_aggregate(ratio, mask, aggregation),
  }
  return _np_aggregate(per_token, mask, aggregation), grad, aux


def _np_value(values, old_values, returns, mask, eps, aggregation):
  v_clip = old_values + np.clip(values - old_values, -eps, eps)
  e_u, e_c = (values - returns) ** 2, (v_clip - returns) ** 2
  per_token = 0.5 * np.maximum(e_u, e_c)
  inside = np.abs(values - old_values) < eps
  grad = np.where(e_u >= e_c, values - returns, (v_clip - returns) * inside)
  grad = grad * _np_weights(mask, aggregation)
  frac = _np_aggregate((~inside & (e_c > e_u)).astype(float), mask, aggregation)
  return _np_aggregate(per_token, mask, aggregation), grad, frac


AGGS = ["token_mean", "seq_mean"]


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("aggregation", AGGS)
def test_masked_aggregate_matches_numpy_and_ignores_masked_values(aggregation):
  rng = np.random.default_rng(0)
  mask = _mask(rng, 5, 7)
  x = rng.normal(size=mask.shape)
  expected = _np_aggregate(x, mask, aggregation)
  if aggregation == "token_mean":
    np.testing.assert_allclose(expected, x[mask].mean())
  else:
    np.testing.assert_allclose(expected, np.mean([x[i][mask[i]].mean() for i in range(4)]))
  fn = jax.jit(functools.partial(pg.masked_aggregate, aggregation=aggregation))
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  np.testing.assert_allclose(fn(poisoned, mask), expected, rtol=1e-5)
  np.testing.assert_allclose(fn(poisoned, mask.astype(np.float32)), expected, rtol=1e-5)
  # Invariant to extra padding columns and to fully padded rows.
  padded = np.pad(poisoned, ((0, 2), (0, 3)), constant_values=1e9)
  padded_mask = np.pad(mask, ((0, 2), (0, 3)))
  np.testing.assert_allclose(fn(padded, padded_mask), expected, rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGS)
def test_masked_aggregate_of_an_empty_mask_is_zero(aggregation):
  got = pg.masked_aggregate(jnp.ones((2, 3)), jnp.zeros((2, 3), bool), aggregation=aggregation)
  assert float(got) == 0.0


def test_masked_aggregate_rejects_unknown_aggregation_and_bad_shapes():
  with pytest.raises(ValueError, match="aggregation"):
    pg.masked_aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), aggregation="sum")
  with pytest.raises(ValueError, match=r"x must have shape \[batch, seq\], got \(3,\)"):
    pg.masked_aggregate(jnp.ones(3), jnp.ones(3))
  with pytest.raises(ValueError, match=r"mask must have the shape of x \(2, 3\), got \(2, 4\)"):
    pg.masked_aggregate(jnp.ones((2, 3)), jnp.ones((2, 4)))


@pytest.mark.parametrize("aggregation", AGGS)
def test_pmean_of_sharded_aggregate_and_its_gradient_equal_the_global_batch(aggregation):
  # Data parallelism: a replicated parameter, per-token inputs sharded over 8 devices with
  # different token counts per shard; pmean of the per-shard loss (and gradient) must equal
  # the loss (and gradient) of the whole batch. check_vma=False keeps per-device gradients
  # (the pmap convention that lax.pmean of gradients assumes); with check_vma=True, shard_map
  # itself sums the gradients of replicated inputs over the axis.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(1)
  mask = _mask(rng, 16, 6)
  feats = rng.normal(size=mask.shape).astype(np.float32)
  adv = rng.normal(size=mask.shape).astype(np.float32)
  theta = jnp.float32(0.7)

  def loss(theta, feats, adv, mask, axis_name=None):
    logp = theta * feats - theta**2
    return pg.reinforce_loss(logp, adv, mask, aggregation=aggregation, axis_name=axis_name)

  def per_shard(theta, feats, adv, mask):
    value, grad = jax.value_and_grad(loss)(theta, feats, adv, mask, "data")
    return jax.lax.pmean(value, "data"), jax.lax.pmean(grad, "data")

  sharded = jax.jit(
    jax.shard_map(
      per_shard,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )
  value, grad = sharded(theta, feats, adv, mask)
  expected_value, expected_grad = jax.value_and_grad(loss)(theta, feats, adv, mask)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5)


# ----------------------------------------------------------------------------- PPO policy
@pytest.mark.parametrize("aggregation", AGGS)
def test_ppo_policy_loss_value_aux_and_gradient_match_numpy(aggregation):
  rng = np.random.default_rng(2)
  mask = _mask(rng, 6, 8)
  old_logp = np.log(rng.uniform(0.05, 1.0, size=mask.shape))
  logp = old_logp + rng.normal(scale=0.3, size=mask.shape)  # many ratios outside [0.8, 1.2]
  a = rng.normal(size=mask.shape)
  expected, expected_grad, expected_aux = _np_ppo(logp, old_logp, a, mask, 0.2, aggregation)
  assert 0.1 < expected_aux["clip_fraction"] < 0.9  # both regimes are exercised.
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(pg.ppo_policy_loss, clip_eps=0.2, aggregation=aggregation))
    (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(logp, old_logp, a, mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)
    for key, value in expected_aux.items():
      np.testing.assert_allclose(aux[key], value, rtol=1e-12, err_msg=key)
    # Finite differences agree as well (no ratio sits on a clipping kink).
    check_grads(lambda lp: fn(lp, old_logp, a, mask)[0], (logp,), order=1, modes=["rev"])
  loss32, _ = pg.ppo_policy_loss(
    logp.astype(np.float32),
    old_logp.astype(np.float32),
    a.astype(np.float32),
    mask,
    clip_eps=0.2,
    aggregation=aggregation,
  )
  np.testing.assert_allclose(loss32, expected, rtol=1e-5)


def test_ppo_gradient_is_zero_where_ratio_is_clipped_in_the_advantage_direction():
  log_ratio = np.log(np.array([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9]]))
  a = np.array([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]])
  mask = np.ones_like(a, bool)
  old_logp = np.full_like(a, -1.0)
  fn = jax.jit(functools.partial(pg.ppo_policy_loss, clip_eps=0.2))
  grad = jax.grad(lambda lp: fn(lp, old_logp, a, mask)[0])(old_logp + log_ratio)
  # Clipped in the advantage's direction: (1.5, A>0) and (0.5, A<0) -> no gradient.
  # Outside the region against the advantage, or inside it: gradient -ratio * A / num_tokens.
  expected = np.array([[0.0, 1.5, 0.0, -0.5, -1.1, 0.9]]) / 6.0
  np.testing.assert_allclose(grad, expected, rtol=1e-5)
  _, aux = fn(old_logp + log_ratio, old_logp, a, mask)
  np.testing.assert_allclose(aux["clip_fraction"], 2.0 / 6.0, rtol=1e-6)


def test_ppo_masked_positions_have_zero_gradient_even_when_they_hold_nan():
  rng = np.random.default_rng(3)
  mask = _mask(rng, 4, 6)
  logp = np.log(rng.uniform(0.1, 1.0, size=mask.shape)).astype(np.float32)
  old = (logp + rng.normal(scale=0.1, size=mask.shape)).astype(np.float32)
  a = rng.normal(size=mask.shape).astype(np.float32)
  fn = jax.jit(functools.partial(pg.ppo_policy_loss, clip_eps=0.2))
  clean_loss, _ = fn(logp, old, a, mask)
  nan_logp = np.where(mask, logp, np.nan).astype(np.float32)
  nan_old = np.where(mask, old, np.inf).astype(np.float32)
  nan_a = np.where(mask, a, np.nan).astype(np.float32)
  (loss, aux), grad = jax.value_and_grad(lambda lp: fn(lp, nan_old, nan_a, mask), has_aux=True)(
    nan_logp
  )
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
  assert all(np.isfinite(float(v)) for v in aux.values())
  grad = np.asarray(grad)
  np.testing.assert_array_equal(grad[~mask], 0.0)
  assert np.all(np.isfinite(grad)) and np.any(grad[mask] != 0.0)


def test_ppo_old_logp_and_advantages_get_no_gradient():
  rng = np.random.default_rng(4)
  logp, old, a = rng.normal(size=(3, 2, 5)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  grads = jax.grad(
    lambda o, adv: pg.ppo_policy_loss(logp, o, adv, mask, clip_eps=0.2)[0], argnums=(0, 1)
  )(old, a)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_ppo_policy_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"advantages must have the shape of logp \(2, 3\)"):
    pg.ppo_policy_loss(
      jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), clip_eps=0.2
    )


# ----------------------------------------------------------------------------- value loss
@pytest.mark.parametrize("aggregation", AGGS)
def test_ppo_value_loss_and_gradient_match_numpy(aggregation):
  rng = np.random.default_rng(5)
  mask = _mask(rng, 6, 8)
  old_values = rng.normal(size=mask.shape)
  values = old_values + rng.normal(scale=0.4, size=mask.shape)
  returns = rng.normal(size=mask.shape)
  expected, expected_grad, expected_frac = _np_value(
    values, old_values, returns, mask, 0.2, aggregation
  )
  assert 0.05 < expected_frac < 0.95
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(pg.ppo_value_loss, clip_eps=0.2, aggregation=aggregation))
    (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(values, old_values, returns, mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(aux["clip_fraction"], expected_frac, rtol=1e-12)

    def loss_of_values(v):
      return fn(v, old_values, returns, mask)[0]

    check_grads(loss_of_values, (values,), order=1, modes=["rev"])


def test_ppo_value_loss_is_half_squared_error_without_clipping():
  rng = np.random.default_rng(6)
  values, returns = rng.normal(size=(2, 3, 4)).astype(np.float32)
  mask = np.ones((3, 4), bool)
  loss, aux = pg.ppo_value_loss(values, values, returns, mask, clip_eps=1e9)
  np.testing.assert_allclose(loss, 0.5 * np.mean((values - returns) ** 2), rtol=1e-5)
  assert float(aux["clip_fraction"]) == 0.0


def test_ppo_value_loss_counts_no_clipping_when_every_value_is_within_eps():
  """``old + (v - old)`` rounds to a neighbour of ``v`` for 7% of these float32 tokens; their
  clipped and unclipped errors differ in the last bits, which is not clipping."""
  rng = np.random.default_rng(8)
  old = rng.normal(0, 0.3, (64, 32)).astype(np.float32)
  values = (old + rng.uniform(-0.1, 0.1, old.shape)).astype(np.float32)
  returns = rng.normal(size=old.shape).astype(np.float32)
  fn = jax.jit(functools.partial(pg.ppo_value_loss, clip_eps=0.2))
  _, aux = fn(values, old, returns, np.ones(old.shape, bool))
  assert float(aux["clip_fraction"]) == 0.0


def test_ppo_value_loss_masked_positions_have_zero_gradient():
  rng = np.random.default_rng(7)
  mask = _mask(rng, 4, 6)
  values, old, returns = rng.normal(size=(3,) + mask.shape).astype(np.float32)
  poisoned = [np.where(mask, x, np.nan).astype(np.float32) for x in (values, old, returns)]
  fn = jax.jit(functools.partial(pg.ppo_value_loss, clip_eps=0.2))
  grad = jax.grad(lambda v: fn(v, *poisoned[1:], mask)[0])(poisoned[0])
  grad = np.asarray(grad)
  np.testing.assert_array_equal(grad[~mask], 0.0)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(fn(*poisoned, mask)[0], fn(values, old, returns, mask)[0], rtol=1e-6)


# ----------------------------------------------------------------------------- entropy, REINFORCE
@pytest.mark.parametrize("aggregation", AGGS)
def test_entropy_bonus_matches_numpy(aggregation):
  rng = np.random.default_rng(8)
  mask = _mask(rng, 5, 6)
  entropy = rng.uniform(0.0, 3.0, size=mask.shape)
  fn = jax.jit(functools.partial(pg.entropy_bonus, aggregation=aggregation))
  got = fn(np.where(mask, entropy, np.nan).astype(np.float32), mask)
  np.testing.assert_allclose(got, _np_aggregate(entropy, mask, aggregation), rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGS)
def test_reinforce_loss_value_and_gradient_match_numpy(aggregation):
  rng = np.random.default_rng(9)
  mask = _mask(rng, 5, 7)
  logp = np.log(rng.uniform(0.05, 1.0, size=mask.shape))
  a = rng.normal(size=mask.shape)
  weights = _np_weights(mask, aggregation)
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(pg.reinforce_loss, aggregation=aggregation))
    loss, (g_logp, g_a) = jax.value_and_grad(fn, argnums=(0, 1))(logp, a, mask)
    np.testing.assert_allclose(loss, np.sum(-a * logp * weights), rtol=1e-12)
    np.testing.assert_allclose(g_logp, -a * weights, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(g_a, 0.0)  # advantages are constants.


def test_reinforce_loss_masked_positions_have_zero_gradient():
  rng = np.random.default_rng(10)
  mask = _mask(rng, 3, 5)
  logp, a = rng.normal(size=(2,) + mask.shape).astype(np.float32)
  nan_logp = np.where(mask, logp, np.nan).astype(np.float32)
  nan_a = np.where(mask, a, np.nan).astype(np.float32)
  grad = np.asarray(jax.jit(jax.grad(pg.reinforce_loss))(nan_logp, nan_a, mask))
  np.testing.assert_array_equal(grad[~mask], 0.0)
  np.testing.assert_allclose(grad[mask], -a[mask] / mask.sum(), rtol=1e-6)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("clip_eps", [-0.2, 0.0, float("nan")])
def test_ppo_losses_reject_non_positive_clip_eps_naming_it(clip_eps):
  x = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"^clip_eps must be > 0 \(e.g. 0.2\), got"):
    pg.ppo_policy_loss(x, x, x, mask, clip_eps=clip_eps)
  with pytest.raises(ValueError, match=r"^clip_eps must be > 0, got"):
    pg.ppo_value_loss(x, x, x, mask, clip_eps=clip_eps)


def test_ppo_policy_loss_rejects_string_logp_naming_it():
  mask = jnp.ones((1, 2), bool)
  with pytest.raises(ValueError, match="^logp must be a numeric array"):
    pg.ppo_policy_loss(
      np.array([["a", "b"]]), jnp.zeros((1, 2)), jnp.zeros((1, 2)), mask, clip_eps=0.2
    )


# ----------------------------------------------------------------------------- variants
def _np_ppo_variant(logp, old_logp, a, mask, *, eps, eps_high, dual, sequence):
  """Float64 NumPy reference of the clip-higher / dual-clip / GSPO surrogate (per token)."""
  log_ratio = logp - old_logp
  if sequence:
    m = mask.astype(np.float64)
    seq = (log_ratio * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1.0)
    log_ratio = np.where(mask, seq, 0.0)
  ratio = np.exp(log_ratio)
  surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps_high) * a)
  if dual is not None:
    surrogate = np.where(a < 0, np.maximum(surrogate, dual * a), surrogate)
  return -surrogate


@pytest.mark.parametrize(
  "eps_high, dual, sequence, aggregation",
  [
    (0.28, None, False, "token_mean"),  # DAPO clip-higher
    (None, 3.0, False, "seq_mean"),  # dual-clip PPO
    (None, None, True, "seq_mean"),  # GSPO
    (0.3, 2.0, True, "token_mean"),
  ],
)
def test_ppo_policy_loss_variants_match_numpy_values_and_gradients(
  eps_high, dual, sequence, aggregation
):
  rng = np.random.default_rng(7)
  mask = _mask(rng, 6, 8)
  old_logp = np.log(rng.uniform(0.05, 1.0, size=mask.shape))
  logp = old_logp + rng.normal(scale=0.8, size=mask.shape)
  if sequence:  # sequence-level advantages, as GRPO/GSPO use
    a = np.repeat(rng.normal(size=(6, 1)), 8, axis=1)
  else:
    a = rng.normal(size=mask.shape)
  eps = 0.2
  np_args = dict(eps=eps, eps_high=eps if eps_high is None else eps_high, dual=dual)

  def np_loss(lp):
    per_token = _np_ppo_variant(lp, old_logp, a, mask, sequence=sequence, **np_args)
    return _np_aggregate(per_token, mask, aggregation)

  with jax.enable_x64(True):
    fn = jax.jit(
      functools.partial(
        pg.ppo_policy_loss,
        clip_eps=eps,
        clip_eps_high=eps_high,
        dual_clip=dual,
        ratio_level="sequence" if sequence else "token",
        aggregation=aggregation,
      )
    )
    (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(logp, old_logp, a, mask)
  np.testing.assert_allclose(loss, np_loss(logp), rtol=1e-10)
  # Central differences of the NumPy reference.
  want = np.zeros_like(logp)
  for idx in zip(*np.nonzero(mask)):
    up, down = logp.copy(), logp.copy()
    up[idx] += 1e-6
    down[idx] -= 1e-6
    want[idx] = (np_loss(up) - np_loss(down)) / 2e-6
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)
  assert 0.0 < float(aux["clip_fraction"]) < 1.0


def test_dual_clip_bounds_the_loss_of_a_negative_advantage_by_c_times_minus_a():
  logp = np.log(np.array([[5.0, 1.0]]))  # ratio 5 on a bad action
  old = np.zeros((1, 2))
  a = np.array([[-1.0, 1.0]])
  mask = np.array([[True, False]])
  plain, _ = pg.ppo_policy_loss(logp, old, a, mask, clip_eps=0.2)
  dual, _ = pg.ppo_policy_loss(logp, old, a, mask, clip_eps=0.2, dual_clip=3.0)
  np.testing.assert_allclose(plain, 5.0, rtol=1e-6)
  np.testing.assert_allclose(dual, 3.0, rtol=1e-6)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_to_one_plus_eps_high():
  logp = np.log(np.array([[1.25]]))
  old, a, mask = np.zeros((1, 1)), np.ones((1, 1)), np.ones((1, 1), bool)
  grad = lambda **kw: jax.grad(lambda lp: pg.ppo_policy_loss(lp, old, a, mask, **kw)[0])(logp)
  assert float(grad(clip_eps=0.2)[0, 0]) == 0.0  # clipped at 1.2
  np.testing.assert_allclose(grad(clip_eps=0.2, clip_eps_high=0.28), [[-1.25]], rtol=1e-6)


def test_constant_length_aggregation_divides_by_batch_times_norm_length():
  rng = np.random.default_rng(3)
  mask = _mask(rng, 5, 7)
  x = rng.normal(size=mask.shape)
  got = pg.masked_aggregate(x, mask, aggregation="constant_length", norm_length=10)
  np.testing.assert_allclose(got, np.where(mask, x, 0).sum() / (5 * 10), rtol=1e-6)
  same = pg.masked_aggregate(x, mask, aggregation="constant_length", norm_length=np.int64(10))
  assert float(same) == float(got)
  with pytest.raises(ValueError, match="needs norm_length, a positive int, got None"):
    pg.masked_aggregate(x, mask, aggregation="constant_length")
  # Under data parallelism the number of sequences is global: pmean of shards == whole batch.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  mask16 = _mask(rng, 16, 6)
  x16 = rng.normal(size=mask16.shape).astype(np.float32)
  agg = functools.partial(pg.masked_aggregate, aggregation="constant_length", norm_length=6)
  sharded = jax.jit(
    jax.shard_map(
      lambda x, m: jax.lax.pmean(agg(x, m, axis_name="data"), "data"),
      mesh=mesh,
      in_specs=(P("data"), P("data")),
      out_specs=P(),
      check_vma=False,
    )
  )
  # The shards add the float32 terms in another order than the whole batch: with the unit-scale
  # terms cancelling to a mean of ~0.005, that rounding is ~1e-8 absolute, beyond rtol=1e-6 of
  # the mean (XLA's -O0 adds them in another order than its default level).
  np.testing.assert_allclose(sharded(x16, mask16), agg(x16, mask16), rtol=1e-6, atol=1e-7)


def test_bad_variant_arguments_raise_naming_them():
  x = np.zeros((2, 3))
  with pytest.raises(ValueError, match="ratio_level must be one of"):
    pg.ppo_policy_loss(x, x, x, x, clip_eps=0.2, ratio_level="seq")
  with pytest.raises(ValueError, match="dual_clip must be None or > 1, got 0.5"):
    pg.ppo_policy_loss(x, x, x, x, clip_eps=0.2, dual_clip=0.5)
  for high in (-0.5, 0.0, np.float32(-0.5), jnp.array(-0.5)):
    with pytest.raises(ValueError, match=r"clip_eps_high must be > 0, got (-0.5|0.0)$"):
      pg.ppo_policy_loss(x, x, x, x, clip_eps=0.2, clip_eps_high=high)
  with pytest.raises(ValueError, match="clip_eps must be > 0 .*, got -0.2"):
    pg.ppo_policy_loss(x, x, x, x, clip_eps=jnp.array(-0.2))
