"""The one reward pipeline: detector spans and sentence scores -> per-token rewards.

* :class:`RewardConfig` (``config``): the ``reward:`` section of a recipe, and its allowed values;
* :class:`Rewarder` (``rewarder``): the callable every command and trainer uses;
* ``token``: spans -> token rewards (severity maps, ``max``/``spread``);
* ``redistribution``: R3HF, a sentence score spread over tokens as prefix-score differences;
* ``scorers``: the sentence scorers (chrF, BLEU, COMET, a detector's score).

A scorer returns **scores**; the rewarder turns scores and spans into **rewards**; a trainer adds
its KL penalty to them.
"""

from mtrl.rewards.config import RewardConfig, allowed
from mtrl.rewards.rewarder import Rewarder, RewardOutput, hypothesis_intervals
from mtrl.rewards.token import spans_to_token_rewards, token_rewards

__all__ = ["RewardConfig", "RewardOutput", "Rewarder", "allowed", "hypothesis_intervals",
           "spans_to_token_rewards", "token_rewards"]
