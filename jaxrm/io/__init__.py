"""I/O layer: orbax checkpoints, the run directory (``rundir``: layout, metrics, atomic writes,
resume rule, progress; ``files``: JSON, atomic writes, caches; ``metrics_file``: reading,
truncating and plotting ``metrics.jsonl``), Hugging Face checkpoints
(import/export; ``hf_runs``: export of trained runs), loading reward-model runs, starting
policies (``policy_io``), scoring strings with a text reward-model run (``text_scoring``),
reward-model reports.

``jaxrm.io.report`` (matplotlib) is imported on use."""

from jaxrm.io import checkpoint, files, hf, rm_io, rundir
