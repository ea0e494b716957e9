"""One readable file per algorithm, each with its config and its step.

* on-policy, stepped by the runner: ``ppo`` (token-level GAE, a value head), ``reinforce`` and
  ``rloo`` (no value head);
* whole-run (the runner calls ``fit`` once): ``grpo`` (TRL's GRPOTrainer, causal policies) and
  ``qsft`` (offline, on labelled samples; it also brings its own decoding, ``translate``).
"""

from __future__ import annotations

from typing import Any, Union

from mtrl.algorithms.bon import BestOfN, BestOfNConfig
from mtrl.algorithms.common import RunContext
from mtrl.algorithms.dpo import DPO, DPOConfig
from mtrl.algorithms.grpo import GRPO, GRPOConfig
from mtrl.algorithms.ppo import PPO, PPOConfig
from mtrl.algorithms.qsft import QSFT, QSFTConfig
from mtrl.algorithms.reinforce import Reinforce, ReinforceConfig
from mtrl.algorithms.twa import TWA, TWAConfig

# algorithm.name -> (its config class, the class that runs it)
ALGORITHMS: dict[str, tuple[type, type]] = {
    "ppo": (PPOConfig, PPO),
    "reinforce": (ReinforceConfig, Reinforce),
    "rloo": (ReinforceConfig, Reinforce),
    "grpo": (GRPOConfig, GRPO),
    "qsft": (QSFTConfig, QSFT),
    "twa": (TWAConfig, TWA),
    "bon": (BestOfNConfig, BestOfN),
    "dpo": (DPOConfig, DPO),
}
AlgorithmConfig = Union[PPOConfig, ReinforceConfig, GRPOConfig, QSFTConfig, TWAConfig, BestOfNConfig, DPOConfig]  # noqa: UP007


def build_algorithm(cfg: Any, policy: Any, rewarder: Any, gen: Any, accelerator: Any, total_steps: int) -> Any:
    """The algorithm object for ``cfg.name``, owning its optimiser, reference model and state."""
    return ALGORITHMS[cfg.name][1](cfg, policy, rewarder, gen, accelerator, total_steps)


__all__ = ["ALGORITHMS", "AlgorithmConfig", "BestOfNConfig", "DPOConfig", "GRPOConfig", "PPOConfig", "QSFTConfig", "ReinforceConfig",
           "RunContext", "TWAConfig", "build_algorithm"]
