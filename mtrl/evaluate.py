"""Evaluation: batched greedy translation with a policy, sacrebleu corpus metrics, COMET, the detector.

Metrics use sacrebleu's metric objects with default settings, so scores and signatures are the
same as the ``sacrebleu`` command line gives for the same detokenized text.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtrl.detectors import DetectorConfig
from mtrl.errors import MtrlError


@dataclass
class EvaluationConfig:
    """The ``evaluation:`` section of a recipe: how the before/after evaluation scores translations.

    By default the run's own detector scores them. ``mtrl bench`` sets one fixed ``detector`` (and
    ``comet``) for every cell, so that schemes trained on different rewards are compared on one scale.
    """

    detector: DetectorConfig | None = None  # null: the training detector
    comet: str | None = None  # a COMET checkpoint (hub id or local path) to add a COMET score; null: none


@torch.no_grad()
def translate(policy: Any, sources: Sequence[str], gen: Any) -> list[str]:
    """Greedy (or ``gen.eval_num_beams`` beam) translations with a :class:`mtrl.policy.Policy`, in input order.

    Sources are batched by length (``gen.eval_batch_size``), so there is little padding.
    """
    from mtrl.rewards import hypothesis_intervals
    from mtrl.rollout import response_ids

    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    for i in range(0, len(order), gen.eval_batch_size):
        idx = order[i:i + gen.eval_batch_size]
        q, qm = policy.encode_sources([sources[j] for j in idx])
        responses, mask = policy.generate(q, qm, gen, sample=False)
        texts, _ = hypothesis_intervals(policy.tokenizer, response_ids(responses, mask))
        for j, t in zip(idx, texts):
            out[j] = t
    return out


def score_translations(sources: Sequence[str], hyps: Sequence[str], refs: Sequence[str],
                       detections: Sequence[Any]) -> dict[str, Any]:
    """Corpus BLEU/chrF/TER (sacrebleu, with signatures) and the detections' mean score and spans per segment."""
    result: dict[str, Any] = corpus_metrics(hyps, refs)
    score, per_segment = detection_means(detections)
    result["detector_score"] = score
    result.update({f"spans_{sev}_per_segment": v for sev, v in per_segment.items()})
    result["examples"] = [{"src": s, "hyp": h, "ref": r} for s, h, r in list(zip(sources, hyps, refs))[:3]]
    return result


def corpus_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Corpus BLEU, chrF and TER (sacrebleu defaults, one reference), each with its signature."""
    if len(hypotheses) != len(references):
        raise MtrlError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise MtrlError("no hypotheses to score")
    return evaluate_systems({"system": list(hypotheses)}, [list(references)], bootstrap=0)["system"]


def format_table(results: Mapping[str, Mapping[str, Any]], signatures: bool = True) -> str:
    """Plain-text table, one row per system (e.g. before / after) and one column per metric.

    Cells are ``{"score": ..., "signature": ...}`` dicts (as from :func:`corpus_metrics`) or plain
    numbers. With ``signatures``, each metric's sacrebleu signature is listed under the table.
    """
    metrics: list[str] = []
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    header = ["system"] + metrics
    rows = [header]
    sigs: dict[str, str] = {}
    for system, row in results.items():
        cells = [str(system)]
        for m in metrics:
            value = row.get(m)
            if isinstance(value, Mapping):
                if value.get("signature"):
                    sigs.setdefault(m, str(value["signature"]))
                value = value.get("score")
            cells.append("-" if value is None else f"{float(value):.2f}")
        rows.append(cells)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if signatures:
        lines += [f"{m}: {s}" for m, s in sigs.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- mtrl eval: systems x metrics
EVAL_METRICS = ("bleu", "chrf", "chrf++", "ter", "comet", "detector")
SACREBLEU_NAMES = {"bleu": "BLEU", "chrf": "chrF2", "chrf++": "chrF2++", "ter": "TER"}


def sacrebleu_metric(name: str) -> Any:
    """The sacrebleu metric object with the CLI's defaults (so scores and signatures match ``sacrebleu``)."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    return {"bleu": BLEU, "chrf": CHRF, "chrf++": lambda: CHRF(word_order=2), "ter": TER}[name]()


def comet_scores(model: str | None, sources: Sequence[str] | None, hyps: Sequence[str],
                 refs: Sequence[str] | None, batch_size: int = 16) -> dict[str, Any]:
    """System-level COMET (mean of segment scores), or ``{"skipped": reason}`` when the model cannot be had."""
    if not model:
        return {"skipped": "no COMET model given (--comet-model: a hub id or a local checkpoint)"}
    if sources is None:
        return {"skipped": "COMET needs the sources (--src)"}
    try:
        scores = _comet_scorer(model, batch_size).score(sources, hyps, refs)
    except MtrlError as e:
        return {"skipped": str(e)}
    return {"score": float(sum(scores) / len(scores)), "model": model}


@functools.lru_cache(maxsize=1)
def _comet_scorer(model: str, batch_size: int) -> Any:
    """One COMET model per process: a run scores before and after training with the same one."""
    from mtrl.rewards.scorers import CometScorer

    return CometScorer(model, batch_size)


def detector_summary(detector: Any, sources: Sequence[str] | None, hyps: Sequence[str],
                     refs: Sequence[str] | None) -> dict[str, Any]:
    """Mean detector score and error spans per segment by severity."""
    if detector.needs_reference and refs is None:
        return {"skipped": f"the {detector.name} detector needs references"}
    dets = detector.detect(list(sources or [""] * len(hyps)), list(hyps), None if refs is None else list(refs))
    score, per_segment = detection_means(dets)
    return {"score": score, "detector": detector.name, **{f"{sev}_per_segment": v for sev, v in per_segment.items()}}


def detection_means(detections: Sequence[Any]) -> tuple[float, dict[str, float]]:
    """The mean sentence score of detections, and their error spans per segment by severity."""
    from mtrl.detectors.spans import SEVERITIES

    n = len(detections)
    counts = {sev: sum(sum(s.severity == sev for s in d.spans) for d in detections) / n for sev in SEVERITIES}
    return float(sum(d.score for d in detections) / n), {sev: float(v) for sev, v in counts.items()}


def evaluate_systems(systems: Mapping[str, Sequence[str]], references: Sequence[Sequence[str]],
                     sources: Sequence[str] | None = None, metrics: Sequence[str] = ("bleu", "chrf", "ter"),
                     comet_model: str | None = None, detector: Any = None, bootstrap: int = 1000) -> dict[str, Any]:
    """Each system's scores: ``{system: {metric: {"score", "signature", ...}}}``.

    ``references`` is a list of reference streams (one list per reference set). With two or more
    systems and ``bootstrap`` > 0, the sacrebleu metrics of every system after the first also carry
    the paired bootstrap resampling p-value against the first (the baseline), as ``sacrebleu
    --paired-bs`` computes it (1000 resamples, seed 12345).
    """
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown:
        raise MtrlError(f"unknown metric(s) {', '.join(unknown)}; allowed: {', '.join(EVAL_METRICS)}")
    n = len(references[0])
    for name, hyps in systems.items():
        if len(hyps) != n:
            raise MtrlError(f"system {name!r} has {len(hyps)} segments but the references have {n}")
    results: dict[str, Any] = {name: {} for name in systems}
    lexical = [m for m in metrics if m in SACREBLEU_NAMES]
    for name, hyps in systems.items():
        for m in lexical:
            metric = sacrebleu_metric(m)
            score = metric.corpus_score(list(hyps), [list(r) for r in references])
            results[name][m] = {"score": float(score.score), "signature": str(metric.get_signature())}
        if "comet" in metrics:
            results[name]["comet"] = comet_scores(comet_model, sources, hyps, references[0])
        if "detector" in metrics:
            from mtrl.detectors import load_detector

            detector = detector or load_detector("reference")
            results[name]["detector"] = detector_summary(detector, sources, hyps, references[0])
    if len(systems) > 1 and bootstrap > 0 and lexical:
        from sacrebleu.significance import PairedTest

        test = PairedTest(list(systems.items()), {m: sacrebleu_metric(m) for m in lexical},
                          [list(r) for r in references], test_type="bs", n_samples=bootstrap)
        _, res = test()
        baseline = next(iter(systems))
        for m, key in zip(lexical, [k for k in res if k != "System"]):
            for name, r in zip(res["System"], res[key]):
                if name != baseline:
                    results[name][m].update(p_value=r.p_value, baseline=baseline)
    return results


def format_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table: systems x metrics (p-values against the baseline in brackets), signatures below."""
    metrics: list[str] = []
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    lines = ["| system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    notes: dict[str, str] = {}
    for name, row in results.items():
        cells = []
        for m in metrics:
            v = row.get(m, {})
            if "skipped" in v:
                cells.append("skipped")
                notes[m] = f"{m}: skipped ({v['skipped']})"
            else:
                cell = f"{v['score']:.2f}"
                if v.get("p_value") is not None:
                    cell += f" (p={v['p_value']:.4f})"
                cells.append(cell)
                if "signature" in v:
                    notes[m] = f"{m}: {v['signature']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in notes.values()) + "\n"
