"""Steps layer: pure ``step(state, batch, ...) -> (state, metrics)`` functions that compose the
math and models with optax and take ``apply_fn``s, plus the launchers that run one step body
under ``jit``, ``shard_map``, ``pmap`` or FSDP."""

from jaxrm.steps import dpo, microbatch, parallel, rl, rm_step, rm_sweep, rollout, sft, train_state
