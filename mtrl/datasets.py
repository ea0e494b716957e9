"""Small parallel-corpus loaders: the shipped Multi30k, and user JSONL / TSV / text-file pairs.

Every loader returns a list of ``(source, reference)`` string pairs, so the rest of mtrl never
cares where the text came from. Lines are kept as they are (only the line end is removed).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from mtrl.errors import MtrlError
from mtrl.io import numbered_jsonl

Pair = tuple[str, str]
PathLike = str | Path

MULTI30K_DIR = Path(__file__).parent / "data" / "multi30k"
# split name -> file stem in mtrl/data/multi30k (see mtrl/data/README.md)
MULTI30K_SPLITS = {"train": "train", "val": "val", "test2016": "test_2016_flickr"}
SOURCE_FIELDS = ("src", "source")
REFERENCE_FIELDS = ("ref", "reference")


def load_parallel(
    name_or_path: PathLike | Sequence[PathLike],
    split: str | None = None,
    *,
    reverse: bool = False,
    src_field: str | None = None,
    ref_field: str | None = None,
    limit: int | None = None,
) -> list[Pair]:
    """Load (source, reference) pairs.

    ``name_or_path`` is one of:

    - ``"multi30k"``: the shipped corpus, en->de, ``split`` in train / val / test2016;
    - a ``.jsonl`` file with fields ``src`` (or ``source``) and ``ref`` (or ``reference``);
    - a ``.tsv`` file with a header row and the same column names;
    - a pair ``(source_file, reference_file)`` of plain text files (optionally ``.gz``), one sentence a line.

    ``src_field``/``ref_field`` override the JSONL field or TSV column names. ``reverse=True`` swaps
    the two sides (de->en for Multi30k). ``limit`` keeps the first N pairs.
    """
    if isinstance(name_or_path, (list, tuple)):
        if len(name_or_path) != 2:
            raise MtrlError(f"a pair of text files needs exactly 2 paths, got {len(name_or_path)}")
        _no_split(split, "a pair of text files")
        pairs = read_text_pair(name_or_path[0], name_or_path[1])
    elif str(name_or_path) == "multi30k":
        pairs = load_multi30k(split)
    else:
        path = Path(name_or_path)
        suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
        kind = suffixes[-1] if suffixes else ""
        _no_split(split, str(path))
        if kind in (".jsonl", ".json"):
            pairs = read_jsonl_pairs(path, src_field, ref_field)
        elif kind == ".tsv":
            pairs = read_tsv(path, src_field, ref_field)
        else:
            raise MtrlError(
                f"don't know how to read {str(path)!r}: use 'multi30k', a .jsonl or .tsv file, "
                "or a (source_file, reference_file) pair of text files"
            )
    if reverse:
        pairs = [(ref, src) for src, ref in pairs]
    return pairs[:limit] if limit is not None else pairs


def load_multi30k(split: str | None) -> list[Pair]:
    """Multi30k task 1 (en->de), from the copy shipped inside the package."""
    if split not in MULTI30K_SPLITS:
        raise MtrlError(f"multi30k split must be one of {', '.join(MULTI30K_SPLITS)}; got {split!r}")
    stem = MULTI30K_DIR / MULTI30K_SPLITS[split]
    return read_text_pair(f"{stem}.en.gz", f"{stem}.de.gz")


def read_text_pair(src_path: PathLike, ref_path: PathLike) -> list[Pair]:
    """Line i of ``src_path`` translates to line i of ``ref_path``."""
    src, ref = _read_lines(src_path), _read_lines(ref_path)
    if len(src) != len(ref):
        raise MtrlError(
            f"line counts differ: {src_path} has {len(src)} lines, {ref_path} has {len(ref)}"
        )
    return list(zip(src, ref))


def read_jsonl_pairs(path: PathLike, src_field: str | None = None, ref_field: str | None = None) -> list[Pair]:
    """(source, reference) pairs of a JSON-lines file, one object a line; blank lines are skipped."""
    src_names, ref_names = _names(src_field, SOURCE_FIELDS), _names(ref_field, REFERENCE_FIELDS)
    return [(_field(obj, src_names, path, i), _field(obj, ref_names, path, i)) for i, obj in numbered_jsonl(path)]


def read_tsv(path: PathLike, src_col: str | None = None, ref_col: str | None = None) -> list[Pair]:
    """Tab-separated with a header row; no quoting, so text may contain quotes but not tabs."""
    with _open(path) as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            raise MtrlError(f"{path}: empty file (expected a header row)")
        cols = []
        for names in (_names(src_col, SOURCE_FIELDS), _names(ref_col, REFERENCE_FIELDS)):
            found = [c for c in names if c in header]
            if not found:
                raise MtrlError(f"{path}: no column {' or '.join(map(repr, names))} in header {header}")
            cols.append(header.index(found[0]))
        i, j = cols
        pairs = []
        for lineno, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise MtrlError(f"{path}:{lineno}: {len(row)} columns, header has {len(header)}")
            pairs.append((row[i], row[j]))
    return pairs


def _names(name: str | None, aliases: tuple[str, ...]) -> tuple[str, ...]:
    """Field names to look for: ``src`` and ``source`` stand for each other (so do ``ref``/``reference``)."""
    if name is None or name in aliases:
        return (name, *[a for a in aliases if a != name]) if name else aliases
    return (name,)


def _field(obj: dict, names: Sequence[str], path: PathLike, lineno: int) -> str:
    for name in names:
        if name in obj:
            if not isinstance(obj[name], str):
                raise MtrlError(f"{path}:{lineno}: field {name!r} must be a string")
            return obj[name]
    raise MtrlError(f"{path}:{lineno}: missing field {' or '.join(map(repr, names))}")


def _read_lines(path: PathLike) -> list[str]:
    with _open(path) as f:
        return [line.rstrip("\r\n") for line in f]


def _open(path: PathLike) -> IO[str]:
    path = Path(path)
    if not path.is_file():
        raise MtrlError(f"file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="\n")
    return open(path, encoding="utf-8-sig", newline="\n")


def _no_split(split: str | None, what: str) -> None:
    if split is not None:
        raise MtrlError(f"split={split!r} only applies to builtin corpora, not to {what}")


def load_pairs(spec: str, source_field: str | None = "src", reference_field: str | None = "ref",
               limit: int | None = None) -> list[Pair]:
    """A recipe's data spec: ``multi30k:SPLIT``, a JSONL/TSV file, or ``hf:NAME[:CONFIG]:SPLIT`` (``datasets``)."""
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) not in (2, 3):
            raise MtrlError(f"data spec {spec!r} must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
        import datasets

        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
            raise MtrlError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0][:200]}") from None
        pairs = []
        for row in ds:
            row = row.get("translation", row)
            if source_field not in row or reference_field not in row:
                raise MtrlError(f"dataset {spec!r} has no fields {source_field!r}/{reference_field!r}; set "
                                f"data.source_field and data.reference_field (fields: {', '.join(row)})")
            pairs.append((row[source_field], row[reference_field]))
    elif spec.startswith("multi30k"):
        _, _, split = spec.partition(":")
        pairs = load_parallel("multi30k", split or "train")
    else:
        pairs = load_parallel(spec, src_field=source_field, ref_field=reference_field)
    if not pairs:
        raise MtrlError(f"data {spec!r} is empty")
    return pairs[:limit] if limit else pairs


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of ``step``: a fresh permutation per epoch, a pure function of (seed, step)."""
    import numpy as np

    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return out
