"""One readable file per algorithm, each with its config and its class; the two kinds are declared in
:mod:`mtrl.algorithms.protocols`.

* online, stepped by the runner: ``ppo`` (token-level GAE, a value head), ``reinforce``, ``rloo`` and ``grpo``
  (group-normalised sequence advantages, optionally with span advantages; no value head);
* offline, one ``fit`` call: ``bon`` (best-of-n SFT), ``dpo``, ``twa`` and ``qsft`` on labelled rows
  (:mod:`mtrl.algorithms.offline_data`).
"""

from __future__ import annotations

from typing import Any, Union

from mtrl.algorithms.bon import BestOfN, BestOfNConfig
from mtrl.algorithms.dpo import DPO, DPOConfig
from mtrl.algorithms.grpo import GRPO, GRPOConfig
from mtrl.algorithms.ppo import PPO, PPOConfig
from mtrl.algorithms.protocols import FitResult, OfflineAlgorithm, OfflineData, OnlineAlgorithm, RunLog
from mtrl.algorithms.qsft import QSFT, QSFTConfig
from mtrl.algorithms.reinforce import Reinforce, ReinforceConfig
from mtrl.algorithms.twa import TWA, TWAConfig

# algorithm.name -> (its config class, the class that runs it)
ONLINE: dict[str, tuple[type, type]] = {
    "ppo": (PPOConfig, PPO),
    "reinforce": (ReinforceConfig, Reinforce),
    "rloo": (ReinforceConfig, Reinforce),
    "grpo": (GRPOConfig, GRPO),
}
OFFLINE: dict[str, tuple[type, type]] = {
    "qsft": (QSFTConfig, QSFT),
    "twa": (TWAConfig, TWA),
    "bon": (BestOfNConfig, BestOfN),
    "dpo": (DPOConfig, DPO),
}
ALGORITHMS = {**ONLINE, **OFFLINE}
AlgorithmConfig = Union[PPOConfig, ReinforceConfig, GRPOConfig, QSFTConfig, TWAConfig, BestOfNConfig, DPOConfig]  # noqa: UP007


def build_online(cfg: Any, policy: Any, rewarder: Any, gen: Any, accelerator: Any, total_steps: int
                 ) -> OnlineAlgorithm:
    """The online algorithm ``cfg.name``, owning its optimiser, reference model and state."""
    return ONLINE[cfg.name][1](cfg, policy, rewarder, gen, accelerator, total_steps)


def build_offline(cfg: Any, policy: Any, rewarder: Any, gen: Any, accelerator: Any, total_steps: int
                  ) -> OfflineAlgorithm:
    """The offline algorithm ``cfg.name``."""
    return OFFLINE[cfg.name][1](cfg, policy, rewarder, gen, accelerator, total_steps)


__all__ = ["ALGORITHMS", "OFFLINE", "ONLINE", "AlgorithmConfig", "BestOfNConfig", "DPOConfig", "FitResult",
           "GRPOConfig", "OfflineAlgorithm", "OfflineData", "OnlineAlgorithm", "PPOConfig", "QSFTConfig",
           "ReinforceConfig", "RunLog", "TWAConfig", "build_offline", "build_online"]
