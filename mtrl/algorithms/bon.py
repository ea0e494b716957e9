"""Best-of-n (rejection-sampling) fine-tuning: SFT on the best of n labelled translations per source.

ReST (Gulcehre et al. 2023, arXiv 2308.08998), RAFT (Dong et al. 2023, arXiv 2304.06767) and QE-reranked
SFT for MT (Finkelstein et al. 2023, arXiv 2309.10966) all do one "grow" step of this kind: sample n
translations per source (the recipe's ``offline:`` section, ``samples_per_source`` = n), rank them by a
reward, keep the best, optionally only where it is good enough, and fine-tune on the kept ones with plain
cross-entropy. The ranking reward is either

* ``rank_by: return`` (default): a row's return, the sum of its ``token_rewards``. These already follow
  ``reward.mode``, so the quickstart's span penalties + chrF (R3HF) rank the samples as PPO would reward
  them; or
* ``rank_by: score``: the row's sentence score (the detector's, or ``reward.scorer``'s).

``min_reward`` drops the sources whose best row is below it (ReST's threshold; null keeps every source).
Ties keep the first row of the source, so the choice is deterministic.

The loop is :func:`mtrl.algorithms.offline.train_offline` with plain cross-entropy on the hypothesis tokens
(prompt tokens and a forced language token are not trained); the policy is trained in place and the runner
saves ``final/`` and evaluates it with its usual decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mtrl.algorithms.offline import (
    OfflineTrainConfig,
    group_by_source,
    pad_batch,
    row_value,
    target_features,
    token_nll,
    train_offline,
)
from mtrl.algorithms.protocols import FitResult, OfflineData, RunLog
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig, Policy
from mtrl.rewards import Rewarder
from mtrl.schema import Range


@dataclass
class BestOfNConfig(OfflineTrainConfig):
    name: Literal["bon"] = "bon"
    rank_by: Literal["return", "score"] = "return"  # return: sum of token_rewards (follows reward.mode); score
    min_reward: Annotated[float, Range()] | None = None  # drop sources whose best is below this; null: keep all


# ---------------------------------------------------------------------------- selection
def select_best(rows: Sequence[dict], rank_by: str = "return", min_reward: float | None = None) -> list[dict]:
    """The best row of each source (the first of tied ones), without sources whose best is below ``min_reward``."""
    kept = []
    for group in group_by_source(rows):
        values = [row_value(r, rank_by) for r in group]
        best = max(range(len(group)), key=values.__getitem__)  # max returns the first maximal index
        if min_reward is None or values[best] >= min_reward:
            kept.append(group[best])
    return kept


# ---------------------------------------------------------------------------- the algorithm
class BestOfN:
    """Offline: label n samples per source (or read ``offline.data``), keep the best of each, SFT on them."""

    def __init__(self, cfg: BestOfNConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig, accelerator: Any,
                 total_steps: int):
        self.cfg, self.policy = cfg, policy

    def fit(self, data: OfflineData, log: RunLog) -> FitResult:
        cfg, p = self.cfg, self.policy
        # 1. n labelled samples per source
        rows = data.rows()

        # 2. the best of each source, if good enough
        kept = select_best(rows, cfg.rank_by, cfg.min_reward)
        n_sources = len(group_by_source(rows))
        if not kept:
            raise MtrlError(f"bon: no source's best row reaches min_reward {cfg.min_reward} "
                            f"({n_sources} sources); lower algorithm.min_reward")
        values = [row_value(r, cfg.rank_by) for r in rows]
        best = [row_value(r, cfg.rank_by) for r in kept]
        log.message(f"mtrl: best-of-n SFT on {len(kept)} of {n_sources} sources ({len(rows)} labelled rows) ...")
        log.metrics({"step": 0, "bon_sources": n_sources, "bon_kept": len(kept),
                     "bon_value_mean": sum(values) / len(values), "bon_best_value_mean": sum(best) / len(best)})

        # 3. cross-entropy on the kept rows, the policy trained in place
        features = [target_features(r, p) for r in kept]
        train_offline(p.model, features, lambda f: pad_batch(f, p.tokenizer.pad_token_id),
                      lambda batch: token_nll(p.model, batch, p.kind), cfg, data.seed, log.metrics)
        return FitResult()
