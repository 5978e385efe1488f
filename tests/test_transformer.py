"""Tests for jaxrm.models.transformer: causality, padding invariance, KV cache, dtypes, validation."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from model_helpers import random_params
import numpy as np
import pytest

from jaxrm.models import attention
from jaxrm.models.rope import apply_rotary
from jaxrm.models.transformer import (
  KVCache,
  RopeScaling,
  Transformer,
  TransformerConfig,
  check_token_range,
  init_cache,
  is_concrete,
  rope_frequencies,
)

# The reward model's step, model and losses at XLA's default level, as users run them.
pytestmark = pytest.mark.usefixtures("xla_optimized")  # tests/conftest.py

VOCAB = 41
CFG = TransformerConfig(vocab_size=VOCAB, num_layers=2, width=32, num_heads=2, max_len=24)
LEARNED = dataclasses.replace(CFG, position="learned")
# Llama family: RMSNorm, SwiGLU, grouped-query attention (4 query heads share 2 kv heads),
# Qwen2-style q/k/v biases only, Llama-3 RoPE scaling with a small original length so that
# all three frequency bands occur at head_dim 8 (wavelengths 6.3, 30, 140, 660 vs 16 and 64).
LLAMA = dataclasses.replace(
  CFG,
  num_heads=4,
  num_kv_heads=2,
  norm="rmsnorm",
  mlp="swiglu",
  mlp_dim=48,
  attn_out_bias=False,
  mlp_bias=False,
  rope_base=500.0,
  rope_scaling=RopeScaling("llama3", 4.0, original_max_len=64),
  layer_norm_eps=1e-6,
)
CONFIGS = [CFG, LEARNED, LLAMA]
IDS = ["rotary", "learned", "llama"]


B, S = 2, 10  # one input shape for (almost) every test: one compile per config


@functools.cache
def _setup(cfg):
  """(model, params, jitted apply) per config, shared across tests to avoid recompiles."""
  model = Transformer(cfg)
  params = random_params(model, (B, S))
  return model, params, jax.jit(model.apply)


def _random_tokens(seed, shape):
  return np.random.default_rng(seed).integers(3, VOCAB, size=shape).astype(np.int32)


# ----------------------------------------------------------------------------- reference


def _np_norm(x, p, eps):
  if "bias" not in p:  # RMSNorm
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _np_inv_freq(cfg):
  """Rotary frequencies written out from the Llama-3 recipe (per frequency, with branches)."""
  half = cfg.head_dim // 2
  inv = 1.0 / cfg.rope_base ** (np.arange(half) / half)
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  if sc.kind == "linear":
    return inv / sc.factor
  out = []
  for f in inv:
    wavelen = 2 * math.pi / f
    if wavelen < sc.original_max_len / sc.high_freq_factor:
      out.append(f)
    elif wavelen > sc.original_max_len / sc.low_freq_factor:
      out.append(f / sc.factor)
    else:
      smooth = (sc.original_max_len / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
      )
      out.append((1 - smooth) * f / sc.factor + smooth * f)
  return np.array(out)


def _np_rotary(x, pos, inv):
  half = x.shape[-1] // 2
  ang = pos[..., None] * inv  # [b, s, half]
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_dense(x, p, spec):
  out = np.einsum(spec, x, p["kernel"])
  return out + p["bias"] if "bias" in p else out


def _np_transformer(params, tokens, mask, cfg):
  """Independent float64 NumPy forward pass of the backbone."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  mask = np.asarray(mask, bool)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  x = p["embed"]["embedding"][tokens]
  if cfg.position == "learned":
    x = x + p["pos_embed"]["embedding"][pos]
  b, s = tokens.shape
  allowed = np.tril(np.ones((s, s), bool))[None] & mask[:, None, :]  # [b, q, k]
  eps = cfg.layer_norm_eps
  for layer in range(cfg.num_layers):
    lp = p[f"block_{layer}"]
    h = _np_norm(x, lp["ln_attn"], eps)
    if "qkv" in lp:
      qkv = _np_dense(h, lp["qkv"], "bsw,wthd->bsthd")
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = (_np_dense(h, lp[n], "bsw,whd->bshd") for n in ("query", "key", "value"))
      group = cfg.num_heads // k.shape[2]
      k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # HF repeat_kv
    if cfg.position == "rotary":
      inv = _np_inv_freq(cfg)
      q, k = _np_rotary(q, pos, inv), _np_rotary(k, pos, inv)
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
    out = np.zeros_like(q)
    for bi in range(b):
      for qi in range(s):
        keys = allowed[bi, qi]
        if not keys.any():
          continue
        logits = att[bi][:, qi][:, keys]  # [h, n]
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[bi, qi] = np.einsum("hn,nhd->hd", w, v[bi, keys])
    x = x + _np_dense(out, lp["attn_out"], "bshd,hdw->bsw")
    h = _np_norm(x, lp["ln_mlp"], eps)
    up = _np_dense(h, lp["mlp_in"], "bsw,wm->bsm")
    if cfg.mlp == "swiglu":
      gate = _np_dense(h, lp["mlp_gate"], "bsw,wm->bsm")
      h = gate / (1 + np.exp(-gate)) * up
    else:
      h = _np_gelu(up)
    x = x + _np_dense(h, lp["mlp_out"], "bsm,mw->bsw")
  return _np_norm(x, p["ln_final"], eps)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_forward_matches_float64_numpy_reference(cfg):
  _, params, apply = _setup(cfg)
  tokens = _random_tokens(0, (B, S))
  mask = np.array([[1] * 10, [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]], bool)
  got = apply(params, tokens, mask)
  want = _np_transformer(params, tokens, mask, cfg)
  assert got.dtype == jnp.float32 and got.shape == (B, S, cfg.width)
  np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=2e-4, rtol=2e-4)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_changing_a_future_token_never_changes_earlier_outputs(cfg):
  _, params, apply = _setup(cfg)
  tokens = _random_tokens(1, (B, S))
  mask = np.ones((B, S), bool)
  base = np.asarray(apply(params, tokens, mask))
  for t in (3, 9):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 5) % VOCAB
    out = np.asarray(apply(params, changed, mask))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-3  # the change is visible at t


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_hidden_states_are_invariant_to_left_and_right_padding(cfg):
  _, params, apply = _setup(cfg)
  real = _random_tokens(2, (6,))
  junk = _random_tokens(3, (4,))  # pad slots hold arbitrary ids: they must not matter
  # Row 0: unpadded prefix of the batch layout; row 1: the same 6 tokens left-padded.
  tokens = np.stack([np.concatenate([real, junk]), np.concatenate([junk, real])])
  mask = np.stack([np.arange(S) < 6, np.arange(S) >= 4])
  out = np.asarray(apply(params, tokens, mask))
  bare = np.asarray(
    apply(
      params, np.stack([np.concatenate([real, junk[::-1]])] * 2), np.stack([np.arange(S) < 6] * 2)
    )
  )[0, :6]
  np.testing.assert_allclose(out[0, :6], bare, atol=1e-5)  # right padding, other pad ids
  np.testing.assert_allclose(out[1, 4:], bare, atol=1e-5)  # left padding


def test_fully_masked_rows_produce_finite_outputs():
  _, params, apply = _setup(CFG)
  tokens = _random_tokens(4, (B, S))
  mask = np.array([[0] * 10, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]], bool)
  out = np.asarray(apply(params, tokens, mask))
  assert np.isfinite(out).all()
  # gradients through such rows: tests/test_reward_model.py


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_kv_cached_decoding_matches_full_forward(cfg):
  model, params, apply = _setup(cfg)
  prompt = _random_tokens(5, (B, 6))
  prompt_mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
  steps = _random_tokens(6, (B, 4))
  step_mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)  # rows that "ended" early
  full_tokens = np.concatenate([prompt, steps], 1)
  full_mask = np.concatenate([prompt_mask, step_mask], 1)
  want = np.asarray(apply(params, full_tokens, full_mask))

  @jax.jit
  def decode(params):
    cache = init_cache(cfg, B, S + 2)  # spare slots stay empty
    hidden, cache = model.apply(params, prompt, prompt_mask, cache=cache)

    def step(cache, xs):
      token, token_mask = xs
      h, cache = model.apply(params, token[:, None], token_mask[:, None], cache=cache)
      return cache, h[:, 0]

    cache, hs = jax.lax.scan(step, cache, (steps.T, step_mask.T))
    return jnp.concatenate([hidden, hs.transpose(1, 0, 2)], 1), cache

  got, cache = decode(params)
  np.testing.assert_allclose(np.asarray(got)[full_mask], want[full_mask], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache.mask)[:, :S], full_mask)
  assert not np.asarray(cache.mask)[:, S:].any()
  assert int(cache.index) == S
  assert len(cache.keys) == len(cache.values) == cfg.num_layers
  for layer in (*cache.keys, *cache.values):
    assert layer.shape == (B, cfg.kv_heads, S + 2, cfg.head_dim)


def test_init_cache_is_empty_and_rejects_oversized_cache():
  cache = init_cache(CFG, 3)
  assert isinstance(cache, KVCache)
  assert cache.mask.shape == (3, CFG.max_len) and not np.asarray(cache.mask).any()
  assert int(cache.index) == 0
  with pytest.raises(ValueError, match="cache_len"):
    init_cache(CFG, 3, CFG.max_len + 1)


def test_bfloat16_compute_runs_and_is_close_to_float32():
  cfg16 = dataclasses.replace(CFG, dtype=jnp.bfloat16)
  _, params, apply32 = _setup(CFG)
  model16 = Transformer(cfg16)
  shapes16 = jax.eval_shape(
    model16.init, jax.random.key(0), jnp.ones((B, S), jnp.int32), jnp.ones((B, S), bool)
  )
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))
  tokens = _random_tokens(7, (B, S))
  mask = np.array([[1] * 10, [0, 0] + [1] * 8], bool)
  out32 = np.asarray(apply32(params, tokens, mask))
  out16 = jax.jit(model16.apply)(params, tokens, mask)
  assert out16.dtype == jnp.float32
  diff = np.abs(np.asarray(out16) - out32)[mask]
  assert diff.max() < 0.15, diff.max()  # hidden states are unit-scale after the final LN
  assert diff.max() > 0  # bfloat16 really was used


def _dots(jaxpr) -> list:
  """Every ``dot_general`` equation of ``jaxpr`` and of the jaxprs nested in it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _dots(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _dots(sub)
  return found


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_bfloat16_projections_take_bfloat16_operands_forward_and_backward(cfg):
  """Every matmul of the step (forward, and both gradients) multiplies bfloat16 operands into
  float32 sums, the attention's products included; only the attention backward's row sums
  ``sum(dO * O)`` are float32."""
  cfg16 = dataclasses.replace(cfg, dtype=jnp.bfloat16)
  model = Transformer(cfg16)
  _, params, _ = _setup(cfg)
  tokens, mask = _random_tokens(3, (B, S)), np.ones((B, S), bool)
  loss = lambda p: jnp.sum(jnp.sin(model.apply(p, tokens, mask)))  # noqa: E731
  dots = _dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  kinds = [tuple(v.aval.dtype for v in eqn.invars) for eqn in dots]
  mixed = [eqn for eqn, k in zip(dots, kinds) if k == (jnp.bfloat16, jnp.bfloat16)]
  assert all(eqn.params["preferred_element_type"] == jnp.float32 for eqn in mixed)
  projections = len([p for p in jax.tree.leaves_with_path(params) if "kernel" in str(p[0])])
  # Per projection: forward, input gradient, kernel gradient. Per layer, the attention's scores
  # and output, and in the backward the scores recomputed and four gradient products.
  assert len(mixed) == 3 * projections + 7 * cfg.num_layers
  # The rest, float32, per layer: the backward's rows' sum(dO * O) (a dot).
  assert kinds.count((jnp.float32, jnp.float32)) == cfg.num_layers
  assert len(dots) == len(mixed) + cfg.num_layers


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "tokens, mask, pattern",
  [
    (
      np.ones((2, 3, 4), np.int32),
      np.ones((2, 3, 4), bool),
      r"tokens.*\[batch, seq\].*\(2, 3, 4\)",
    ),
    (np.ones((5,), np.int32), np.ones((5,), bool), r"tokens.*\(5,\)"),
    (np.full((2, 4), VOCAB, np.int32), np.ones((2, 4), bool), r"tokens.*vocab_size=41.*\(2, 4\)"),
    (np.full((2, 4), -1, np.int32), np.ones((2, 4), bool), r"tokens.*min -1"),
    (np.ones((2, 25), np.int32), np.ones((2, 25), bool), r"tokens.*25.*\(2, 25\).*max_len=24"),
    (np.ones((2, 4), np.int32), np.ones((2, 5), bool), r"mask.*\(2, 4\).*\(2, 5\)"),
    (np.ones((2, 4), np.float32), np.ones((2, 4), bool), r"tokens.*integer"),
  ],
)
def test_bad_input_raises_value_error_naming_argument_and_shape(tokens, mask, pattern):
  model, params, _ = _setup(CFG)
  with pytest.raises(ValueError, match=pattern):
    model.apply(params, tokens, mask)


def test_shape_errors_are_raised_at_trace_time_under_jit():
  model, params, _ = _setup(CFG)
  with pytest.raises(ValueError, match=r"mask.*\(2, 4\).*\(2, 5\)"):
    jax.jit(model.apply)(params, np.ones((2, 4), np.int32), np.ones((2, 5), bool))


def test_token_range_is_checked_only_on_concrete_values():
  check_token_range(np.array([0, 40]), VOCAB)  # in range: no error
  with pytest.raises(ValueError, match="labels"):
    check_token_range(np.array([0, 41]), VOCAB, name="labels")
  seen = []

  @jax.jit
  def traced(x):
    seen.append(is_concrete(x))
    check_token_range(x, VOCAB)  # a tracer: skipped, must not raise or concretise
    return x

  traced(jnp.array([100]))
  assert seen == [False] and is_concrete(jnp.array([1]))


def test_out_of_range_ids_under_jit_make_their_row_nan_negative_ones_included():
  # unchecked under jit, an id must not silently read another token's embedding: a negative
  # one (-100 is Hugging Face's ignore index) would wrap to the vocabulary's end
  model, params, _ = _setup(CFG)
  tokens, mask = np.ones((2, 4), np.int32), np.ones((2, 4), bool)
  apply = jax.jit(model.apply)
  good = np.asarray(apply(params, tokens, mask))
  for bad in (VOCAB, -1, -100):
    got = np.asarray(apply(params, np.where(np.eye(2, 4, 1) > 0, bad, tokens), mask))
    assert np.isnan(got[0]).all() and np.isnan(got[1]).all(), bad
  got = np.asarray(apply(params, np.array([[1, -1, 1, 1], [1, 1, 1, 1]], np.int32), mask))
  assert np.isnan(got[0]).all()
  np.testing.assert_array_equal(got[1], good[1])


def test_kv_cache_rejects_more_tokens_than_slots():
  model, params, _ = _setup(CFG)
  cache = init_cache(CFG, 2, 4)
  with pytest.raises(ValueError, match=r"tokens has length 5.*cache_len=4"):
    model.apply(params, np.ones((2, 5), np.int32), np.ones((2, 5), bool), cache=cache)
  with pytest.raises(ValueError, match=r"cache has batch size 2"):
    model.apply(params, np.ones((3, 1), np.int32), np.ones((3, 1), bool), cache=cache)
  short = cache._replace(keys=cache.keys[:-1], values=cache.values[:-1])
  with pytest.raises(ValueError, match=rf"cache has {CFG.num_layers - 1} key .*num_layers="):
    model.apply(params, np.ones((2, 1), np.int32), np.ones((2, 1), bool), cache=short)


@pytest.mark.parametrize(
  "fields, pattern",
  [
    (dict(width=30, num_heads=4), "width must be divisible by num_heads"),
    (dict(position="alibi"), "position"),
    (dict(width=6, num_heads=2), "even head_dim"),
    (dict(dtype=jnp.float16), "dtype"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_kv_heads=3), "num_kv_heads must divide num_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(param_dtype=jnp.float16), "param_dtype"),
    (dict(mlp_dim=0), "mlp_dim"),
    (dict(attention_query_block=0), "attention_query_block"),
  ],
)
def test_config_rejects_invalid_hyperparameters(fields, pattern):
  with pytest.raises(ValueError, match=pattern):
    dataclasses.replace(CFG, **fields)


def test_rope_scaling_rejects_unknown_kind_and_bad_factors():
  with pytest.raises(ValueError, match="rope_scaling.kind"):
    RopeScaling("yarn", 2.0)
  with pytest.raises(ValueError, match="rope_scaling.factor"):
    RopeScaling("linear", 0.0)
  with pytest.raises(ValueError, match="high_freq_factor"):
    RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=1.0)


def test_linear_rope_scaling_divides_every_frequency():
  base = rope_frequencies(8, base=100.0)
  scaled = rope_frequencies(8, base=100.0, scaling=RopeScaling("linear", 4.0))
  np.testing.assert_allclose(scaled, base / 4.0)
  llama = rope_frequencies(8, base=500.0, scaling=LLAMA.rope_scaling)
  np.testing.assert_allclose(llama, _np_inv_freq(LLAMA), rtol=1e-12)
  unscaled = rope_frequencies(8, base=500.0)
  ratio = unscaled / llama
  assert ratio[0] == 1.0 and 1.0 < ratio[1] < 4.0 and np.allclose(ratio[2:], 4.0)  # 3 bands


def test_apply_rotary_and_its_gradient_match_a_float64_rotation():
  """The table lookup rotates each half-split pair by ``position * inv_freq`` (NumPy float64
  reference), at every position up to ``max_position - 1``; its gradient is the inverse
  rotation of the cotangent."""
  rng = np.random.default_rng(5)
  x, g = rng.normal(size=(2, 2, 6, 3, 8))
  positions = np.array([[0, 1, 2, 39, 7, 0], [5, 5, 6, 30, 38, 39]])
  inv_freq = rope_frequencies(8, base=100.0, scaling=RopeScaling("linear", 2.0))
  angles = positions[..., None, None] * inv_freq  # [b, t, 1, half]
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2, g1, g2 = x[..., :4], x[..., 4:], g[..., :4], g[..., 4:]
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  want_grad = np.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1)
  rotate = lambda x: apply_rotary(x, jnp.asarray(positions), inv_freq, max_position=40)  # noqa: E731
  got, vjp = jax.vjp(rotate, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vjp(jnp.asarray(g, jnp.float32))[0], want_grad, rtol=1e-5, atol=1e-5)


def test_existing_default_parameter_tree_is_unchanged():
  model = Transformer(CFG)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.ones((B, S), jnp.int32), jnp.ones((B, S), bool)
  )
  block = shapes["params"]["block_0"]
  assert sorted(block) == ["attn_out", "ln_attn", "ln_mlp", "mlp_in", "mlp_out", "qkv"]
  assert block["qkv"]["kernel"].shape == (32, 3, 2, 16) and "bias" in block["qkv"]
  assert sorted(shapes["params"]) == ["block_0", "block_1", "embed", "ln_final"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_remat_gives_the_same_outputs_and_gradients(cfg):
  _, params, _ = _setup(cfg)
  tokens = _random_tokens(8, (B, S))
  mask = np.array([[1] * 10, [0, 0] + [1] * 8], bool)

  def loss(params, c):
    return jnp.sum(Transformer(c).apply(params, tokens, mask) ** 2)

  want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
    params, dataclasses.replace(cfg, remat=True)
  )
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("block", [3, 4])  # S = 10: uneven (3, 3, 3, 1) and (4, 4, 2) blocks
def test_attention_query_blocks_give_the_same_outputs_and_gradients(cfg, block):
  _, params, _ = _setup(cfg)
  tokens = _random_tokens(9, (B, S))
  mask = np.array([[1] * 7 + [0] * 3, [0, 0, 0, 0, 0] + [1] * 5], bool)  # right, left pads

  def loss(params, c):
    return jnp.sum(Transformer(c).apply(params, tokens, mask) ** 2)

  want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  blocked = dataclasses.replace(cfg, attention_query_block=block)
  got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, blocked)
  # The same sums grouped differently: float32 rounding, 1e-6 of the scale (the loss is ~700,
  # the largest gradient ~100-200).
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want[1]))
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * scale)
  hidden = Transformer(blocked).apply(params, tokens, mask)
  ref = _np_transformer(params, tokens, mask, cfg)
  np.testing.assert_allclose(np.asarray(hidden)[mask], ref[mask], atol=2e-4, rtol=2e-4)


def _reference_attention(q, k, v, mask):
  """Plain masked softmax attention (the probabilities materialised, autodiff's backward),
  grouped-query, zeros for rows with no valid key: the reference for the library's own VJP."""
  b, t, heads, d = q.shape
  k = jnp.repeat(k, heads // k.shape[1], axis=1)  # [b, heads, L, d]
  v = jnp.repeat(v, heads // v.shape[1], axis=1)
  logits = jnp.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(d)
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  valid = jnp.any(mask, axis=-1)[:, None, :, None]
  probs = jax.nn.softmax(jnp.where(valid, logits, 0.0), axis=-1)
  return jnp.einsum("bhts,bhsd->bthd", jnp.where(valid, probs, 0.0), v)


@pytest.mark.parametrize("kv_heads, block", [(4, None), (2, 3), (4, 4)])
def test_attention_gradients_match_float64_autodiff_of_plain_softmax_attention(kv_heads, block):
  """The recomputing backward (saved log-sum-exp, D = rowsum(dO * O)) against autodiff of the
  plain attention in float64: causal with right and left padding (left-pad rows attend no key
  and output zeros), query blocks uneven at t = 10, grouped-query heads."""
  t, heads, d = 10, 4, 8
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, t, heads, d)).astype(np.float32)
  k = rng.normal(size=(2, kv_heads, t, d)).astype(np.float32)
  v = rng.normal(size=(2, kv_heads, t, d)).astype(np.float32)
  pads = np.array([[1] * 7 + [0] * 3, [0] * 4 + [1] * 6], bool)
  mask = np.tril(np.ones((t, t), bool))[None] & pads[:, None, :]
  weights = rng.normal(size=(2, t, heads, d)).astype(np.float32)

  def loss(attend, q, k, v):
    return jnp.sum(jnp.sin(attend(q, k, v)) * weights)

  got = jax.jit(
    jax.grad(
      functools.partial(loss, lambda q, k, v: attention.attend(q, k, v, mask, query_block=block)),
      (0, 1, 2),
    )
  )(q, k, v)
  with jax.enable_x64(True):
    want = jax.jit(
      jax.grad(
        functools.partial(loss, lambda q, k, v: _reference_attention(q, k, v, mask)), (0, 1, 2)
      )
    )(*(np.float64(x) for x in (q, k, v)))
  assert np.abs(np.asarray(want[0])[1, :4]).max() == 0  # rows with no valid key
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads, block", [(4, None), (2, 3)])
def test_bfloat16_attention_and_its_gradients_match_float64_of_the_rounded_operands(
  kv_heads, block
):
  """bfloat16 queries, keys and values: products of bfloat16 operands summed in float32,
  probabilities and score gradients rounded to bfloat16 for the products that read them. The
  output is within 2^-8 of max |v| of float64 attention on the same (rounded) operands (one
  rounding of each probability is 2^-9 relative); the gradients, bfloat16 like their primals,
  within 2^-6 of their largest entry. The float32 path on the same operands is not what ran."""
  t, heads, d = 10, 4, 8
  rng = np.random.default_rng(1)
  q, k, v = (
    jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)
    for shape, scale in [((2, t, heads, d), 2), ((2, kv_heads, t, d), 2), ((2, kv_heads, t, d), 1)]
  )
  pads = np.array([[1] * 7 + [0] * 3, [0] * 4 + [1] * 6], bool)
  mask = np.tril(np.ones((t, t), bool))[None] & pads[:, None, :]
  weights = rng.normal(size=(2, t, heads, d)).astype(np.float32)

  def attend(q, k, v):
    return attention.attend(q, k, v, mask, query_block=block)

  def loss(attend, q, k, v):
    return jnp.sum(jnp.sin(attend(q, k, v)) * weights)

  out = np.asarray(jax.jit(attend)(q, k, v))
  grads = jax.jit(jax.grad(functools.partial(loss, attend), (0, 1, 2)))(q, k, v)
  out32 = np.asarray(jax.jit(attend)(*(a.astype(jnp.float32) for a in (q, k, v))))
  with jax.enable_x64(True):
    q64, k64, v64 = (np.float64(a) for a in (q, k, v))
    want = np.asarray(_reference_attention(q64, k64, v64, mask))
    want_grads = jax.grad(
      functools.partial(loss, lambda q, k, v: _reference_attention(q, k, v, mask)), (0, 1, 2)
    )(q64, k64, v64)
  assert out.dtype == np.float32
  assert np.abs(out - want).max() <= 2**-8 * np.abs(np.float64(v)).max()
  assert np.abs(out32 - want).max() < 1e-5 < np.abs(out - out32).max()
  for g, w in zip(grads, want_grads):
    assert g.dtype == jnp.bfloat16
    w = np.asarray(w)
    assert np.abs(np.float64(g) - w).max() <= 2**-6 * np.abs(w).max()


def test_attention_query_blocks_decode_with_a_kv_cache_like_the_full_forward():
  _, params, _ = _setup(CFG)
  blocked = Transformer(dataclasses.replace(CFG, attention_query_block=2))
  tokens = _random_tokens(10, (B, S))
  mask = np.ones((B, S), bool)
  full = np.asarray(Transformer(CFG).apply(params, tokens, mask))
  cache = init_cache(CFG, B, cache_len=S)
  out, cache = blocked.apply(params, tokens[:, :6], mask[:, :6], cache)
  step, _ = blocked.apply(params, tokens[:, 6:], mask[:, 6:], cache)
  np.testing.assert_allclose(np.asarray(out), full[:, :6], atol=1e-5)
  np.testing.assert_allclose(np.asarray(step), full[:, 6:], atol=1e-5)


def test_bfloat16_parameters_are_stored_in_bfloat16():
  cfg = dataclasses.replace(LLAMA, param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(
    Transformer(cfg).init, jax.random.key(0), jnp.ones((B, S), jnp.int32), jnp.ones((B, S), bool)
  )
  assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
  _, params, apply32 = _setup(LLAMA)
  tokens = _random_tokens(9, (B, S))
  mask = np.ones((B, S), bool)
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  out16 = np.asarray(jax.jit(Transformer(cfg).apply)(params16, tokens, mask))
  out32 = np.asarray(apply32(params, tokens, mask))
  assert out16.dtype == np.float32
  assert 0 < np.abs(out16 - out32).max() < 0.15


def test_architecture_ignores_how_a_config_computes_and_stores_only():
  cfg = TransformerConfig(vocab_size=16, num_layers=1, width=8, num_heads=2, max_len=8)
  other = dataclasses.replace(
    cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True, attention_query_block=4
  )
  assert other != cfg and other.architecture() == cfg.architecture() == cfg
  for field, value in (("width", 16), ("max_len", 16), ("norm", "rmsnorm"), ("qkv_bias", False)):
    changed = dataclasses.replace(other, **{field: value})
    assert changed.architecture() != cfg.architecture(), field
