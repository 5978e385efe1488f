"""The README's library example runs as written (keeps the README true)."""

import os
import re

import jax
import numpy as np

from jaxrm.io import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert blocks, "README.md has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  assert int(namespace["state"].step) == 1
  assert set(namespace["metrics"]) >= {"loss", "accuracy"}


def test_readme_opens_with_the_two_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  commands = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
  assert commands == [
    "pip install -e . && python experiments/overoptimization.py --workdir=runs/overopt",
    "pip install -e '.[test]' && python -m pytest",
  ]
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert commands[1] in f.read()


def test_readme_hugging_face_example_runs_and_exports(tmp_path, monkeypatch):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  (block,) = [b for b in blocks if "import_reward_model" in b]
  monkeypatch.chdir(tmp_path)  # the example writes exported_rm/ into the working directory
  os.symlink(os.path.join(ROOT, "tests"), tmp_path / "tests")
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert int(namespace["state"].step) == 3
  again = hf.import_reward_model(tmp_path / "exported_rm")
  jax.tree.map(np.testing.assert_array_equal, again.variables, namespace["state"].params)
