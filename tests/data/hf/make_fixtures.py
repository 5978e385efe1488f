"""Regenerates the tiny Hugging Face checkpoints and reference outputs in this folder.

Needs torch and transformers (not jaxrm's dependencies), e.g. a separate virtual environment::

  python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch transformers
  /tmp/venv-torch/bin/python tests/data/hf/make_fixtures.py

Each ``<name>/`` folder holds a random tiny model saved by ``save_pretrained`` (``config.json``
and ``model.safetensors``, or shards plus ``model.safetensors.index.json``), and the
reference computed by the Hugging Face model in float32 on fixed inputs:
``reference_tokens.npy`` ``[2, 12]`` int32, ``reference_mask.npy`` ``[2, 12]`` bool (row 1 is
right-padded with the pad id) and ``reference_logits.npy`` (``[2, 12, vocab]`` for
``*ForCausalLM``, ``[2]`` scores for ``*ForSequenceClassification``). Weights are drawn with a
large scale (norm scales around 1, biases non-zero) so a wrong mapping shows in the logits.

``tokenizer/`` is a byte-level BPE tokenizer trained with the ``tokenizers`` library on the
HH-RLHF sample (``../hh_rlhf_sample.jsonl.gz``), with a ChatML chat template in
``tokenizer_config.json``; ``tokenizer_reference.json`` holds texts and their ids.
"""

import gzip
import json
import os
import shutil

import numpy as np
import tokenizers
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 320
PAD = 0
SEQ = 12

CHATML = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
  "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
  rms_norm_eps=1e-5,
  pad_token_id=PAD,
  bos_token_id=1,
  eos_token_id=2,
)
ROPE_LLAMA3 = dict(
  rope_type="llama3",
  rope_theta=500000.0,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=32,
)
GPT2 = dict(
  vocab_size=VOCAB,
  n_embd=32,
  n_layer=2,
  n_head=4,
  n_positions=64,
  pad_token_id=PAD,
  bos_token_id=1,
  eos_token_id=2,
  attn_pdrop=0.0,
  embd_pdrop=0.0,
  resid_pdrop=0.0,
)


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = any(k in name for k in ("norm", "ln_"))
      if is_norm and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.3 * noise)


def _inputs(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(2, SEQ)).astype(np.int32)
  mask = np.ones((2, SEQ), bool)
  mask[1, 8:] = False
  tokens[1, 8:] = PAD
  return tokens, mask


def _save(name, model, *, seed, max_shard_size=None):
  out = os.path.join(HERE, name)
  shutil.rmtree(out, ignore_errors=True)
  model.eval()
  kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(out, safe_serialization=True, **kwargs)
  tokens, mask = _inputs(seed)
  with torch.no_grad():
    out_t = model(
      input_ids=torch.from_numpy(tokens.astype(np.int64)),
      attention_mask=torch.from_numpy(mask.astype(np.int64)),
    )
  logits = out_t.logits.float().numpy()
  if logits.ndim == 2:  # sequence classification: [batch, 1]
    logits = logits[:, 0]
  np.save(os.path.join(out, "reference_tokens.npy"), tokens)
  np.save(os.path.join(out, "reference_mask.npy"), mask)
  np.save(os.path.join(out, "reference_logits.npy"), logits.astype(np.float32))
  print(name, sorted(os.listdir(out)))


def _texts():
  path = os.path.join(HERE, "..", "hh_rlhf_sample.jsonl.gz")
  with gzip.open(path, "rt") as f:
    for i, line in enumerate(f):
      if i >= 400:
        break
      row = json.loads(line)
      yield row["chosen"]
      yield row["rejected"]


def make_tokenizer():
  out = os.path.join(HERE, "tokenizer")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=VOCAB,
    special_tokens=special,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_texts(), trainer)
  tok.save(os.path.join(out, "tokenizer.json"))
  config = dict(
    bos_token="<s>",
    eos_token="<|im_end|>",
    pad_token="<pad>",
    chat_template=CHATML,
    tokenizer_class="PreTrainedTokenizerFast",
  )
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
  hf.chat_template = CHATML
  texts = ["Human: How do I bake bread?\n\nAssistant: Mix flour, water and yeast.", "héllo ✓"]
  messages = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour, water and yeast."},
  ]
  reference = dict(
    texts=texts,
    ids=[tok.encode(t).ids for t in texts],
    messages=messages,
    chat=hf.apply_chat_template(messages, tokenize=False),
    chat_generation_prompt=hf.apply_chat_template(
      messages[:1], tokenize=False, add_generation_prompt=True
    ),
  )
  with open(os.path.join(HERE, "tokenizer_reference.json"), "w") as f:
    json.dump(reference, f, indent=2, ensure_ascii=False)
  print("tokenizer", tok.get_vocab_size())


def main():
  torch.manual_seed(0)
  t = transformers
  m = t.GPT2LMHeadModel(t.GPT2Config(**GPT2))
  _randomise(m, 1)
  _save("gpt2", m, seed=11)

  m = t.GPT2ForSequenceClassification(t.GPT2Config(num_labels=1, **GPT2))
  _randomise(m, 2)
  _save("gpt2_reward", m, seed=12)

  llama = dict(LLAMA, rope_parameters=ROPE_LLAMA3, tie_word_embeddings=False)
  m = t.LlamaForCausalLM(t.LlamaConfig(**llama))
  _randomise(m, 3)
  _save("llama", m, seed=13, max_shard_size="100KB")  # sharded: model.safetensors.index.json

  m = t.LlamaForSequenceClassification(t.LlamaConfig(num_labels=1, **llama))
  _randomise(m, 4)
  _save("llama_reward", m, seed=14)

  qwen = dict(
    LLAMA,
    rope_parameters=dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
  )
  m = t.Qwen2ForCausalLM(t.Qwen2Config(**qwen))
  _randomise(m, 5)
  _save("qwen2", m, seed=15)

  mistral = dict(LLAMA, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
  m = t.MistralForCausalLM(t.MistralConfig(sliding_window=None, **mistral))
  _randomise(m, 6)
  _save("mistral", m, seed=16)

  make_tokenizer()


if __name__ == "__main__":
  main()
