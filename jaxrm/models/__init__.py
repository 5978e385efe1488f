"""Models layer: flax modules with pure ``init``/``apply`` (transformer backbone, reward model,
distributional reward models (DPL), policy with optional value head, ensembles by ``vmap``,
presets) and the KV-cached sampler.
``jaxrm.models.lora`` (LoRA adapters through qwix) is imported on use."""

from jaxrm.models import (
  distributional_rm,
  ensemble,
  policy,
  presets,
  reward_model,
  sampling,
  transformer,
)
