"""Tests for jaxrm.math.preference against float64 NumPy / SciPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special as sp_special
from scipy import stats

from jaxrm.math import preference

# The reward model's step, model and losses at XLA's default level, as users run them.
pytestmark = pytest.mark.usefixtures("xla_optimized")  # tests/conftest.py

LOG2 = np.log(2.0)


# ------------------------------------------------------------------------------ references
def _np_log_p(name, delta):
  """log P(chosen preferred) for a delta, float64."""
  if name == "bradley_terry":
    return -np.logaddexp(0.0, -delta)
  return sp_special.log_ndtr(delta / np.sqrt(2.0))


def _np_losses(name, rc, rr, margin, p):
  if name == "hinge":
    gap = rc - rr
    return p * np.maximum(0, margin - gap) + (1 - p) * np.maximum(0, margin + gap)
  delta = rc - rr - margin
  return -(p * _np_log_p(name, delta) + (1 - p) * _np_log_p(name, -delta))


def _np_dloss_ddelta(name, rc, rr, margin, p):
  """Analytic derivative of the per-example loss w.r.t. r_chosen (= -d/d r_rejected)."""
  if name == "bradley_terry":
    delta = rc - rr - margin
    return 1.0 / (1.0 + np.exp(-delta)) - p
  if name == "thurstone":
    x = (rc - rr - margin) / np.sqrt(2.0)
    return (-p * _np_inverse_mills(x) + (1 - p) * _np_inverse_mills(-x)) / np.sqrt(2.0)
  gap = rc - rr
  return -p * (margin - gap > 0) + (1 - p) * (margin + gap > 0)


def _np_inverse_mills(x):
  """phi(x) / Phi(x) in float64: SciPy for x >= -5, Laplace's continued fraction below.

  (Below -5 the SciPy log-difference loses digits to cancellation; the continued fraction
  ``Phi(-t) / phi(t) = 1 / (t + 1 / (t + 2 / (t + 3 / ...)))`` converges fast there.)
  """
  x = np.asarray(x, np.float64)
  t = np.maximum(-x, 5.0)
  f = t.copy()
  for n in range(400, 0, -1):
    f = t + n / f
  return np.where(x < -5, f, np.exp(stats.norm.logpdf(x) - sp_special.log_ndtr(x)))


def _np_plackett_luce_log_prob(rewards, mask):
  out = []
  for row, valid in zip(rewards, mask):
    r = row[valid]
    out.append(sum(r[k] - np.log(np.sum(np.exp(r[k:]))) for k in range(len(r))))
  return np.array(out)


LOSS_FNS = {
  "bradley_terry": preference.bradley_terry_loss,
  "thurstone": preference.thurstone_loss,
  "hinge": preference.hinge_loss,
}


def _pair_data(seed=0, batch=7):
  rng = np.random.default_rng(seed)
  rc = rng.normal(size=batch) * 2.0
  rr = rng.normal(size=batch) * 2.0
  margin = rng.uniform(0.0, 1.0, size=batch)
  labels = rng.uniform(size=batch)
  weights = rng.uniform(0.1, 2.0, size=batch)
  return rc, rr, margin, labels, weights


# ------------------------------------------------------------------------------ values
def test_bradley_terry_log_prob_matches_numpy_log_sigmoid():
  rc, rr, margin, _, _ = _pair_data()
  got = jax.jit(functools.partial(preference.bradley_terry_log_prob, margin=margin))(
    rc.astype(np.float32), rr.astype(np.float32)
  )
  np.testing.assert_allclose(
    got, _np_log_p("bradley_terry", rc - rr - margin), rtol=1e-5, atol=1e-6
  )


def test_thurstone_probability_is_probit_of_gap_over_sqrt2():
  rc, rr, margin, _, _ = _pair_data(1)
  got = jax.jit(functools.partial(preference.thurstone_log_prob, margin=margin))(rc, rr)
  np.testing.assert_allclose(
    np.exp(got), stats.norm.cdf((rc - rr - margin) / np.sqrt(2.0)), rtol=1e-5
  )


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
@pytest.mark.parametrize("use_labels", [False, True])
def test_pairwise_loss_matches_numpy_reference(name, use_labels):
  rc, rr, margin, labels, weights = _pair_data(2)
  eps = 0.1
  p = labels if use_labels else np.full_like(rc, 1 - eps)
  kwargs = dict(margin=margin, label_smoothing=eps, labels=labels if use_labels else None)
  fn = jax.jit(lambda a, b, w: LOSS_FNS[name](a, b, weights=w, **kwargs))
  got = fn(rc.astype(np.float32), rr.astype(np.float32), weights.astype(np.float32))
  per_example = _np_losses(name, rc, rr, margin, p)
  np.testing.assert_allclose(got, np.sum(weights * per_example) / np.sum(weights), rtol=1e-5)
  per_fn = {
    "bradley_terry": preference.bradley_terry_losses,
    "thurstone": preference.thurstone_losses,
    "hinge": preference.hinge_losses,
  }[name]
  np.testing.assert_allclose(per_fn(rc, rr, **kwargs), per_example, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_pairwise_loss_gradient_matches_analytic_gradient_in_float64(name):
  rc, rr, margin, labels, weights = _pair_data(3)
  with jax.enable_x64():
    grad_fn = jax.jit(
      jax.grad(
        lambda a, b: LOSS_FNS[name](a, b, margin=margin, labels=labels, weights=weights),
        argnums=(0, 1),
      )
    )
    g_c, g_r = grad_fn(jnp.asarray(rc), jnp.asarray(rr))
    assert g_c.dtype == jnp.float64
  expected = weights * _np_dloss_ddelta(name, rc, rr, margin, labels) / np.sum(weights)
  np.testing.assert_allclose(g_c, expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(g_r, -expected, rtol=1e-10, atol=1e-12)


def test_log_ndtr_second_derivative_matches_analytic_float64():
  # d^2/dx^2 log Phi(x) = -m(x) (x + m(x)) with m the inverse Mills ratio phi / Phi.
  x = np.array([-200.0, -40.0, -10.2, -9.8, -2.0, 0.5, 3.0])
  with jax.enable_x64():
    got = jax.jit(jax.vmap(jax.grad(jax.grad(preference.log_ndtr))))(jnp.asarray(x))
  m = _np_inverse_mills(x)
  np.testing.assert_allclose(got, -m * (x + m), rtol=1e-7)


def test_huge_reward_gaps_give_finite_exact_losses_and_gradients():
  gaps = np.array([-1e6, -1e4, -100.0, 100.0, 1e4, 1e6], np.float32)
  zeros = np.zeros_like(gaps)
  per_example_grad = lambda f: jax.jit(jax.grad(lambda a: jnp.sum(f(a, zeros))))(gaps)

  bt = jax.jit(preference.bradley_terry_losses)(gaps, zeros)
  np.testing.assert_allclose(bt, np.where(gaps < 0, -gaps, 0.0), rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(
    per_example_grad(preference.bradley_terry_losses), np.where(gaps < 0, -1.0, 0.0), rtol=1e-6
  )

  th = jax.jit(preference.thurstone_losses)(gaps, zeros)
  g64 = gaps.astype(np.float64)
  np.testing.assert_allclose(th, -sp_special.log_ndtr(g64 / np.sqrt(2.0)), rtol=1e-5)
  # d/dgap -log Phi(gap / sqrt 2) = -(phi / Phi)(gap / sqrt 2) / sqrt 2 (about gap / 2).
  np.testing.assert_allclose(
    per_example_grad(preference.thurstone_losses),
    -_np_inverse_mills(g64 / np.sqrt(2.0)) / np.sqrt(2.0),
    rtol=1e-5,
    atol=1e-30,
  )

  for fn in (preference.bradley_terry_loss, preference.thurstone_loss, preference.hinge_loss):
    value, grad = jax.jit(jax.value_and_grad(fn))(gaps, zeros)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_log_ndtr_gradient_is_the_inverse_mills_ratio_everywhere():
  x = np.array([-1e5, -3e3, -50.0, -10.5, -10.0, -9.5, -3.0, 0.0, 2.0, 8.0, 40.0])
  with jax.enable_x64():
    got = jax.jit(jax.vmap(jax.grad(preference.log_ndtr)))(jnp.asarray(x))
  np.testing.assert_allclose(got, _np_inverse_mills(x), rtol=1e-11, atol=1e-300)


# ------------------------------------------------------------------------------ label handling
@pytest.mark.parametrize("name", ["bradley_terry", "thurstone"])
def test_label_smoothing_half_is_log2_at_zero_gap_symmetric_and_minimal(name):
  rc, rr, _, _, _ = _pair_data(5, batch=9)
  losses = {
    "bradley_terry": preference.bradley_terry_losses,
    "thurstone": preference.thurstone_losses,
  }[name]
  fn = jax.jit(functools.partial(losses, label_smoothing=0.5))
  np.testing.assert_allclose(fn(rc, rc), np.full(rc.shape, LOG2), rtol=1e-6)
  np.testing.assert_allclose(fn(rc, rr), fn(rr, rc), rtol=1e-6)
  assert np.all(np.asarray(fn(rc, rr)) > LOG2)


def test_bradley_terry_with_label_smoothing_half_is_log2_plus_log_cosh():
  rc, rr, _, _, _ = _pair_data(6)
  got = preference.bradley_terry_losses(rc, rr, label_smoothing=0.5)
  np.testing.assert_allclose(got, LOG2 + np.log(np.cosh((rc - rr) / 2)), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_label_smoothing_is_the_constant_soft_label_and_labels_override_it(name):
  rc, rr, _, labels, _ = _pair_data(7)
  fn = LOSS_FNS[name]
  smoothed = fn(rc, rr, label_smoothing=0.2)
  np.testing.assert_allclose(smoothed, fn(rc, rr, labels=np.full(rc.shape, 0.8)), rtol=1e-6)
  np.testing.assert_allclose(
    fn(rc, rr, label_smoothing=0.2, labels=labels), fn(rc, rr, labels=labels), rtol=1e-6
  )
  assert not np.isclose(fn(rc, rr, labels=labels), smoothed)


# ------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_zero_weight_removes_an_example_from_value_and_gradient(name):
  rc, rr, _, _, weights = _pair_data(8)
  weights[[1, 4]] = 0.0
  keep = weights > 0
  fn = jax.jit(
    jax.value_and_grad(lambda a, b: LOSS_FNS[name](a, b, weights=weights), argnums=(0, 1))
  )
  value, (g_c, g_r) = fn(rc, rr)
  np.testing.assert_allclose(
    value, LOSS_FNS[name](rc[keep], rr[keep], weights=weights[keep]), rtol=1e-6
  )
  assert np.all(np.asarray(g_c)[~keep] == 0) and np.all(np.asarray(g_r)[~keep] == 0)


def test_weighted_mean_is_scale_free_and_ignores_nonfinite_zero_weight_losses():
  losses = np.array([1.0, 2.0, np.inf, 4.0])
  weights = np.array([1.0, 3.0, 0.0, 0.5])
  expected = np.sum(np.array([1.0, 6.0, 2.0])) / 4.5
  np.testing.assert_allclose(
    jax.jit(preference.weighted_mean)(losses, weights), expected, rtol=1e-6
  )
  np.testing.assert_allclose(preference.weighted_mean(losses, 10 * weights), expected, rtol=1e-6)
  assert preference.weighted_mean(losses, np.zeros(4)) == 0.0
  np.testing.assert_allclose(preference.weighted_mean(losses[:2]), 1.5)


# ------------------------------------------------------------------------------ Plackett–Luce
def test_plackett_luce_with_two_responses_equals_bradley_terry():
  rc, rr, _, _, weights = _pair_data(9)
  rewards = np.stack([rc, rr], axis=1)
  pl = jax.jit(preference.plackett_luce_loss)
  np.testing.assert_allclose(
    pl(rewards, weights=weights), preference.bradley_terry_loss(rc, rr, weights=weights), rtol=1e-6
  )
  np.testing.assert_allclose(
    jax.grad(pl)(rewards),
    np.stack(jax.grad(preference.bradley_terry_loss, argnums=(0, 1))(rc, rr), axis=1),
    rtol=1e-5,
    atol=1e-7,
  )


def test_plackett_luce_matches_numpy_values_and_finite_difference_gradients():
  rng = np.random.default_rng(10)
  rewards = rng.normal(size=(5, 6)) * 3.0
  mask = rng.uniform(size=(5, 6)) < 0.7
  mask[0] = True
  mask[1] = [False, True, False, False, False, False]  # a single valid response
  weights = rng.uniform(0.5, 1.5, size=5)
  ref = lambda r: np.sum(weights * -_np_plackett_luce_log_prob(r, mask)) / np.sum(weights)

  got = jax.jit(preference.plackett_luce_log_prob)(rewards.astype(np.float32), mask=mask)
  np.testing.assert_allclose(got, _np_plackett_luce_log_prob(rewards, mask), rtol=1e-5)
  assert got[1] == 0.0

  with jax.enable_x64():
    grad = jax.jit(
      jax.grad(functools.partial(preference.plackett_luce_loss, mask=mask, weights=weights))
    )(jnp.asarray(rewards))
  h = 1e-6
  fd = np.zeros_like(rewards)
  for idx in np.ndindex(rewards.shape):
    e = np.zeros_like(rewards)
    e[idx] = h
    fd[idx] = (ref(rewards + e) - ref(rewards - e)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
  assert np.all(np.asarray(grad)[~mask] == 0)


def test_plackett_luce_is_invariant_to_where_and_how_much_padding():
  rng = np.random.default_rng(11)
  ranked = rng.normal(size=(3, 4))
  log_prob = jax.jit(preference.plackett_luce_log_prob)
  base = log_prob(ranked)
  # Interleave padding (with junk values) between and after the ranked responses.
  padded = np.full((3, 9), 1e30)
  mask = np.zeros((3, 9), bool)
  cols = [0, 2, 5, 6]
  padded[:, cols] = ranked
  mask[:, cols] = True
  np.testing.assert_allclose(log_prob(padded, mask=mask), base, rtol=1e-6)


def test_plackett_luce_prefers_the_correct_ranking():
  rewards = np.array([[3.0, 2.0, 1.0, 0.0]])
  loss = jax.jit(preference.plackett_luce_loss)
  assert loss(rewards) < loss(rewards[:, ::-1])


# ------------------------------------------------------------------------------ centering
def test_reward_centering_penalty_is_coef_times_mean_squared_pair_sum_with_its_gradient():
  # Eisenstein et al. 2023 Eq. 2 / TRL center_rewards_coefficient: coef * mean((r_c + r_r)^2).
  rng = np.random.default_rng(0)
  rc, rr = rng.normal(size=7), rng.normal(size=7)
  coef = 0.01
  fn = jax.jit(functools.partial(preference.reward_centering_penalty, coef=coef))
  want = coef * np.mean((rc + rr) ** 2)
  np.testing.assert_allclose(fn(rc, rr), want, rtol=1e-6)
  grad_c, grad_r = jax.grad(fn, argnums=(0, 1))(rc, rr)
  np.testing.assert_allclose(grad_c, 2 * coef * (rc + rr) / 7, rtol=1e-5)
  np.testing.assert_allclose(grad_r, 2 * coef * (rc + rr) / 7, rtol=1e-5)
  # The example: pairs (5, 4) and (-5, -4) -> mean(81, 81) = 81; the batch form gives 0.
  np.testing.assert_allclose(
    preference.reward_centering_penalty([5.0, -5.0], [4.0, -4.0], coef=1.0), 81.0
  )
  np.testing.assert_allclose(
    preference.reward_centering_penalty([5.0, -5.0], [4.0, -4.0], coef=1.0, form="batch"), 0.0
  )


def test_reward_centering_batch_form_is_coef_times_squared_mean_of_all_rewards():
  rewards = np.array([[1.0, 2.0, -0.5], [0.25, 3.0, 1.0]])
  coef = 0.01
  fn = jax.jit(functools.partial(preference.reward_centering_penalty, coef=coef, form="batch"))
  np.testing.assert_allclose(fn(rewards[0], rewards[1]), coef * np.mean(rewards) ** 2, rtol=1e-6)
  np.testing.assert_allclose(
    jax.grad(fn)(rewards[0], rewards[1]), np.full(3, 2 * coef * np.mean(rewards) / 6), rtol=1e-6
  )


# ------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_get_loss_binds_hyperparameters_and_accepts_weights_and_labels(name):
  rc, rr, _, labels, weights = _pair_data(12)
  loss = preference.get_loss(name, margin=0.3, label_smoothing=0.1)
  expected = LOSS_FNS[name](rc, rr, margin=0.3, label_smoothing=0.1, labels=labels, weights=weights)
  np.testing.assert_allclose(
    jax.jit(loss)(rc, rr, weights=weights, labels=labels), expected, rtol=1e-6
  )
  assert loss(rc, rr).shape == ()


def test_get_loss_rejects_unknown_names_and_hyperparameters_listing_valid_ones():
  with pytest.raises(ValueError, match="bradley_terry.*hinge.*thurstone"):
    preference.get_loss("logistic")
  with pytest.raises(ValueError, match="temperature"):
    preference.get_loss("hinge", temperature=2.0)
  assert set(preference.LOSS_NAMES) == set(LOSS_FNS)


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
  "call, message",
  [
    (
      lambda: preference.bradley_terry_loss(np.zeros((3, 4)), np.zeros((3, 4))),
      r"rewards_chosen must have shape \[batch\], got \(3, 4\)",
    ),
    (
      lambda: preference.thurstone_loss(np.zeros(3), np.zeros(4)),
      r"rewards_rejected must have the shape of rewards_chosen \(3,\), got \(4,\)",
    ),
    (
      lambda: preference.hinge_loss(np.zeros(3), np.zeros(3), margin=np.zeros(2)),
      r"margin must have shape \(\) or \(3,\), got \(2,\)",
    ),
    (
      lambda: preference.bradley_terry_loss(np.zeros(3), np.zeros(3), labels=np.zeros((3, 1))),
      r"labels must have shape \(3,\), got \(3, 1\)",
    ),
    (
      lambda: preference.thurstone_loss(np.zeros(3), np.zeros(3), weights=np.zeros(4)),
      r"weights must have shape \(3,\), got \(4,\)",
    ),
    (
      lambda: preference.plackett_luce_loss(np.zeros(3)),
      r"rewards must have shape \[batch, K\], got \(3,\)",
    ),
    (
      lambda: preference.plackett_luce_loss(np.zeros((2, 3)), mask=np.ones((2, 4), bool)),
      r"mask must have the shape of rewards \(2, 3\), got \(2, 4\)",
    ),
    (
      lambda: preference.bradley_terry_loss(np.zeros(3), np.zeros(3), label_smoothing=1.5),
      r"label_smoothing must be in \[0, 1\]",
    ),
    (
      lambda: preference.reward_centering_penalty(np.zeros((0,)), np.zeros((0,)), coef=1.0),
      r"rewards_chosen must be non-empty",
    ),
    (
      lambda: preference.reward_centering_penalty(np.zeros(3), np.zeros(3), coef=-0.1),
      r"coef must be >= 0, got -0.1",
    ),
    (
      lambda: preference.reward_centering_penalty(np.zeros(3), np.zeros(2), coef=0.1),
      r"rewards_rejected must have the shape of rewards_chosen \(3,\), got \(2,\)",
    ),
    (
      lambda: preference.reward_centering_penalty(np.zeros(3), np.zeros(3), coef=0.1, form="x"),
      r"form must be one of \('pair', 'batch'\)",
    ),
  ],
)
def test_bad_shapes_raise_value_error_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ------------------------------------------------------------------------------ bad input
PAIRWISE = ["bradley_terry_loss", "thurstone_loss", "hinge_loss"]


@pytest.mark.parametrize("loss_name", PAIRWISE)
def test_negative_weight_raises_naming_weights_and_index(loss_name):
  loss = getattr(preference, loss_name)
  rc, rr = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 0.5])
  with pytest.raises(
    ValueError, match=r"weights must lie in \[0.0, inf\], got -1.0 at index \(1,\)"
  ):
    loss(rc, rr, weights=jnp.array([1.0, -1.0, 1.0]))
  with pytest.raises(ValueError, match=r"weights must lie in .*got nan at index \(2,\)"):
    loss(rc, rr, weights=np.array([1.0, 1.0, np.nan]))


@pytest.mark.parametrize("loss_name", PAIRWISE)
@pytest.mark.parametrize("bad, index", [(2.0, 0), (-1.0, 1)])
def test_labels_outside_unit_interval_raise_naming_labels(loss_name, bad, index):
  loss = getattr(preference, loss_name)
  labels = np.array([0.5, 0.5, 0.5])
  labels[index] = bad
  with pytest.raises(
    ValueError, match=rf"labels must lie in \[0.0, 1.0\], got {bad} at index \({index},\)"
  ):
    loss(jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 0.5]), labels=labels)


@pytest.mark.parametrize("loss_name", PAIRWISE)
def test_invalid_weight_or_label_under_jit_gives_nan_never_a_finite_number(loss_name):
  # Traced values cannot raise; the loss must then be NaN so that a training step skips it.
  loss = jax.jit(getattr(preference, loss_name))
  rc, rr = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 0.5])
  assert np.isnan(loss(rc, rr, weights=jnp.array([1.0, -1.0, 1.0])))
  assert np.isnan(loss(rc, rr, weights=jnp.array([-1.0, -1.0, -1.0])))  # was 0.0
  assert np.isnan(loss(rc, rr, labels=jnp.array([2.0, -1.0, 0.5])))
  # Valid input is untouched, including all-zero weights (loss 0 by convention).
  assert np.isfinite(loss(rc, rr, weights=jnp.array([1.0, 0.0, 2.0])))
  assert float(loss(rc, rr, weights=jnp.zeros(3))) == 0.0


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"rewards_chosen": np.array(["a", "b"])}, "rewards_chosen"),
    ({"rewards_rejected": np.array([b"x", b"y"])}, "rewards_rejected"),
    ({"rewards_chosen": np.array([object(), object()])}, "rewards_chosen"),
    ({"rewards_chosen": [[1.0], [1.0, 2.0]]}, "rewards_chosen"),
    ({"weights": ["1", "2"]}, "weights"),
    ({"labels": np.array(["1", "0"])}, "labels"),
  ],
)
def test_non_numeric_arrays_raise_naming_the_argument(kwargs, name):
  args = {"rewards_chosen": jnp.array([1.0, 2.0]), "rewards_rejected": jnp.array([0.0, 1.0])}
  args.update(kwargs)
  rc, rr = args.pop("rewards_chosen"), args.pop("rewards_rejected")
  with pytest.raises(ValueError, match=rf"^{name} must be a numeric array"):
    preference.bradley_terry_loss(rc, rr, **args)
