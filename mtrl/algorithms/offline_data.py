"""The offline algorithms' data: labelled rows read from a file (``offline.data``), or the policy's own samples
labelled by the rewarder (``offline:`` section of a recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from mtrl.algorithms.protocols import RunLog
from mtrl.errors import MtrlError
from mtrl.io import read_jsonl, write_jsonl
from mtrl.label import label, sample_rows
from mtrl.policy import Policy
from mtrl.rewards import Rewarder
from mtrl.schema import Range
from mtrl.translations import read_translations


@dataclass
class OfflineConfig:
    """The ``offline:`` section of a recipe: a dataset to read, or samples of the policy labelled here."""

    # A file of translations to learn from; null: sample from the policy and label here. Read by extension and
    # columns (see offline_rows): `mtrl label` output, annotated JSONL (src/mt + spans, or the MQM JSONL of
    # shared/data/mqm), plain src/mt JSONL (labelled here with the detector), Google's MQM TSV, a WMT
    # system-output TSV, or Parquet. Missing token_ids/token_rewards are computed with the policy's tokenizer.
    data: str | None = None
    num_sources: Annotated[int, Range(ge=1)] = 500  # sources taken from data.train to sample from
    samples_per_source: Annotated[int, Range(ge=1)] = 4
    # the temperature the rows are (or, for offline.data, were) sampled at; Q-SFT reads every model at it
    temperature: Annotated[float, Range(gt=0)] = 1.0


def target_ids(tokenizer: Any, text: str, eos_token_id: int | None = None, forced_bos_token_id: int | None = None,
               drop_bos: bool = False) -> list[int]:
    """The token ids a policy emits for ``text``: the tokenizer's target encoding, EOS last.

    ``eos_token_id`` (default the tokenizer's) is appended when the encoding does not end with it (causal
    tokenizers add none); ``forced_bos_token_id`` (NLLB-style target language) replaces a leading special
    token or is put first; ``drop_bos``: drop a leading BOS (a causal target continues the prompt).
    """
    ids = list(tokenizer(text_target=text)["input_ids"])
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if drop_bos and ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if forced_bos_token_id is not None and (not ids or ids[0] != forced_bos_token_id):
        if ids and ids[0] in set(tokenizer.all_special_ids) and ids[0] != eos:
            ids = ids[1:]
        ids = [forced_bos_token_id] + ids
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def policy_target_ids(policy: Policy, text: str) -> list[int]:
    """The ids ``policy`` would emit for ``text``: EOS last, NLLB's target-language token first, and no BOS
    for a causal policy (its target continues the prompt)."""
    return target_ids(policy.tokenizer, text, policy.eos_token_id, policy.forced_bos_token_id,
                      drop_bos=policy.kind == "causal")


def read_offline_data(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``offline.data`` (:func:`mtrl.translations.read_translations`), sources as text."""
    if not Path(path).is_file():
        raise MtrlError(f"offline.data: no such file {path}")
    rows = [{**r, "src": r["src"] or ""} for r in read_translations(path)]
    if not rows:
        raise MtrlError(f"offline.data: {path} holds no rows")
    return rows


def load_offline_data(cfg: OfflineConfig, policy: Policy) -> list[dict[str, Any]] | None:
    """``offline.data`` read once, before any work, each row with the token ids the policy would emit
    (:func:`policy_target_ids`, unless it has its own); a row the policy cannot read whole (a translation, with a
    causal policy's prompt, longer than the model's positions) is refused. None without ``offline.data``: the
    policy's own samples are never longer (``max_new_tokens``)."""
    if not cfg.data:
        return None
    # a row's own token_rewards belong to its own token_ids: without those they are dropped (and made again)
    rows = [r if r.get("token_ids") else
            {**{k: v for k, v in r.items() if k != "token_rewards"}, "token_ids": policy_target_ids(policy, r["mt"])}
            for r in read_offline_data(cfg.data)]
    limit = policy.max_positions
    if limit is None:
        return rows
    lengths = [len(r["token_ids"]) for r in rows]
    if policy.kind == "causal":
        lengths = [n + p for n, p in zip(lengths, policy.source_lengths([r["src"] for r in rows]))]
    too_long = [(i, n) for i, n in enumerate(lengths, 1) if n > limit]
    if too_long:
        i, n = too_long[0]
        what = "prompt and translation" if policy.kind == "causal" else "translation"
        raise MtrlError(f"offline.data {cfg.data}: row {i}'s {what} is {n} tokens, more than the policy's {limit} "
                        f"positions ({len(too_long)} of {len(rows)} rows are); split or drop such rows")
    return rows


def reward_given_spans(rows: list[dict[str, Any]], rewarder: Rewarder, where: str,
                       chunk_size: int = 256) -> list[dict[str, Any]]:
    """``token_rewards`` (and ``score``, ``spans`` sanitised) of rows whose spans are given (human MQM or another
    detector's): the rewarder's reward mode on the given spans, no detector call. Rows need ``token_ids``.

    The sentence score is the row's own ``score`` when it has one, else minus its WMT MQM penalty."""
    from mtrl.detectors import Detection
    from mtrl.detectors.gold import gold_detection, parse_spans

    out = []
    for c in range(0, len(rows), chunk_size):
        chunk = rows[c:c + chunk_size]
        dets = []
        for i, r in enumerate(chunk, c + 1):
            det = gold_detection(r["mt"], parse_spans(r["spans"], r["mt"], f"{where}: row {i}"))
            dets.append(det if r.get("score") is None else Detection(det.spans, float(r["score"])))
        refs = [r.get("ref") for r in chunk]
        res = rewarder([r["src"] for r in chunk], [r["mt"] for r in chunk],
                       None if all(x is None for x in refs) else refs, [r["token_ids"] for r in chunk],
                       detections=dets)
        out += [{**r, "spans": [s.to_dict(r["mt"]) for s in d.spans], "score": score_, "token_rewards": tr}
                for r, d, score_, tr in zip(chunk, dets, res.scores, res.token_rewards)]
    return out




def offline_rows(cfg: OfflineConfig, policy: Policy, rewarder: Rewarder, train_pairs: Sequence[tuple[str, str]],
                 out_dir: Path, max_new_tokens: int, seed: int, log: RunLog,
                 data: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Labelled rows with ``token_ids``, ``token_rewards`` and ``spans``: read from ``cfg.data`` (``data``: the
    rows :func:`load_offline_data` read already), or sampled from the policy and labelled into
    ``out_dir/labelled.jsonl``.

    ``cfg.data`` (see :func:`read_offline_data` for the formats) is completed as needed:

    * rows with ``token_ids`` and ``token_rewards`` (``mtrl label --tokenizer`` output) are used as they are;
    * rows with spans (human MQM annotations, or xCOMET's from elsewhere) but no token ids: their
      translations are tokenised as the policy would emit them (:func:`policy_target_ids`) and rewarded on the
      given spans (:func:`reward_given_spans`);
    * rows without spans (plain src/mt JSONL, system-output TSV): tokenised and labelled with the recipe's
      detector (:func:`mtrl.label.label`, resumable).

    Completed rows are written to ``out_dir/labelled.jsonl`` (what the algorithm trains on).
    """
    labelled = Path(out_dir) / "labelled.jsonl"
    if cfg.data:
        rows = data if data is not None else load_offline_data(cfg, policy)
        if all("token_rewards" in r for r in rows):
            return rows
        annotated = ["spans" in r for r in rows]
        if any(annotated) and not all(annotated):
            raise MtrlError(f"{cfg.data}: row {annotated.index(False) + 1} has no spans while others have; give "
                            "every row its spans (an empty list when it has no error), or none")
        empty = sum(not r["mt"].strip() for r in rows)
        rows = [r for r in rows if r["mt"].strip()]
        if all(annotated):
            log.message(f"mtrl: rewarding the given spans of {len(rows)} rows of {cfg.data} ({empty} empty skipped) ...")
            rows = reward_given_spans(rows, rewarder, str(cfg.data))
            labelled.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(labelled, rows)
            return rows
        log.message(f"mtrl: labelling {len(rows)} rows of {cfg.data} with the detector ...")
    else:
        log.message(f"mtrl: sampling {cfg.samples_per_source} translations for {cfg.num_sources} sources ...")
        rows = sample_rows(lambda: policy, train_pairs[: cfg.num_sources], cfg.samples_per_source, cfg.temperature,
                           max_new_tokens, seed=seed, progress=log.progress)
    counts = label(rows, labelled, rewarder, progress=log.progress)
    log.message(f"mtrl: labelled {counts['rows']} rows ({counts['rejected']} rejected) -> {labelled}")
    return read_jsonl(labelled)
