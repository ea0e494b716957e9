"""The rewarder within limits: bounded caches (``reward.cache_size``) and a detector out of memory retried in halves."""

from __future__ import annotations

import pytest
import torch

from mtrl.detectors import load_detector
from mtrl.detectors.base import Detector
from mtrl.errors import DetectorOutOfMemory, MtrlError
from mtrl.recipe import recipe_from_dict
from mtrl.rewards import RewardConfig, Rewarder
from mtrl.rewards.alignment import token_offsets
from mtrl.rewards.cache import LRUCache
from mtrl.rewards.redistribution import Redistributor
from mtrl.rewards.scorers import load_scorer
from tests.fixtures.tokenizers import get_tokenizer

SRC = ["A dog.", "A cat sleeps.", "Two men.", "It rains.", "Kids run fast.", "The sun.", "A red car.",
       "She reads."]
HYP = ["Ein Hund.", "Eine Katze schläft.", "Zwei Frauen.", "Es regnet nicht.", "Kinder rennen.", "Die Sonne.",
       "Ein rotes Auto.", "Er liest."]
REF = ["Ein Hund.", "Eine Katze schläft.", "Zwei Männer.", "Es regnet.", "Kinder laufen schnell.", "Die Sonne.",
       "Ein rotes Auto.", "Sie liest."]


def _flat(dets):
    return [(d.score, d.omission_penalty, [(s.start, s.end, s.severity) for s in d.spans]) for d in dets]


# --------------------------------------------------------------------------- bounded caches
def test_lru_cache_keeps_at_most_size_entries_least_recently_used_out_first():
    cache = LRUCache(3)
    calls = []

    def compute(keys):
        calls.append(list(keys))
        return [k * 10 for k in keys]

    assert cache.get_many([1, 2, 3], compute) == [10, 20, 30] and len(cache) == 3
    assert cache.get_many([1], compute) == [10] and calls == [[1, 2, 3]]  # a hit: 1 is now the most recent
    assert cache.get_many([4], compute) == [40] and len(cache) == 3
    assert 2 not in cache and all(k in cache for k in (1, 3, 4))  # 2 was the least recently used
    assert cache.get_many(list(range(10, 20)), compute) == [k * 10 for k in range(10, 20)]  # more than it holds
    assert len(cache) == 3 and all(k in cache for k in (17, 18, 19))
    assert (cache.hits, cache.misses) == (1, 14)
    none = LRUCache(0)
    assert none.get_many([5, 5, 6], compute) == [50, 50, 60] and len(none) == 0
    assert (none.hits, none.misses) == (1, 2) and calls[-1] == [5, 6]  # a repeat within a batch computed once


def test_rewarder_cache_is_bounded_and_a_larger_batch_gets_every_value():
    expected = _flat(Rewarder(RewardConfig(), load_detector("reference")).detect(SRC, HYP, REF))
    rewarder = Rewarder(RewardConfig(cache_size=3), load_detector("reference"))
    calls = []
    detect = rewarder.detector.detect
    rewarder.detector.detect = lambda s, h, r: calls.append(len(h)) or detect(s, h, r)
    assert _flat(rewarder.detect(SRC, HYP, REF)) == expected  # 8 distinct rows, a cache of 3
    assert len(rewarder.detections) == 3 and calls == [8] and (rewarder.hits, rewarder.misses) == (0, 8)
    assert _flat(rewarder.detect(SRC[-2:], HYP[-2:], REF[-2:])) == expected[-2:]  # still cached: hits
    assert calls == [8] and (rewarder.hits, rewarder.misses) == (2, 8)
    assert _flat(rewarder.detect(SRC[:1] * 2, HYP[:1] * 2, REF[:1] * 2)) == expected[:1] * 2  # evicted: computed
    assert calls == [8, 1] and (rewarder.hits, rewarder.misses) == (3, 9) and len(rewarder.detections) == 3
    out = rewarder(SRC, HYP, REF)
    assert _flat(out.detections) == expected and len(rewarder.detections) <= 3


def test_cache_size_zero_caches_nothing():
    rewarder = Rewarder(RewardConfig(cache_size=0), load_detector("reference"))
    first = _flat(rewarder.detect(SRC, HYP, REF))
    assert _flat(rewarder.detect(SRC, HYP, REF)) == first
    assert len(rewarder.detections) == 0 and (rewarder.hits, rewarder.misses) == (0, 16)


@pytest.mark.parametrize("level", ["token", "word"])
def test_prefix_cache_is_bounded_and_rewards_unchanged(level):
    tok = get_tokenizer("unigram")
    enc = [token_offsets(tok, tok(h)["input_ids"]) for h in HYP]
    texts, offsets = [t for t, _ in enc], [o for _, o in enc]
    full = Redistributor(load_scorer("chrf"), level)(SRC, texts, offsets, REF)
    small = Redistributor(load_scorer("chrf"), level, cache_size=5)
    assert small(SRC, texts, offsets, REF) == full  # far more prefixes than the cache holds
    assert len(small.cache) == 5
    assert small(SRC, texts, offsets, REF) == full and len(small.cache) == 5


def test_hybrid_sentence_cache_is_bounded():
    cfg = RewardConfig(mode="hybrid", scorer="chrf", cache_size=2)
    out = Rewarder(cfg, load_detector("reference"), get_tokenizer("unigram"))
    ref = Rewarder(RewardConfig(mode="hybrid", scorer="chrf"), load_detector("reference"), get_tokenizer("unigram"))
    assert out(SRC, HYP, REF).token_rewards == ref(SRC, HYP, REF).token_rewards
    assert len(out.sentence) == 2 and len(out.detections) == 2


def test_recipe_cache_size_default_and_range():
    base = {"policy": {"model": "mtrl:tiny-marian"}}
    assert recipe_from_dict(base).reward.cache_size == 100_000
    assert recipe_from_dict({**base, "reward": {"cache_size": 0}}).reward.cache_size == 0
    with pytest.raises(MtrlError) as e:
        recipe_from_dict({**base, "reward": {"cache_size": -1}})
    assert str(e.value) == "reward.cache_size: must be >= 0, got -1"


# --------------------------------------------------------------------------- out of memory
class FlakyDetector(Detector):
    """The reference detector, out of memory on more than ``limit`` rows."""

    name = "flaky"

    def __init__(self, limit: int, error=None):
        self.limit, self.inner, self.calls = limit, load_detector("reference"), []
        self.error = error or (lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))

    def detect(self, sources, hypotheses, references=None):
        self.calls.append(len(hypotheses))
        if len(hypotheses) > self.limit:
            raise self.error()
        return self.inner.detect(sources, hypotheses, references)


OOMS = {
    "cuda": lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                "you tried to allocate 8589934592 bytes"),
    "torch": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory."),
}


@pytest.mark.parametrize("kind", sorted(OOMS))
def test_out_of_memory_retries_in_halves_with_the_unsplit_results(kind, capsys):
    expected = _flat(load_detector("reference").detect(SRC, HYP, REF))
    det = FlakyDetector(2, OOMS[kind])
    rewarder = Rewarder(RewardConfig(), det)
    assert _flat(rewarder.detect(SRC, HYP, REF)) == expected
    assert det.calls == [8, 4, 2, 2, 4, 2, 2]
    assert (rewarder.hits, rewarder.misses) == (0, 8)
    assert len(rewarder.detections) == 8  # the halves' results are cached as one batch's
    err = capsys.readouterr().err
    assert err == "mtrl: warning: the detector ran out of memory on a batch of 8 rows; retrying in halves\n"
    more = [s + "!" for s in HYP]
    assert _flat(rewarder.detect(SRC[:5], more[:5], REF[:5])) == _flat(load_detector("reference").detect(
        SRC[:5], more[:5], REF[:5]))  # odd sizes split 2 + 3
    assert det.calls[7:] == [5, 2, 3, 1, 2]
    assert capsys.readouterr().err == ""  # warned once per rewarder


def test_out_of_memory_through_the_full_pipeline():
    tok = get_tokenizer("unigram")
    plain = Rewarder(RewardConfig(mode="hybrid"), load_detector("reference"), tok)(SRC, HYP, REF)
    split = Rewarder(RewardConfig(mode="hybrid"), FlakyDetector(3), tok)(SRC, HYP, REF)
    assert split.token_rewards == plain.token_rewards and split.scores == plain.scores


def test_detector_scorer_prefixes_retried_in_halves():
    """R3HF of the detector's own score: the prefixes go to the detector, retried in halves too."""
    tok = get_tokenizer("unigram")
    cfg = RewardConfig(mode="r3hf", scorer="detector")
    plain = Rewarder(cfg, load_detector("reference"), tok)(SRC[:3], HYP[:3], REF[:3])
    det = FlakyDetector(4)
    split = Rewarder(cfg, det, tok)(SRC[:3], HYP[:3], REF[:3])
    assert split.token_rewards == plain.token_rewards and split.scores == plain.scores
    assert det.calls[0] > 4 and max(det.calls[1:]) <= det.calls[0] // 2 + 1


def test_out_of_memory_on_a_single_row_gives_up_with_one_line(capsys):
    det = FlakyDetector(0)
    rewarder = Rewarder(RewardConfig(), det)
    with pytest.raises(DetectorOutOfMemory) as e:
        rewarder.detect(SRC[:4], HYP[:4], REF[:4])
    assert isinstance(e.value, MtrlError) and det.calls == [4, 2, 1]  # the first row fails: no more tries
    msg = str(e.value)
    chars = len(SRC[0]) + len(HYP[0]) + len(REF[0])
    assert "\n" not in msg and "batch of 4 rows" in msg and f"{chars} characters" in msg
    assert "detector.batch_size" in msg and "detector.max_tokens" in msg
    assert e.value.__cause__ is None and e.value.__context__ is None  # the OOM's tensors are not kept alive
    assert "retrying in halves" in capsys.readouterr().err
    with pytest.raises(DetectorOutOfMemory, match="^the flaky detector ran out of memory on a single row "):
        Rewarder(RewardConfig(), FlakyDetector(0)).detect(SRC[:1], HYP[:1], REF[:1])


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: device-side assert triggered"),
                                   ValueError("out of memory")])
def test_other_errors_are_not_retried(error, capsys):
    det = FlakyDetector(2, lambda: error)
    with pytest.raises(type(error)) as e:
        Rewarder(RewardConfig(), det).detect(SRC, HYP, REF)
    assert e.value is error and det.calls == [8] and capsys.readouterr().err == ""


def test_clear_forgets_entries_and_keeps_counts():
    from mtrl.rewards.cache import LRUCache

    cache = LRUCache(4)
    cache.get_many(["a", "b", "a"], lambda keys: [k.upper() for k in keys])
    cache.clear()
    assert len(cache) == 0 and "a" not in cache and (cache.hits, cache.misses) == (1, 2)
    assert cache.get_many(["a"], lambda keys: ["again"]) == ["again"]  # computed afresh
