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
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mtrl.errors import MtrlError
from mtrl.io import append_text, atomic_open, read_jsonl, read_log, write_jsonl, writing
from mtrl.rewards import Rewarder, hypothesis_intervals
from mtrl.score import score

Key = tuple[str, str, str | None]


def _key(row: dict[str, Any]) -> Key:
    return (row.get("src") or "", row["mt"], row.get("ref"))


def chunk_seed(seed: int, chunk: int) -> int:
    """The torch seed of sampling chunk ``chunk``: a hash of (seed, chunk), the same in every process."""
    digest = hashlib.sha256(f"mtrl-sample:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_rows(load_policy: Callable[[], Any], pairs: Sequence[tuple[str, str]], samples: int,
                temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0,
                progress: bool = True, cache: str | Path | None = None,
                policy_id: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """N sampled translations per source from a policy, with the sampled ``token_ids``.

    The ids are kept so that labelling rewards exactly the tokens that were sampled (a decoded
    hypothesis re-encoded can tokenise differently). ``load_policy`` returns the
    :class:`~mtrl.policy.Policy`; it is called only when a chunk must be sampled.

    The (source, sample) list is sampled in chunks of ``batch_size`` rows, chunk ``c`` with
    ``torch.manual_seed(chunk_seed(seed, c))``: a chunk's samples depend only on the seed, the settings and
    the chunk's own rows, never on the chunks sampled before it in this process. ``cache`` (a JSON-lines
    file, ``mtrl label`` uses ``OUTPUT.samples.jsonl``) makes sampling resumable: each finished chunk is
    appended to it, and a rerun with the same settings (``policy_id`` names the policy: model, languages)
    samples only the chunks it lacks, so it returns the rows an uninterrupted run returns.
    """
    expanded = [(i, s, r, k) for i, (s, r) in enumerate(pairs) for k in range(samples)]
    chunks = [expanded[c:c + batch_size] for c in range(0, len(expanded), batch_size)]
    settings = {**(policy_id or {}), "samples": samples, "temperature": temperature,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed}
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

        from mtrl.policy import GenerationConfig
        from mtrl.rollout import response_ids

        policy = load_policy()
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        if cache is not None and not _log_lines(Path(cache)):  # absent or empty: start it with the settings line
            write_jsonl(cache, [{"settings": settings}])
        for c in tqdm(todo, desc="sample", disable=not progress, leave=False):
            chunk = chunks[c]
            torch.manual_seed(chunk_seed(seed, c))
            q, qm = policy.encode_sources([x[1] for x in chunk])
            responses, mask = policy.generate(q, qm, gen, sample=True)
            ids = response_ids(responses, mask)
            texts, _ = hypothesis_intervals(policy.tokenizer, ids)
            new = [{"source_index": i, "src": s, "mt": t, "ref": r, "sample": k, "token_ids": x, "chunk": c,
                    "chunk_rows": len(chunk)} for (i, s, r, k), t, x in zip(chunk, texts, ids)]
            if cache is not None:  # each line complete: a crash (or a full disk) loses at most this chunk
                append_text(cache, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in new))
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
    with writing(output.parent):
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
            # each line complete: a crash (or a full disk: one error line, the file cut back) loses at most a chunk
            append_text(partial, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in labelled))
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


def print_label_summary(counts: dict[str, int], output: Path) -> None:
    line = (f"{counts['rows']} rows in {output} ({counts['labelled']} labelled now, {counts['reused']} reused, "
            f"{counts['duplicates']} duplicates, {counts['rejected']} rejected")
    if counts["rejected"]:
        line += f": see {output.with_name(output.stem + '.rejected.jsonl')}"
    print(line + ")", file=sys.stderr)
