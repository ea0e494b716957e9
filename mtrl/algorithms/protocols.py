"""The two kinds of algorithm the runner drives, declared as protocols (no base class to inherit).

* **online** (:class:`OnlineAlgorithm`: PPO, REINFORCE, RLOO, GRPO): the runner calls :meth:`~OnlineAlgorithm.step`
  on each batch of sources, and owns the loop around it: logging, checkpoints (``state_dict``), ``--resume``,
  Ctrl-C/SIGTERM and several processes;
* **offline** (:class:`OfflineAlgorithm`: best-of-n, DPO, TWA, Q-SFT):
  the runner calls :meth:`~OfflineAlgorithm.fit` once; what it returns (:class:`FitResult`) says how the
  trained model translates when that is not the policy's own decoding, and which other models it needs.

Both receive the policy and the rewarder the runner built, and train the policy in place; the runner then
saves ``final/`` and evaluates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Pair = tuple[str, str]


@dataclass
class RunLog:
    """Where an algorithm reports: a line for the person, a row of ``metrics.jsonl``, and whether to show bars."""

    message: Callable[[str], None]
    metrics: Callable[[dict[str, Any]], None]
    progress: bool = True


@dataclass
class OfflineData:
    """What an offline algorithm trains on.

    ``pairs``: the recipe's train (source, reference) pairs; ``rows``: its labelled rows (``offline:`` section:
    the policy's samples labelled by the rewarder, or ``offline.data``), built when first called, since
    sampling and labelling can take long; ``seed``: the seed of the training loop's
    shuffles; ``temperature``: the temperature the rows were sampled at.
    """

    pairs: Sequence[Pair]
    rows: Callable[[], list[dict[str, Any]]]
    seed: int
    temperature: float


@dataclass
class FitResult:
    """What an offline algorithm leaves besides the policy trained in place.

    ``translate``: its own decoding (Q-SFT's π_β · p_θ^β), where the run must not evaluate the policy's greedy
    decoding; ``models``: models that ``final/`` keeps beside the policy, by folder name (Q-SFT's behaviour model).
    """

    translate: Callable[[Sequence[str]], list[str]] | None = None
    models: dict[str, Any] = field(default_factory=dict)


class OnlineAlgorithm(Protocol):
    """Stepped by the runner: one batch of sources per step."""

    policy: Any

    def step(self, sources: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Sample, reward and update on these sources; the step's metrics (``reward_mean``, ``kl``, ...)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the policy's weights: optimiser, schedule, KL coefficient."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class OfflineAlgorithm(Protocol):
    """One ``fit`` call over the run's data."""

    def fit(self, data: OfflineData, log: RunLog) -> FitResult:
        """Train the policy in place."""
