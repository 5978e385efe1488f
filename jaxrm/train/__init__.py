"""Training loops: each a ``train_and_evaluate(config, workdir)`` that composes the layers below
and writes everything about a run under ``workdir``. Imported on use (TFDS, matplotlib)."""
