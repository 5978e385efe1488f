"""Math layer: pure functions on arrays (no parameters, no I/O), each testable against a NumPy
reference: preference likelihoods and losses (reward-model and DPO-family), metrics, KL estimators, advantages,
policy-gradient losses, best-of-n estimators, ensemble objectives, distributional preference
learning (DPL), scaling-law fits."""

from jaxrm.math import (
  advantages,
  best_of_n,
  distributional,
  dpo,
  kl,
  metrics,
  objectives,
  pg_losses,
  preference,
  running_stats,
  scaling,
)
