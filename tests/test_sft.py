"""Tests for jaxrm.steps.sft: masked next-token loss, the SFT step, device equivalence."""

import functools
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.data.hf_tokenizer import HFTokenizer
from jaxrm.data.preferences import split_shared_prompt
from jaxrm.data.tokenizer import encode_prompt_response
from jaxrm.io import hf
from jaxrm.models.policy import PolicyModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import parallel
from jaxrm.steps import train_state as ts
from jaxrm.steps.sft import response_nll, sft_loss, sft_step

VOCAB, SEQ, BATCH = 17, 8, 16
# A tiny Llama-family policy (RMSNorm, SwiGLU, GQA, untied head without bias).
CFG = TransformerConfig(
  vocab_size=VOCAB,
  num_layers=1,
  width=16,
  num_heads=4,
  num_kv_heads=2,
  max_len=SEQ,
  norm="rmsnorm",
  mlp="swiglu",
  mlp_dim=24,
  qkv_bias=False,
  attn_out_bias=False,
  mlp_bias=False,
  head_bias=False,
)
MODEL = PolicyModel(CFG)


def make_batch(seed, b=BATCH):
  """Left-padded prompts of 1-4 tokens, responses of 0-4 tokens, right padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(b, SEQ)).astype(np.int32)
  prompt_len = rng.integers(1, 5, size=b)
  resp_len = rng.integers(0, 5, size=b)
  pos = np.arange(SEQ)[None]
  mask = pos < (prompt_len + resp_len)[:, None]
  response = mask & (pos >= prompt_len[:, None])
  return {"tokens": tokens, "mask": mask, "response_mask": response}


def np_sft_loss(logits, tokens, response_mask):
  """float64 reference: -mean over response tokens t>=1 of log softmax(logits[t-1])[tokens[t]]."""
  logits = np.asarray(logits, np.float64)
  total, count = 0.0, 0
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      if response_mask[b, t]:
        row = logits[b, t - 1]
        logz = row.max() + np.log(np.exp(row - row.max()).sum())
        total += logz - row[tokens[b, t]]
        count += 1
  return total / max(count, 1), count


def test_sft_loss_and_gradient_match_float64_numpy_reference():
  rng = np.random.default_rng(0)
  batch = make_batch(1)
  logits = rng.normal(size=(BATCH, SEQ, VOCAB)).astype(np.float32) * 3
  want, count = np_sft_loss(logits, batch["tokens"], batch["response_mask"])
  got = sft_loss(logits, batch["tokens"], batch["response_mask"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(response_nll(logits, batch["tokens"], batch["response_mask"])[1]) == count
  # d loss / d logits[b, t-1] = (softmax - onehot(tokens[b, t])) / count on response targets.
  grad = np.asarray(jax.grad(sft_loss)(logits, batch["tokens"], batch["response_mask"]))
  want_grad = np.zeros_like(logits, np.float64)
  for b in range(BATCH):
    for t in range(1, SEQ):
      if batch["response_mask"][b, t]:
        p = np.exp(logits[b, t - 1] - logits[b, t - 1].max())
        p /= p.sum()
        p[batch["tokens"][b, t]] -= 1
        want_grad[b, t - 1] = p / count
  np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_loss_ignores_prompt_and_padding_targets():
  rng = np.random.default_rng(2)
  batch = make_batch(3)
  logits = rng.normal(size=(BATCH, SEQ, VOCAB)).astype(np.float32)
  base = sft_loss(logits, batch["tokens"], batch["response_mask"])
  changed = batch["tokens"].copy()
  not_response = ~batch["response_mask"]
  changed[not_response] = (changed[not_response] + 1) % VOCAB  # other prompt/pad targets
  logits2 = logits.copy()
  predicts_response = np.zeros_like(batch["response_mask"])
  predicts_response[:, :-1] = batch["response_mask"][:, 1:]
  logits2[~predicts_response] += rng.normal(size=logits2[~predicts_response].shape)
  np.testing.assert_allclose(sft_loss(logits2, changed, batch["response_mask"]), base, rtol=1e-6)


def _state(optimizer):
  params = MODEL.init(jax.random.key(0), jnp.ones((2, SEQ), jnp.int32), jnp.ones((2, SEQ), bool))
  return ts.create_train_state(params, optimizer, jax.random.key(1))


@pytest.mark.parametrize("microbatch_size", [None, 4, 5])
def test_sgd_step_lowers_loss_and_follows_the_gradient_of_the_reference_loss(microbatch_size):
  # In slices of 4 sequences (their token counts differ): still the whole batch's token mean.
  opt = optax.sgd(0.5)
  state = _state(opt)
  batch = make_batch(4)
  step = functools.partial(sft_step, apply_fn=MODEL.apply, optimizer=opt)
  if microbatch_size is not None and BATCH % microbatch_size:
    with pytest.raises(ValueError, match="microbatch_size must be a positive int dividing the"):
      step(state, batch, microbatch_size=microbatch_size)
    return
  new, metrics = jax.jit(functools.partial(step, microbatch_size=microbatch_size))(state, batch)
  logits, _ = jax.jit(MODEL.apply)(state.params, batch["tokens"], batch["mask"])
  want, count = np_sft_loss(logits, batch["tokens"], batch["response_mask"])
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  assert float(metrics["num_tokens"]) == count and not bool(metrics["nonfinite"])

  @jax.jit
  def loss(p):
    out, _ = MODEL.apply(p, batch["tokens"], batch["mask"])
    return sft_loss(out, batch["tokens"], batch["response_mask"])

  grads = jax.jit(jax.grad(loss))(state.params)
  expect = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new.params, expect)
  assert float(loss(new.params)) < float(metrics["loss"])


def test_nonfinite_loss_skips_the_update():
  opt = optax.sgd(0.1)
  state = _state(opt)
  params = jax.tree.map(lambda x: x, state.params)
  params["params"]["lm_head"]["kernel"] = (
    params["params"]["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  )
  state = state._replace(params=params)
  step = jax.jit(functools.partial(sft_step, apply_fn=MODEL.apply, optimizer=opt))
  new, metrics = step(state, make_batch(5))
  assert bool(metrics["nonfinite"]) and int(new.num_skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda b: b.pop("response_mask"), r"missing keys \['response_mask'\]"),
    (lambda b: b.update(mask=b["mask"][:, :3]), r"batch\['mask'\] must have the shape"),
    (
      lambda b: b.update(tokens=b["tokens"][0]),
      r"batch\['tokens'\] must have shape \[batch, seq\]",
    ),
  ],
)
def test_malformed_batch_raises_value_error_naming_the_field(mutate, message):
  batch = make_batch(6)
  mutate(batch)
  with pytest.raises(ValueError, match=message):
    sft_step(_state(optax.sgd(0.1)), batch, apply_fn=MODEL.apply, optimizer=optax.sgd(0.1))


@pytest.mark.parametrize(
  "mode, kwargs, microbatch_size",
  [("shard_map", {}, None), ("shard_map", {}, 1), ("fsdp", {"fsdp_min_size": 64}, None)],
)
def test_parallel_sft_step_matches_single_device(mode, kwargs, microbatch_size):
  # microbatch_size=1: each device's two sequences one at a time, against the whole batch.
  opt = optax.adamw(1e-2)
  step = functools.partial(sft_step, apply_fn=MODEL.apply, optimizer=opt)
  batches = [make_batch(10 + i) for i in range(2)]  # uneven token counts per device

  def run(step, mode, **kw):
    pstep = parallel.make_parallel_step(step, mode=mode, **kw)
    state = pstep.put_state(_state(opt))
    out = []
    for b in batches:
      state, m = pstep(state, pstep.shard_batch(b))
      out.append(jax.device_get(pstep.unreplicate(m)))
    return pstep, jax.device_get(pstep.unreplicate(state)), out, state

  _, ref, ref_m, _ = run(step, "jit")
  sliced = functools.partial(step, microbatch_size=microbatch_size)
  pstep, got, got_m, live = run(sliced, mode, **kwargs)
  assert pstep.num_devices == 8
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.params, ref.params
  )
  for m, r in zip(got_m, ref_m):
    for k in ("loss", "num_tokens", "grad_norm"):
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, err_msg=k)
  if mode == "fsdp":  # the large kernels really are split over the 8 devices
    kernel = live.params["params"]["backbone"]["embed"]["embedding"]
    assert len({s.data.shape for s in kernel.addressable_shards}) == 1
    assert kernel.addressable_shards[0].data.size * 8 == kernel.size


def test_sft_on_an_imported_checkpoint_with_its_tokenizer_lowers_response_loss():
  """HH chosen responses, the fixture BPE tokenizer, the tiny imported Llama: loss goes down."""
  data = os.path.join(os.path.dirname(__file__), "data")
  with gzip.open(os.path.join(data, "hh_rlhf_sample.jsonl.gz"), "rt") as f:
    rows = [json.loads(line) for _, line in zip(range(8), f)]
  prompts, responses = zip(*[split_shared_prompt(r["chosen"], r["rejected"])[:2] for r in rows])
  tok = HFTokenizer.from_pretrained(os.path.join(data, "hf", "tokenizer"))
  enc = encode_prompt_response(tok, prompts, responses, max_len=64, add_bos=True)
  batch = {"tokens": enc.tokens, "mask": enc.mask, "response_mask": enc.response_mask}
  model = hf.import_policy(os.path.join(data, "hf", "llama"))
  opt = optax.adam(3e-3)
  step = jax.jit(
    functools.partial(sft_step, apply_fn=PolicyModel(model.config).apply, optimizer=opt)
  )
  state = ts.create_train_state(model.variables, opt, jax.random.key(0))
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(metrics["num_tokens"]) == int(enc.response_mask[:, 1:].sum())
  assert losses[-1] < losses[0], losses
