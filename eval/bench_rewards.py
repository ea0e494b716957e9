"""Throughput of the span -> token reward mapping and of the token-offset computation.

    python eval/bench_rewards.py [--repeats 3] [--data auto|wmt22|multi30k] [--wmt22-dir DIR]

Prints ``name: value`` lines; the first, ``data``, says which data was used:

* ``wmt22`` (the default when present): WMT22 system outputs (``hyp_*`` columns of
  ``../shared/data/wmt22/*.tsv``, or of ``--wmt22-dir``), which developers have;
* ``multi30k`` (the fallback, shipped with mtrl): the 1,000 German references of Multi30k
  test2016 as hypotheses, each with one word replaced by a word of the next reference (so
  the detector has something to find), scored against the unedited reference.

Tokenizers are trained here on that text (Multi30k: plus the first 10,000 training pairs),
no model hub: a Unigram+Metaspace one (Marian-like, EOS appended) and a byte-level BPE
(Qwen-like). Spans are synthetic: 0-3 random word runs per hypothesis, some starting at the
space before a word (as xCOMET's do), random severities.

Figures: segments per second on ONE thread, best of ``--repeats``, measured in process
CPU time (so other jobs on a shared machine distort them less); the ``.wall`` twin of
each figure uses wall-clock time (a lower bound when the machine is loaded).

* ``offsets_segments_per_s``: :func:`mtrl.rewards.alignment.batch_token_offsets` on pre-tokenized
  ids, i.e. decoding the hypothesis text *and* computing every token's interval.
* ``mapping_segments_per_s``: :func:`mtrl.rewards.spans_to_token_rewards` given text,
  offsets and spans (the span -> token mapping alone), ``max`` and ``spread``.
* ``token_rewards_segments_per_s``: :func:`mtrl.rewards.token_rewards` in ``hybrid`` mode.

The last two lines, ``offsets_segments_per_s`` and ``mapping_segments_per_s``, are the
slowest family (and mode) of each; the target for the mapping is >= 50,000.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: no rayon pool in *_batch calls
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from mtrl.datasets import load_parallel  # noqa: E402
from mtrl.detectors.base import Detection  # noqa: E402
from mtrl.detectors.spans import SEVERITIES, ErrorSpan, get_severity_map  # noqa: E402
from mtrl.rewards import RewardConfig, spans_to_token_rewards, token_rewards  # noqa: E402
from mtrl.rewards.alignment import batch_token_offsets, reference_token_offsets, uses_fast_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WMT22 = ROOT.parent / "shared" / "data" / "wmt22"
BATCH = 64
MULTI30K_TRAIN_PAIRS = 10_000  # extra tokenizer-training text for the Multi30k fallback

Triple = tuple[str, str, str]  # (source, hypothesis, reference)


def load_wmt22(wmt22_dir: Path) -> tuple[list[Triple], list[str]]:
    """(source, hypothesis, reference A) triples of every ``hyp_*`` column, and all text for tokenizer training."""
    triples: list[Triple] = []
    corpus: list[str] = []
    for path in sorted(wmt22_dir.glob("wmt22_*.tsv")):
        df = pd.read_csv(path, sep="\t", keep_default_na=False)
        for col in df.columns:
            if col.startswith("hyp_"):
                triples.extend(zip(df["source"], df[col], df["ref_A"], strict=True))
            if col.startswith(("hyp_", "ref_", "source")):
                corpus.extend(df[col].tolist())
    return triples, corpus


def load_multi30k_fallback() -> tuple[list[Triple], list[str]]:
    """Multi30k test2016 (shipped): the German reference with one word swapped in from the next
    reference as the hypothesis, the unedited reference as the reference; plus tokenizer-training text."""
    test = load_parallel("multi30k", "test2016")
    rng = random.Random(1)
    triples: list[Triple] = []
    for i, (src, ref) in enumerate(test):
        words, donor = ref.split(), test[(i + 1) % len(test)][1].split()
        if words and donor:
            words[rng.randrange(len(words))] = rng.choice(donor)
        triples.append((src, " ".join(words), ref))
    train = load_parallel("multi30k", "train", limit=MULTI30K_TRAIN_PAIRS)
    corpus = [t for pair in train + test for t in pair] + [h for _, h, _ in triples]
    return triples, corpus


def load_data(choice: str, wmt22_dir: Path) -> tuple[str, list[Triple], list[str]]:
    """(description, triples, tokenizer-training text); ``choice`` is auto, wmt22 or multi30k."""
    have_wmt22 = wmt22_dir.is_dir() and any(wmt22_dir.glob("wmt22_*.tsv"))
    if choice == "wmt22" and not have_wmt22:
        sys.exit(f"WMT22 data (wmt22_*.tsv) not found in {wmt22_dir}")
    if choice == "wmt22" or (choice == "auto" and have_wmt22):
        return f"wmt22 ({wmt22_dir})", *load_wmt22(wmt22_dir)
    return "multi30k test2016 (edited reference vs reference; shipped with mtrl)", *load_multi30k_fallback()


def train_unigram(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=4000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def train_bytelevel(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def synthetic_spans(text: str, rng: random.Random) -> list[ErrorSpan]:
    words = [m.span() for m in re.finditer(r"\S+", text)]
    spans = []
    for _ in range(rng.choice((0, 1, 1, 2, 3)) if words else 0):
        i = rng.randrange(len(words))
        j = min(len(words) - 1, i + rng.choice((0, 0, 1, 2)))
        start = words[i][0] - (1 if i and rng.random() < 0.5 else 0)  # xCOMET-style leading space
        spans.append(ErrorSpan(start, words[j][1], rng.choice(SEVERITIES)))
    return spans


def best_rate(fn, n_items: int, repeats: int) -> tuple[float, float]:
    """Items per second of process CPU time and of wall time, best of ``repeats`` runs each."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return n_items / cpu, n_items / wall


RESULTS: dict[str, float] = {}


def report(name: str, rates: tuple[float, float]) -> None:
    RESULTS[name] = rates[0]
    print(f"{name}: {rates[0]:.0f}")
    print(f"{name}.wall: {rates[1]:.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", choices=("auto", "wmt22", "multi30k"), default="auto",
                    help="auto: WMT22 when --wmt22-dir has it, else the shipped Multi30k test2016")
    ap.add_argument("--wmt22-dir", type=Path, default=WMT22, help=f"default: {WMT22}")
    args = ap.parse_args(argv)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    data, triples, corpus = load_data(args.data, args.wmt22_dir)
    hyps = [h for _, h, _ in triples]
    rng = random.Random(0)
    print(f"data: {data}")
    print(f"segments: {len(hyps)}")
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    for name, build in (("unigram", train_unigram), ("bytelevel", train_bytelevel)):
        tok = build(corpus)
        ids = tok(hyps)["input_ids"]
        print(f"{name}.mean_tokens_per_segment: {sum(map(len, ids)) / len(ids):.1f}")
        batches = [ids[i:i + BATCH] for i in range(0, len(ids), BATCH)]
        texts, offsets = batch_token_offsets(tok, ids)  # warm the per-id caches
        fast = sum(uses_fast_path(tok, x) for x in ids)
        print(f"{name}.offsets_fast_path_fraction: {fast / len(ids):.4f}")

        def offsets_all(tok=tok, batches=batches) -> None:
            for b in batches:
                batch_token_offsets(tok, b)

        report(f"{name}.offsets_segments_per_s", best_rate(offsets_all, len(ids), args.repeats))
        sub = ids[:200]
        t0 = time.process_time()
        for x in sub:
            reference_token_offsets(tok, x)
        print(f"{name}.reference_offsets_segments_per_s: {len(sub) / (time.process_time() - t0):.0f}")

        spans = [synthetic_spans(t, rng) for t in texts]
        print(f"{name}.mean_spans_per_segment: {sum(map(len, spans)) / len(spans):.2f}")
        smap = get_severity_map("xcomet")
        for mode in ("max", "spread"):
            def mapping(mode=mode, texts=texts, offsets=offsets, spans=spans, smap=smap) -> None:
                for t, o, s in zip(texts, offsets, spans, strict=False):
                    spans_to_token_rewards(t, o, s, smap, mode)

            report(f"{name}.mapping_segments_per_s.{mode}", best_rate(mapping, len(texts), args.repeats))
        cfg = RewardConfig(mode="hybrid", token_rewards="spread")
        dets = [Detection(s, 0.5) for s in spans]

        def rewards_all(texts=texts, offsets=offsets, dets=dets, cfg=cfg) -> None:
            for d, t, o in zip(dets, texts, offsets, strict=False):
                token_rewards(d, t, o, cfg)

        report(f"{name}.token_rewards_segments_per_s.hybrid_spread", best_rate(rewards_all, len(texts), args.repeats))

    # Headlines: the slowest tokenizer family (and reward mode) of the figures above.
    print(f"offsets_segments_per_s: {min(v for k, v in RESULTS.items() if '.offsets_' in k):.0f}")
    print(f"mapping_segments_per_s: {min(v for k, v in RESULTS.items() if '.mapping_' in k):.0f}")

    # The embedded detector on (source, hypothesis, reference) triples, in batches as training calls it.
    from mtrl.detectors.reference import ReferenceDetector

    detector = ReferenceDetector()
    srcs, hyps_, refs = (list(x) for x in zip(*triples, strict=True))

    def detect_all() -> None:
        for i in range(0, len(srcs), 256):
            detector.detect(srcs[i:i + 256], hyps_[i:i + 256], refs[i:i + 256])

    report("reference_detector_segments_per_s", best_rate(detect_all, len(srcs), args.repeats))


if __name__ == "__main__":
    main()
