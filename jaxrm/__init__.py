"""jaxrm: a JAX research library for RLHF reward models.

Layers (imports point downward only): math (preference losses, metrics, KL, advantages,
policy-gradient losses, best-of-n, scaling fits) -> models (transformer, reward model, policy,
ensembles, sampler) -> steps (reward-model step, RL steps, launchers) -> data and I/O
(``jaxrm.data``, tokenizer, checkpoints, reports). ``jaxrm.data``, ``jaxrm.rm_train`` and
``jaxrm.report`` (which import TFDS and matplotlib) are imported on use.
"""

from jaxrm import advantages
from jaxrm import best_of_n
from jaxrm import checkpoint
from jaxrm import ensemble
from jaxrm import kl
from jaxrm import metrics
from jaxrm import objectives
from jaxrm import parallel
from jaxrm import pg_losses
from jaxrm import policy
from jaxrm import preference
from jaxrm import presets
from jaxrm import reward_model
from jaxrm import rl
from jaxrm import rm_io
from jaxrm import rm_step
from jaxrm import rm_sweep
from jaxrm import rollout
from jaxrm import sampling
from jaxrm import scaling
from jaxrm import synthetic
from jaxrm import tokenizer
from jaxrm import train_state
from jaxrm import transformer

# Math.
from jaxrm.advantages import AdaptiveKLState
from jaxrm.advantages import adaptive_kl_init
from jaxrm.advantages import adaptive_kl_update
from jaxrm.advantages import gae
from jaxrm.advantages import grpo_advantages
from jaxrm.advantages import rlhf_token_rewards
from jaxrm.advantages import rloo_advantages
from jaxrm.advantages import whiten
from jaxrm.best_of_n import batched_best_of_n_expected_reward
from jaxrm.best_of_n import best_of_n_expected_reward
from jaxrm.best_of_n import kl_bon
from jaxrm.kl import exact_kl_from_logits
from jaxrm.kl import kl_estimate
from jaxrm.kl import sequence_kl
from jaxrm.metrics import expected_calibration_error
from jaxrm.metrics import pairwise_accuracy
from jaxrm.metrics import summarize_preferences
from jaxrm.objectives import ensemble_objective
from jaxrm.pg_losses import ppo_policy_loss
from jaxrm.pg_losses import ppo_value_loss
from jaxrm.pg_losses import reinforce_loss
from jaxrm.preference import bradley_terry_loss
from jaxrm.preference import get_loss
from jaxrm.preference import hinge_loss
from jaxrm.preference import plackett_luce_loss
from jaxrm.preference import reward_centering_penalty
from jaxrm.preference import thurstone_loss
from jaxrm.scaling import fit_bon
from jaxrm.scaling import fit_rl

# Models.
from jaxrm.ensemble import apply_ensemble
from jaxrm.ensemble import init_ensemble
from jaxrm.policy import PolicyModel
from jaxrm.policy import token_logprobs
from jaxrm.presets import preset
from jaxrm.reward_model import RewardModel
from jaxrm.sampling import sample
from jaxrm.transformer import Transformer
from jaxrm.transformer import TransformerConfig

# Steps.
from jaxrm.parallel import make_parallel_step
from jaxrm.rl import RLConfig
from jaxrm.rl import RLState
from jaxrm.rl import create_rl_state
from jaxrm.rl import grpo_step
from jaxrm.rl import init_value_head
from jaxrm.rl import make_step
from jaxrm.rl import ppo_step
from jaxrm.rl import reinforce_step
from jaxrm.rl import rloo_step
from jaxrm.rm_step import reward_model_step
from jaxrm.rm_sweep import RewardModelSweep
from jaxrm.rollout import Rollout
from jaxrm.train_state import TrainState
from jaxrm.train_state import create_train_state

# I/O.
from jaxrm.checkpoint import CheckpointManager
from jaxrm.rm_io import load_reward_ensemble
from jaxrm.rm_io import load_reward_model
from jaxrm.tokenizer import ByteTokenizer

__version__ = "0.1.0"
