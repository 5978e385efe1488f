"""Checks that Hugging Face transformers loads jaxrm exports and computes the same outputs.

Needs torch and transformers (run with the venv used by make_fixtures.py)::

  python -c "..."  # export with jaxrm.io.hf, saving jaxrm's outputs as <dir>/jaxrm_out.npy
  /tmp/venv-torch/bin/python tests/data/hf/check_export.py <export_dir> <fixture_name> ...

For each ``<export_dir>/<name>`` it loads the model with ``AutoModelForCausalLM`` or (for
names containing ``reward``) ``AutoModelForSequenceClassification``, runs the fixture's
reference inputs and prints the largest difference to ``jaxrm_out.npy`` on real tokens.
"""

import os
import sys

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))


def main(root, names):
  for name in names:
    tokens = np.load(os.path.join(HERE, name, "reference_tokens.npy"))
    mask = np.load(os.path.join(HERE, name, "reference_mask.npy"))
    auto = (
      transformers.AutoModelForSequenceClassification
      if "reward" in name
      else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(os.path.join(root, name)).eval()
    with torch.no_grad():
      out = model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
      ).logits.numpy()
    want = np.load(os.path.join(root, name, "jaxrm_out.npy"))
    diff = np.abs(out[:, 0] - want) if out.ndim == 2 else np.abs(out - want)[mask]
    print(f"{name}: {type(model).__name__} max |transformers - jaxrm| = {diff.max():.3g}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
