"""Q-SFT variants on the offline quickstart's warm start, decoded at several β (the issue #4 experiments).

Samples translations of Multi30k training sources from the warm start (cached per temperature and size
under --run-dir), labels them with the ``reference`` detector (omission weight 10, xCOMET severities), turns
them into one of three rewards, trains Q-SFT and decodes the eval splits with log π_β + β log p_θ:

* ``--reward detector``: the span penalties per token (the quickstart's reward);
* ``--reward chrf``: sentence chrF (0-100, sacrebleu) on the last token;
* ``--reward hybrid``: the span penalties plus ``--hybrid-weight`` x chrF on the last token.

``--per-source`` maps each row's return affinely so that the worst sample of its source gets 0 and the best
1 (a per-state baseline: extraction only compares actions within a state, and every state of a row shares
its source); otherwise the dataset's range (``return_range: null``) or ``--return-range LO HI``.

Prints ``name: value`` lines: ``<split>_beta<β>_{chrf,bleu,detector,len_ratio,changed}`` (``changed``: outputs
that differ from those at the first β listed; the default list starts at 0, π_β's own greedy decoding).

Usage: python eval/qsft_variants.py --reward hybrid --hybrid-weight 1 \\
           --target monte_carlo --per-source --splits val,test2016
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import sacrebleu
import torch


def reward_rows(rows: list[dict], reward: str, hybrid_weight: float, per_source: bool) -> list[dict]:
    # the sentence chrF (0-100) of mtrl's hybrid and r3hf rewards
    from mtrl.rewards.scorers import load_scorer

    chrfs = load_scorer("chrf").score([r["src"] for r in rows], [r["mt"] for r in rows], [r["ref"] for r in rows])
    out = []
    for r, chrf in zip(rows, chrfs):
        r = dict(r, token_rewards=list(r["token_rewards"]))
        if reward == "chrf":
            r["token_rewards"] = [0.0] * (len(r["token_ids"]) - 1) + [chrf]
        elif reward == "hybrid":
            r["token_rewards"][-1] += hybrid_weight * chrf
        r["score"] = sum(r["token_rewards"])
        out.append(r)
    if per_source:
        returns = defaultdict(list)
        for r in out:
            returns[r["src"]].append(r["score"])
        for r in out:
            lo, hi = min(returns[r["src"]]), max(returns[r["src"]])
            r["score"] = 0.5 if hi <= lo else (r["score"] - lo) / (hi - lo)
            r["token_rewards"] = [0.0] * (len(r["token_ids"]) - 1) + [r["score"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmstart", default="mtrl:tiny-marian",
                    help="the model to start from (default: the shipped tiny Marian)")
    ap.add_argument("--run-dir", default="runs/qsft-variants")
    ap.add_argument("--reward", choices=("detector", "chrf", "hybrid"), default="detector")
    ap.add_argument("--hybrid-weight", type=float, default=1.0)
    ap.add_argument("--per-source", action="store_true")
    ap.add_argument("--return-range", type=float, nargs=2, default=None)
    ap.add_argument("--target", choices=("bellman", "monte_carlo"), default="bellman")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--sources", type=int, default=500)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--sft-steps", type=int, default=0)
    ap.add_argument("--betas", default="0,0.25,0.5,1")
    ap.add_argument("--splits", default="val")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from mtrl.algorithms.qsft import QSFTConfig, qsft_translate, train_qsft
    from mtrl.datasets import load_parallel
    from mtrl.detectors import load_detector
    from mtrl.io import read_jsonl
    from mtrl.label import label, sample_rows
    from mtrl.policy import PolicyConfig, build_policy, resolve_model
    from mtrl.rewards import RewardConfig, Rewarder

    a.warmstart = resolve_model(a.warmstart)
    policy = build_policy(PolicyConfig(model=a.warmstart), a.warmstart, "English", "German")
    run_dir = Path(a.run_dir)
    data = run_dir / f"samples_T{a.temperature}_{a.sources}x{a.samples}_seed{a.seed}" / "labelled.jsonl"
    if not data.exists():
        pairs = load_parallel("multi30k", "train")[: a.sources]
        rows = sample_rows(lambda: policy, pairs, a.samples, a.temperature, 40, seed=a.seed, progress=False)
        rewarder = Rewarder(RewardConfig(mode="token", severity_map="xcomet"),
                            load_detector("reference", omission_weight=10), policy.tokenizer)
        label(rows, data, rewarder, progress=False)
    rows = reward_rows(read_jsonl(data), a.reward, a.hybrid_weight, a.per_source)
    return_range = (0.0, 1.0) if a.per_source else (tuple(a.return_range) if a.return_range else None)
    cfg = QSFTConfig(max_steps=a.steps, batch_size=a.batch_size, lr=a.lr, tau=0.05, gamma=a.gamma,
                     target=a.target, return_range=return_range, sft_steps=a.sft_steps)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    behaviour = train_qsft(policy, rows, cfg, "token", a.temperature, a.seed, lambda row: None)
    print(f"rows: {len(rows)}")
    print(f"train_s: {time.perf_counter() - t0:.1f}")

    detector = load_detector("reference", omission_weight=10)
    for split in a.splits.split(","):
        pairs = load_parallel("multi30k", split)
        src, ref = [p[0] for p in pairs], [p[1] for p in pairs]
        greedy = None
        for beta in [float(b) for b in a.betas.split(",")]:
            hyp = []
            for i in range(0, len(src), 100):
                hyp += [h.strip() for h in qsft_translate(policy, behaviour, src[i:i + 100], beta=beta,
                                                          max_new_tokens=40, temperature=a.temperature)]
            greedy = greedy or hyp
            bleu = sacrebleu.corpus_bleu(hyp, [ref])
            det = np.mean([d.score for d in detector.detect(src, hyp, ref)])
            key = f"{split}_beta{beta:g}"
            print(f"{key}_chrf: {sacrebleu.corpus_chrf(hyp, [ref]).score:.2f}")
            print(f"{key}_bleu: {bleu.score:.2f}")
            print(f"{key}_detector: {det:.2f}")
            print(f"{key}_len_ratio: {bleu.sys_len / bleu.ref_len:.4f}")
            print(f"{key}_changed: {sum(x != y for x, y in zip(hyp, greedy))}", flush=True)


if __name__ == "__main__":
    main()
