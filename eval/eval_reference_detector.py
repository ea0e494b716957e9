"""Measure the ``reference`` detector against expert MQM (and its speed).

    python eval/eval_reference_detector.py [--data PATH] [--speed-data GLOB]

Prints one ``name: value`` line per figure:
- segment-level Kendall tau-b (scipy.stats.kendalltau, no grouping) of the detector
  score, of sentence chrF and of minus the hypothesis length (a trivial baseline:
  MQM penalties are sums, so longer segments collect more errors) against -mqm_penalty;
- the same tau averaged within segments (the 5 systems of one source, so length
  cancels out), a check that the score ranks translations and not just lengths;
- a paired bootstrap over segments of tau(ours) - tau(chrF) (and against -length);
- span precision/recall/F1 against the human spans over non-whitespace characters,
  severity-agnostic and exact-severity (a character counts when both sides give it
  the same severity; where human spans overlap, the worst severity), next to the F1
  of marking every character (the trivial baseline);
- segments per second (wall clock and CPU time) on one core over the WMT22 dev TSVs
  (every hyp_* column).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
from sacrebleu import sentence_chrf
from scipy.stats import kendalltau

from mtrl.detectors.reference import ReferenceDetector

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "../shared/data/mqm/mqm_wmt21-ted_en-de.dev.jsonl"
DEFAULT_SPEED = ROOT / "../shared/data/wmt22/*.tsv"
RANK = {"minor": 1, "major": 2, "critical": 3}


def char_labels(text: str, spans) -> dict[int, int]:
    """Severity rank of every non-whitespace character inside a span (worst wins)."""
    out: dict[int, int] = {}
    for s in spans:
        start, end, sev = (s["start"], s["end"], s["severity"]) if isinstance(s, dict) else (
            s.start, s.end, s.severity)
        for i in range(start, end):
            if not text[i].isspace():
                out[i] = max(out.get(i, 0), RANK[sev])
    return out


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def grouped_tau(groups: list[str], x: list[float], y: list[float]) -> float:
    """Mean Kendall tau-b within each group (groups where tau is undefined are skipped)."""
    by = defaultdict(list)
    for g, a, b in zip(groups, x, y, strict=True):
        by[g].append((a, b))
    taus = []
    for pairs in by.values():
        t = kendalltau([a for a, _ in pairs], [b for _, b in pairs]).statistic
        if not math.isnan(t):
            taus.append(t)
    return sum(taus) / len(taus) if taus else float("nan")


def bootstrap_tau_gain(groups: list[str], a: list[float], b: list[float], human: list[float],
                       n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Share of resamples where tau(a) > tau(b), and the 95% interval of the gain.

    Resamples whole segments (the 5 systems of one source together), as they are not independent.
    """
    rng = random.Random(seed)
    by = defaultdict(list)
    for i, g in enumerate(groups):
        by[g].append(i)
    keys = list(by)
    gains = []
    for _ in range(n):
        idx = [i for g in rng.choices(keys, k=len(keys)) for i in by[g]]
        h = [human[i] for i in idx]
        tau_a = kendalltau([a[i] for i in idx], h).statistic
        gains.append(tau_a - kendalltau([b[i] for i in idx], h).statistic)
    gains.sort()
    return sum(g > 0 for g in gains) / n, gains[int(0.025 * n)], gains[int(0.975 * n) - 1]


def evaluate(rows: list[dict], det: ReferenceDetector, bootstrap: int = 0) -> dict[str, float]:
    dets = det.detect([r["source"] for r in rows], [r["hypothesis"] for r in rows],
                      [r["reference"] for r in rows])
    human = [-r["mqm_penalty"] for r in rows]
    ours = [d.score for d in dets]
    chrf = [sentence_chrf(r["hypothesis"], [r["reference"]]).score for r in rows]
    neg_len = [-len(r["hypothesis"]) for r in rows]
    groups = [r["source"] for r in rows]

    tp = tp_sev = n_pred = n_gold = n_chars = 0
    for r, d in zip(rows, dets, strict=True):
        n_chars += sum(1 for ch in r["hypothesis"] if not ch.isspace())
        gold = char_labels(r["hypothesis"], r["error_spans"])
        pred = char_labels(r["hypothesis"], d.spans)
        n_pred += len(pred)
        n_gold += len(gold)
        tp += len(pred.keys() & gold.keys())
        tp_sev += sum(1 for i, s in pred.items() if gold.get(i) == s)
    p, r_, f = prf(tp, n_pred, n_gold)
    ps, rs, fs = prf(tp_sev, n_pred, n_gold)
    f_all = prf(n_gold, n_chars, n_gold)[2]
    out = {
        "rows": len(rows),
        "kendall_tau_reference_detector": kendalltau(ours, human).statistic,
        "kendall_tau_chrf": kendalltau(chrf, human).statistic,
        "kendall_tau_neg_length": kendalltau(neg_len, human).statistic,
        "grouped_tau_reference_detector": grouped_tau(groups, ours, human),
        "grouped_tau_chrf": grouped_tau(groups, chrf, human),
        "span_precision": p,
        "span_recall": r_,
        "span_f1": f,
        "span_precision_exact_severity": ps,
        "span_recall_exact_severity": rs,
        "span_f1_exact_severity": fs,
        "span_f1_mark_everything": f_all,
        "rows_with_spans_reference_detector": sum(1 for d in dets if d.spans),
        "rows_with_spans_human": sum(1 for r in rows if r["error_spans"]),
    }
    if bootstrap:
        share, lo, hi = bootstrap_tau_gain(groups, ours, chrf, human, bootstrap)
        out["bootstrap_share_tau_ours_above_chrf"] = share
        out["bootstrap_tau_gain_over_chrf_ci95_low"] = lo
        out["bootstrap_tau_gain_over_chrf_ci95_high"] = hi
        share, lo, hi = bootstrap_tau_gain(groups, ours, neg_len, human, bootstrap)
        out["bootstrap_share_tau_ours_above_neg_length"] = share
    return out


def speed(pattern: str, det: ReferenceDetector) -> tuple[int, float, float]:
    """Segments per wall-clock second and per CPU second of ``detect``, WMT22 TSVs, every hyp_* column.

    Best of 3 runs; the CPU-second figure is the steadier one on a shared machine.
    """
    src, hyp, ref = [], [], []
    for path in sorted(glob.glob(pattern)):
        df = pd.read_csv(path, sep="\t", keep_default_na=False)
        for col in (c for c in df.columns if c.startswith("hyp_")):
            src += df["source"].tolist()
            hyp += df[col].tolist()
            ref += df["ref_A"].tolist()
    if not hyp:
        return 0, float("nan"), float("nan")
    wall = cpu = float("inf")
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        det.detect(src, hyp, ref)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return len(hyp), len(hyp) / wall, len(hyp) / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MQM jsonl (default: the dev slice)")
    ap.add_argument("--speed-data", default=str(DEFAULT_SPEED), help="glob of WMT22 TSVs ('' to skip)")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples for the tau-gain interval (0: skip)")
    args = ap.parse_args()
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    det = ReferenceDetector()
    for k, v in evaluate(rows, det, args.bootstrap).items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.speed_data:
        n, sps, cps = speed(args.speed_data, det)
        print(f"speed_segments: {n}")
        print(f"segments_per_s: {sps:.0f}")
        print(f"segments_per_cpu_s: {cps:.0f}")


if __name__ == "__main__":
    main()
