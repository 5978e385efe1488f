"""I/O layer: orbax checkpoints, Hugging Face checkpoints (import/export), loading reward-model
runs, reward-model reports.

``jaxrm.io.report`` (matplotlib) is imported on use."""

from jaxrm.io import checkpoint, hf, rm_io
