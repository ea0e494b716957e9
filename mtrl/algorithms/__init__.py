"""One readable file per algorithm, each with its config and its step.

* on-policy, stepped by the runner: ``ppo`` (token-level GAE, a value head), ``reinforce`` and
  ``rloo`` (no value head);
* whole-run (the runner calls ``fit`` once): ``grpo`` (TRL's GRPOTrainer, causal policies) and
  ``qsft`` (offline, on labelled samples; it also brings its own decoding, ``translate``).
"""

from __future__ import annotations

from typing import Any, Union

from mtrl.algorithms.common import RunContext
from mtrl.algorithms.grpo import GRPO, GRPOConfig
from mtrl.algorithms.ppo import PPO, PPOConfig
from mtrl.algorithms.qsft import QSFT, QSFTConfig
from mtrl.algorithms.reinforce import Reinforce, ReinforceConfig

# algorithm.name -> (its config class, the class that runs it)
ALGORITHMS: dict[str, tuple[type, type]] = {
    "ppo": (PPOConfig, PPO),
    "reinforce": (ReinforceConfig, Reinforce),
    "rloo": (ReinforceConfig, Reinforce),
    "grpo": (GRPOConfig, GRPO),
    "qsft": (QSFTConfig, QSFT),
}
AlgorithmConfig = Union[PPOConfig, ReinforceConfig, GRPOConfig, QSFTConfig]  # noqa: UP007


def build_algorithm(cfg: Any, policy: Any, rewarder: Any, gen: Any, accelerator: Any, total_steps: int) -> Any:
    """The algorithm object for ``cfg.name``, owning its optimiser, reference model and state."""
    return ALGORITHMS[cfg.name][1](cfg, policy, rewarder, gen, accelerator, total_steps)


__all__ = ["ALGORITHMS", "AlgorithmConfig", "GRPOConfig", "PPOConfig", "QSFTConfig", "ReinforceConfig",
           "RunContext", "build_algorithm"]
