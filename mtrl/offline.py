"""The offline pipeline of a ``qsft`` recipe: sample -> label -> Q-SFT -> evaluate.

No rollouts during training: the policy's own samples (or a dataset made with
``mtrl label``) are labelled once by the detector, then
:func:`mtrl.algorithms.qsft.train_qsft` fits the Q-model, and evaluation decodes
with log pi_beta + beta * log p_theta (:func:`mtrl.algorithms.qsft.qsft_translate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mtrl.errors import MtrlError
from mtrl.io import read_jsonl, write_json
from mtrl.recipe import Recipe


def offline_rows(recipe: Recipe, model_path: str, train_pairs: Sequence[tuple[str, str]], rewarder: Any,
                 run_dir: Path, log: Callable[..., None], quiet: bool = False) -> list[dict[str, Any]]:
    """Labelled rows with ``token_ids`` and ``token_rewards``: read from offline.data, or sampled and labelled."""
    from mtrl.label import label, sample_rows

    off = recipe.offline
    if off.data:
        rows = read_jsonl(off.data)
        missing = [i for i, r in enumerate(rows, 1) if "token_ids" not in r or "token_rewards" not in r]
        if missing:
            raise MtrlError(f"{off.data}: row {missing[0]} has no token_ids/token_rewards; label it with "
                            "`mtrl label --tokenizer <the policy>`")
        return rows
    labelled = run_dir / "offline" / "labelled.jsonl"
    log(f"mtrl: sampling {off.samples_per_source} translations for {off.num_sources} sources ...")
    rows = sample_rows(model_path, train_pairs[: off.num_sources], off.samples_per_source, off.temperature,
                       recipe.generation.max_new_tokens, seed=recipe.seed, policy_config=recipe.policy,
                       progress=not quiet)
    reward = rewarder.config
    counts = label(rows, labelled, detector=rewarder.detector.name, tokenizer=model_path, reward=reward,
                   detector_options=_detector_options(recipe), progress=not quiet)
    log(f"mtrl: labelled {counts['rows']} rows ({counts['rejected']} rejected) -> {labelled}")
    return read_jsonl(labelled)


def _detector_options(recipe: Recipe) -> dict[str, Any]:
    d = recipe.detector
    if d.name == "xcomet":
        return {"model": d.model or "Unbabel/XCOMET-XL", "batch_size": d.batch_size, **d.options}
    if d.name == "gold":
        return {"path": d.path, **d.options}
    return dict(d.options)


def run_qsft(recipe: Recipe, model_path: str, train_pairs, eval_pairs, rewarder: Any, results: dict[str, Any],
             log: Callable[..., None], quiet: bool = False) -> dict[str, Any]:
    from mtrl.algorithms.qsft import QSFTConfig, train_qsft

    run_dir = Path(recipe.run_dir)
    rows = offline_rows(recipe, model_path, train_pairs, rewarder, run_dir, log, quiet)
    level = "sentence" if recipe.reward.mode == "sentence" else "token"
    sampled_at = {} if recipe.offline.data else {"temperature": recipe.offline.temperature}
    cfg = QSFTConfig(**{"reward_level": level, "seed": recipe.seed, **sampled_at, **recipe.offline.qsft},
                     policy=recipe.policy, src_lang=recipe.data.src_lang, tgt_lang=recipe.data.tgt_lang)
    log(f"mtrl: Q-SFT on {len(rows)} labelled rows ...")
    q_dir = train_qsft(model_path, rows, run_dir / "final", cfg)
    history = _trainer_history(run_dir / "final" / "qsft_log.jsonl")
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(h) + "\n" for h in history))
    if eval_pairs:
        log(f"mtrl: evaluating the Q-SFT policy on {len(eval_pairs)} segments ...")
        results["after"] = evaluate_qsft(q_dir, q_dir.parent / "behaviour", cfg, eval_pairs, recipe, rewarder)
        write_json(run_dir / "eval.json", results)
    return results


def _trainer_history(path: Path) -> list[dict[str, Any]]:
    """The Q-SFT trainer's log lines (step, loss, qsft_target_mean, ...)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def evaluate_qsft(q_dir: Path, behaviour_dir: Path, cfg: Any, pairs, recipe: Recipe, rewarder: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mtrl.algorithms.qsft import qsft_translate
    from mtrl.policy import load_model_and_tokenizer
    from mtrl.train import score_translations

    q_model, tok, _ = load_model_and_tokenizer(str(q_dir))
    behaviour, _, _ = load_model_and_tokenizer(str(behaviour_dir))
    tok = AutoTokenizer.from_pretrained(q_dir)
    gen = recipe.generation
    sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    hyps = [""] * len(sources)
    for i in range(0, len(order), gen.eval_batch_size):
        idx = order[i:i + gen.eval_batch_size]
        out = qsft_translate(q_model, behaviour, tok, [sources[j] for j in idx], beta=cfg.beta,
                             max_new_tokens=gen.max_new_tokens, num_beams=gen.eval_num_beams,
                             policy_config=recipe.policy, src_lang=recipe.data.src_lang, tgt_lang=recipe.data.tgt_lang,
                             temperature=cfg.temperature)
        for j, t in zip(idx, out):
            hyps[j] = t.strip()
    return score_translations(sources, hyps, refs, rewarder)
