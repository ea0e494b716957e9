"""``mtrl label``: build an offline RL dataset of detector-labelled translations.

Rows are (source, hypothesis, optional reference): existing MT outputs (JSONL,
or a WMT-style TSV with ``source``, ``ref_A`` and one ``hyp_<SYSTEM>`` column per
system), or N samples per source drawn from a policy. Each row is scored in
batches through the reward pipeline (:class:`mtrl.rewards.Rewarder`, via
:func:`mtrl.score.score`) and written with its spans, sentence score and, for a
tokenizer, ``token_ids`` and ``token_rewards``: exactly what the offline trainers
read. Sampled rows keep the ids that were sampled and are rewarded on them.

* Resumable: every finished chunk is appended to ``OUTPUT.partial``; a rerun
  skips rows already labelled there or in a finished ``OUTPUT``. A half-written
  last line (a crash during the append) is dropped with a warning. Sampling from a
  policy resumes too: ``mtrl label --policy`` keeps the sampled rows in
  ``OUTPUT.samples.jsonl`` (see :func:`sample_rows`), deleted once ``OUTPUT`` is written.
* De-duplicated: a repeated (source, hypothesis, reference) row is scored once.
* Bad rows (empty hypothesis, over-length, missing reference) are written to
  ``OUTPUT.rejected.jsonl`` with a ``reason`` and counted in the summary.
* Atomic: ``OUTPUT`` (JSON lines) and ``OUTPUT.parquet`` (a ``datasets`` table)
  appear only when the whole set is done.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from tqdm.auto import tqdm

from mtrl.errors import MtrlError, one_line
from mtrl.io import atomic_open, read_jsonl, read_lines, read_log, write_jsonl
from mtrl.rewards import Rewarder, hypothesis_intervals
from mtrl.schema import Range
from mtrl.score import score

Key = tuple[str, str, str | None]


def _key(row: dict[str, Any]) -> Key:
    return (row.get("src") or "", row["mt"], row.get("ref"))


def read_mt_outputs(path: str | Path, ref_column: str = "ref_A") -> list[dict[str, Any]]:
    """Rows of a JSONL file (src/mt/ref or source/hypothesis/reference) or a WMT-style system-output TSV."""
    p = Path(path)
    if p.suffix == ".tsv":
        try:
            df = pd.read_csv(p, sep="\t", keep_default_na=False, dtype=str)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise MtrlError(f"{path}: cannot read as TSV ({str(e).splitlines()[0]})") from None
        systems = [c for c in df.columns if c.startswith("hyp_")]
        if "source" not in df.columns or not systems:
            raise MtrlError(f"{path}: a system-output TSV needs a 'source' column and 'hyp_<SYSTEM>' columns")
        refs = df[ref_column] if ref_column in df.columns else [None] * len(df)
        return [{"src": s, "mt": h, "ref": r, "system": col[4:]}
                for col in systems for s, h, r in zip(df["source"], df[col], refs)]
    rows = []
    for i, r in enumerate(read_jsonl(p), 1):
        mt = r.get("mt", r.get("hypothesis"))
        if not isinstance(mt, str):
            raise MtrlError(f"{path}: row {i} has no text field 'mt' (or 'hypothesis')")
        rows.append({**r, "src": r.get("src", r.get("source")), "mt": mt, "ref": r.get("ref", r.get("reference"))})
    return rows


def chunk_seed(seed: int, chunk: int) -> int:
    """The torch seed of sampling chunk ``chunk``: a hash of (seed, chunk), the same in every process."""
    digest = hashlib.sha256(f"mtrl-sample:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_rows(model: str, pairs: Sequence[tuple[str, str]], samples: int, temperature: float = 1.0,
                max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0, policy_config: Any = None,
                src_lang: str = "English", tgt_lang: str = "German", progress: bool = True,
                cache: str | Path | None = None) -> list[dict[str, Any]]:
    """N sampled translations per source from a policy (hub id or local path), with the sampled ``token_ids``.

    The ids are kept so that labelling rewards exactly the tokens that were sampled (a decoded
    hypothesis re-encoded can tokenise differently). ``src_lang``/``tgt_lang`` fill a causal
    policy's prompt.

    The (source, sample) list is sampled in chunks of ``batch_size`` rows, chunk ``c`` with
    ``torch.manual_seed(chunk_seed(seed, c))``: a chunk's samples depend only on the seed, the settings and
    the chunk's own rows, never on the chunks sampled before it in this process. ``cache`` (a JSON-lines
    file, ``mtrl label`` uses ``OUTPUT.samples.jsonl``) makes sampling resumable: each finished chunk is
    appended to it, and a rerun with the same settings samples only the chunks it lacks, so it returns the
    rows an uninterrupted run returns. The policy is not loaded when every chunk is cached.
    """
    expanded = [(i, s, r, k) for i, (s, r) in enumerate(pairs) for k in range(samples)]
    chunks = [expanded[c:c + batch_size] for c in range(0, len(expanded), batch_size)]
    settings = {"model": model, "samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "seed": seed, "src_lang": src_lang, "tgt_lang": tgt_lang,
                "policy_config": None if policy_config is None else repr(policy_config)}
    cached = _read_sample_cache(Path(cache), settings, pairs) if cache is not None else {}
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    todo = []
    for c, chunk in enumerate(chunks):
        got = [cached.get((i, k)) for i, _, _, k in chunk]
        if all(g is not None and g["chunk"] == c and g["chunk_rows"] == len(chunk) for g in got):
            rows.update(((i, k), g) for (i, _, _, k), g in zip(chunk, got))
        else:
            todo.append(c)
    if todo:
        import torch

        from mtrl.policy import GenerationConfig, PolicyConfig, build_policy
        from mtrl.rollout import response_ids

        policy = build_policy(policy_config or PolicyConfig(model=model), model, src_lang, tgt_lang)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            if not _log_lines(Path(cache)):  # absent or empty: start it with the settings line
                with open(cache, "w", encoding="utf-8") as f:
                    f.write(json.dumps({"settings": settings}, ensure_ascii=False) + "\n")
        for c in tqdm(todo, desc="sample", disable=not progress, leave=False):
            chunk = chunks[c]
            torch.manual_seed(chunk_seed(seed, c))
            q, qm = policy.encode_sources([x[1] for x in chunk])
            responses, mask = policy.generate(q, qm, gen, sample=True)
            ids = response_ids(responses, mask)
            texts, _ = hypothesis_intervals(policy.tokenizer, ids)
            new = [{"source_index": i, "src": s, "mt": t, "ref": r, "sample": k, "token_ids": x, "chunk": c,
                    "chunk_rows": len(chunk)} for (i, s, r, k), t, x in zip(chunk, texts, ids)]
            if cache is not None:  # each line complete: a crash loses at most this chunk
                with open(cache, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in new))
            rows.update(((x["source_index"], x["sample"]), x) for x in new)
    return [{"src": row["src"], "mt": row["mt"], "ref": row["ref"], "sample": k, "token_ids": row["token_ids"]}
            for i, _, _, k in expanded for row in [rows[(i, k)]]]


def _read_sample_cache(path: Path, settings: dict[str, Any], pairs: Sequence[tuple[str, str]]
                       ) -> dict[tuple[int, int], dict[str, Any]]:
    """Rows of a sampling cache by (source index, sample index), the last line of a key winning; {} when absent.

    A cache written with other settings, or for other sources, is an error: reusing it would mix samples."""
    lines = _log_lines(path)
    if not lines:
        return {}
    head = lines[0].get("settings")
    if not isinstance(head, dict):
        raise MtrlError(f"{path}: not a sampling cache (no settings line); delete it to sample again")
    changed = [k for k in settings if head.get(k) != settings[k]]
    if changed:
        was = ", ".join(f"{k} {head.get(k)!r} (now {settings[k]!r})" for k in changed)
        raise MtrlError(f"{path} holds samples taken with other settings: {was}; rerun with those settings, "
                        "or delete it to sample again")
    out = {}
    for n, row in enumerate(lines[1:], 2):
        if not (all(isinstance(row.get(f), int) for f in ("source_index", "sample", "chunk", "chunk_rows"))
                and isinstance(row.get("mt"), str) and isinstance(row.get("token_ids"), list)):
            raise MtrlError(f"{path}: line {n} is not a sampled row; delete the file to sample again")
        i = row["source_index"]
        if i >= len(pairs):
            continue  # a source beyond this run's --max-sources: not needed now
        if (row.get("src"), row.get("ref")) != tuple(pairs[i]):
            raise MtrlError(f"{path}: line {n} was sampled from another source than source {i + 1} of the data "
                            "(the data changed?); delete the file to sample again")
        out[(i, row["sample"])] = row
    return out


def _log_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an append-only log, the file made ready for appending; [] when absent."""
    return read_log(path, repair=True) if path.exists() else []


def check_row(row: dict[str, Any], needs_reference: bool, tokenizer: Any, max_tokens: int) -> str | None:
    """Why a row cannot be labelled, or None."""
    if not row["mt"].strip():
        return "empty hypothesis"
    if needs_reference and not (row.get("ref") or "").strip():
        return "missing reference"
    if tokenizer is not None:  # sampled rows know their tokens; others are encoded once more here
        n = len(row["token_ids"]) if "token_ids" in row else len(tokenizer(text_target=row["mt"])["input_ids"])
        if n > max_tokens:
            return f"over-length: {n} tokens > {max_tokens}"
    elif len(row["mt"]) > 8 * max_tokens:
        return f"over-length: {len(row['mt'])} characters > {8 * max_tokens}"
    return None


def label(rows: list[dict[str, Any]], output: str | Path, rewarder: Rewarder, *, chunk_size: int = 512,
          max_tokens: int = 256, progress: bool = True) -> dict[str, int]:
    """Label ``rows`` into ``output`` with the reward pipeline; returns counts (labelled, reused, duplicates,
    rejected). Rows that carry ``token_ids`` (sampled) are rewarded on those ids."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    done: dict[Key, dict[str, Any]] = {}
    finished = read_jsonl(output) if output.exists() else []
    for r in finished + _log_lines(partial):  # .partial: a crash may have cut its last line
        done.setdefault(_key(r), r)
    reused = sum(1 for r in rows if _key(r) in done)
    rejected, todo, seen = [], [], set(done)
    duplicates = 0
    for i, r in enumerate(rows, 1):
        k = _key(r)
        if k in seen:
            duplicates += k not in done
            continue
        why = check_row(r, rewarder.needs_reference, rewarder.tokenizer, max_tokens)
        if why:
            rejected.append({**r, "row": i, "reason": why})
            continue
        seen.add(k)
        todo.append(r)
    name = rewarder.detector.name if rewarder.detector is not None else rewarder.config.scorer
    with tqdm(total=len(todo), desc=f"label ({name})", unit="seg", disable=not progress) as bar:
        for i in range(0, len(todo), chunk_size):
            chunk = todo[i:i + chunk_size]
            refs = [r.get("ref") for r in chunk]
            ids = [r["token_ids"] for r in chunk] if all("token_ids" in r for r in chunk) else None
            segs = score([r["mt"] for r in chunk], [r.get("src") or "" for r in chunk],
                         None if all(x is None for x in refs) else refs, rewarder=rewarder, token_ids=ids)
            labelled = [{**r, **s.to_dict()} for r, s in zip(chunk, segs)]
            with open(partial, "a", encoding="utf-8") as f:  # each line complete: a crash loses at most a chunk
                f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in labelled))
            for x in labelled:
                done.setdefault(_key(x), x)
            bar.update(len(chunk))
    final = [done[_key(r)] for r in _unique(rows) if _key(r) in done]
    write_jsonl(output, final)
    write_parquet(output.with_suffix(".parquet"), final)
    if rejected:
        write_jsonl(output.with_name(output.stem + ".rejected.jsonl"), rejected)
    partial.unlink(missing_ok=True)
    return {"labelled": len(todo), "reused": reused, "duplicates": duplicates, "rejected": len(rejected),
            "rows": len(final)}


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in rows:
        if _key(r) not in seen:
            seen.add(_key(r))
            out.append(r)
    return out


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """The same rows as a Parquet table (pandas + pyarrow; ``datasets.load_dataset("parquet", ...)`` reads it)."""
    flat = [{**r, "spans": json.dumps(r.get("spans", []), ensure_ascii=False),
             **({"error_spans": json.dumps(r["error_spans"], ensure_ascii=False)} if "error_spans" in r else {})}
            for r in rows]
    with atomic_open(path, "wb") as f:
        pd.DataFrame(flat).to_parquet(f, index=False)


def print_summary(counts: dict[str, int], output: Path) -> None:
    line = (f"{counts['rows']} rows in {output} ({counts['labelled']} labelled now, {counts['reused']} reused, "
            f"{counts['duplicates']} duplicates, {counts['rejected']} rejected")
    if counts["rejected"]:
        line += f": see {output.with_name(output.stem + '.rejected.jsonl')}"
    print(line + ")", file=sys.stderr)


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
    temperature: Annotated[float, Range(gt=0)] = 1.0  # sampling temperature (Q-SFT then reads every model at it)


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


def _first(row: dict[str, Any], *names: str) -> Any:
    return next((row[n] for n in names if n in row), None)


def read_offline_data(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an offline data file in one shape: ``src``, ``mt``, ``ref`` and, where given, ``spans`` (from
    ``spans`` or ``error_spans``), ``token_ids``, ``token_rewards``, ``score``; other fields are kept.

    By extension: ``.tsv`` is Google's MQM TSV when it has the MQM columns (``system doc doc_id seg_id rater
    source target category severity``), else a WMT system-output TSV (``source``, ``hyp_<SYSTEM>``);
    ``.parquet`` a table written by ``mtrl label`` (spans stored as JSON text); anything else JSON lines.
    """
    p = Path(path)
    if not p.is_file():
        raise MtrlError(f"offline.data: no such file {path}")
    if p.suffix == ".tsv":
        from mtrl.detectors.gold import MQM_TSV_COLUMNS, read_mqm_tsv

        header = set((read_lines(p)[:1] or [""])[0].split("\t"))
        raw = read_mqm_tsv(p) if set(MQM_TSV_COLUMNS) <= header else read_mt_outputs(p)
    elif p.suffix == ".parquet":
        try:
            raw = pd.read_parquet(p).to_dict("records")
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types; the user needs one line
            raise MtrlError(f"{path}: cannot read as Parquet ({one_line(e)})") from None
        for r in raw:
            for key in ("spans", "error_spans"):
                if isinstance(r.get(key), str):
                    r[key] = json.loads(r[key])
            for key in ("token_ids", "token_rewards"):
                if key in r and hasattr(r[key], "tolist"):
                    r[key] = r[key].tolist()
    else:
        raw = read_jsonl(p)
    rows = []
    for i, r in enumerate(raw, 1):
        mt = _first(r, "mt", "hypothesis")
        if not isinstance(mt, str):
            raise MtrlError(f"{path}: row {i} has no text field 'mt' (or 'hypothesis')")
        row = {**r, "src": _first(r, "src", "source") or "", "mt": mt, "ref": _first(r, "ref", "reference")}
        spans = _first(r, "spans", "error_spans")
        if spans is not None:
            row["spans"] = spans
        rows.append(row)
    if not rows:
        raise MtrlError(f"offline.data: {path} holds no rows")
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


def offline_rows(cfg: OfflineConfig, model_path: str, train_pairs: Sequence[tuple[str, str]], rewarder: Rewarder,
                 out_dir: Path, *, policy_config: Any, src_lang: str, tgt_lang: str, max_new_tokens: int,
                 seed: int, log: Any = print, progress: bool = True,
                 encode_target: Callable[[str], list[int]] | None = None) -> list[dict[str, Any]]:
    """Labelled rows with ``token_ids``, ``token_rewards`` and ``spans``: read from ``cfg.data``, or sampled from
    the policy and labelled into ``out_dir/labelled.jsonl``.

    ``cfg.data`` (see :func:`read_offline_data` for the formats) is completed as needed, with one recipe key:

    * rows with ``token_ids`` and ``token_rewards`` (``mtrl label --tokenizer`` output) are used as they are;
    * rows with spans (human MQM annotations, or xCOMET's from elsewhere) but no token ids: their
      translations are tokenised with the policy's tokenizer (``encode_target``, default :func:`target_ids`)
      and rewarded on the given spans (:func:`reward_given_spans`);
    * rows without spans (plain src/mt JSONL, system-output TSV): tokenised and labelled with the recipe's
      detector (:func:`label`, resumable).

    Completed rows are written to ``out_dir/labelled.jsonl`` (what the algorithm trains on).
    """
    if cfg.data:
        rows = read_offline_data(cfg.data)
        if all("token_ids" in r and "token_rewards" in r for r in rows):
            return rows
        if rewarder.tokenizer is None:
            raise MtrlError(f"{cfg.data}: rows without token_ids need the policy's tokenizer in the rewarder")
        if encode_target is None:
            forced = None
            if getattr(policy_config, "tgt_lang_code", None):
                forced = rewarder.tokenizer.convert_tokens_to_ids(policy_config.tgt_lang_code)
            encode_target = lambda text: target_ids(rewarder.tokenizer, text, forced_bos_token_id=forced)  # noqa: E731
        annotated = ["spans" in r for r in rows]
        if any(annotated) and not all(annotated):
            raise MtrlError(f"{cfg.data}: row {annotated.index(False) + 1} has no spans while others have; give "
                            "every row its spans (an empty list when it has no error), or none")
        empty = sum(not r["mt"].strip() for r in rows)
        rows = [{**r, "token_ids": r.get("token_ids") or encode_target(r["mt"])} for r in rows if r["mt"].strip()]
        labelled = Path(out_dir) / "labelled.jsonl"
        if all(annotated):
            log(f"mtrl: rewarding the given spans of {len(rows)} rows of {cfg.data} ({empty} empty skipped) ...")
            rows = reward_given_spans(rows, rewarder, str(cfg.data))
            labelled.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(labelled, rows)
            return rows
        log(f"mtrl: labelling {len(rows)} rows of {cfg.data} with the detector ...")
        counts = label(rows, labelled, rewarder, progress=progress)
        log(f"mtrl: labelled {counts['rows']} rows ({counts['rejected']} rejected) -> {labelled}")
        return read_jsonl(labelled)
    labelled = Path(out_dir) / "labelled.jsonl"
    log(f"mtrl: sampling {cfg.samples_per_source} translations for {cfg.num_sources} sources ...")
    rows = sample_rows(model_path, train_pairs[: cfg.num_sources], cfg.samples_per_source, cfg.temperature,
                       max_new_tokens, seed=seed, policy_config=policy_config, src_lang=src_lang,
                       tgt_lang=tgt_lang, progress=progress)
    counts = label(rows, labelled, rewarder, progress=progress)
    log(f"mtrl: labelled {counts['rows']} rows ({counts['rejected']} rejected) -> {labelled}")
    return read_jsonl(labelled)
