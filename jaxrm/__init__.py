"""jaxrm: a JAX research library for RLHF reward models.

Subpackages, one per layer (imports point downward only):

* ``jaxrm.math``: pure array functions (preference losses, metrics, KL, advantages,
  policy-gradient losses, best-of-n, ensemble objectives, scaling fits);
* ``jaxrm.models``: flax modules (transformer, reward model, policy, ensembles, sampler);
* ``jaxrm.steps``: pure training steps and their launchers (reward-model step and sweep, RL
  steps, ``jit``/``shard_map``/``pmap``/FSDP);
* ``jaxrm.data`` and ``jaxrm.io``: tokenizers, the synthetic world, TFDS builders and
  iterators; checkpoints, run loading, reports;
* ``jaxrm.train``: the training loops.

The most used names are re-exported here (``jaxrm.bradley_terry_loss``, ``jaxrm.RewardModel``,
``jaxrm.ppo_step``, ...). ``jaxrm.data``'s TFDS names, ``jaxrm.io.report`` and ``jaxrm.train``
(TFDS, matplotlib) are imported on use.
"""

# Math.
from jaxrm.data.tokenizer import ByteTokenizer

# I/O.
from jaxrm.io.checkpoint import CheckpointManager
from jaxrm.io.rm_io import load_reward_ensemble, load_reward_model
from jaxrm.math.advantages import (
  AdaptiveKLState,
  adaptive_kl_init,
  adaptive_kl_update,
  gae,
  grpo_advantages,
  rlhf_token_rewards,
  rloo_advantages,
  whiten,
)
from jaxrm.math.best_of_n import (
  batched_best_of_n_expected_reward,
  best_of_n_expected_reward,
  kl_bon,
)
from jaxrm.math.kl import exact_kl_from_logits, kl_estimate, sequence_kl
from jaxrm.math.metrics import expected_calibration_error, pairwise_accuracy, summarize_preferences
from jaxrm.math.objectives import ensemble_objective
from jaxrm.math.pg_losses import ppo_policy_loss, ppo_value_loss, reinforce_loss
from jaxrm.math.preference import (
  bradley_terry_loss,
  get_loss,
  hinge_loss,
  plackett_luce_loss,
  reward_centering_penalty,
  thurstone_loss,
)
from jaxrm.math.scaling import fit_bon, fit_rl

# Models.
from jaxrm.models.ensemble import apply_ensemble, init_ensemble
from jaxrm.models.policy import (
  PolicyFns,
  PolicyModel,
  apply_fn_policy,
  token_logprobs,
  transformer_policy,
)
from jaxrm.models.presets import preset
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.sampling import sample
from jaxrm.models.transformer import Transformer, TransformerConfig

# Steps.
from jaxrm.steps.parallel import make_parallel_step
from jaxrm.steps.rl import (
  Algorithm,
  RLConfig,
  RLState,
  create_rl_state,
  grpo_step,
  init_value_head,
  iterate,
  make_step,
  ppo_step,
  reinforce_step,
  rloo_step,
)
from jaxrm.steps.rm_step import reward_model_step
from jaxrm.steps.rm_sweep import RewardModelSweep
from jaxrm.steps.rollout import Rollout
from jaxrm.steps.train_state import TrainState, create_train_state

__version__ = "0.1.0"
