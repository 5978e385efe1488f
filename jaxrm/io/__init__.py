"""I/O layer: orbax checkpoints, loading reward-model runs, reward-model reports.

``jaxrm.io.report`` (matplotlib) is imported on use."""

from jaxrm.io import checkpoint, rm_io
