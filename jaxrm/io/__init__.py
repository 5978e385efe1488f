"""I/O layer: orbax checkpoints, the run directory (``rundir``: layout, metrics, atomic writes,
resume rule, progress; ``files``: JSON, atomic writes, caches), loading reward-model runs,
reward-model reports.

``jaxrm.io.report`` (matplotlib) is imported on use."""

from jaxrm.io import checkpoint, files, rm_io, rundir
