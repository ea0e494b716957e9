"""Reading user files strictly and writing outputs atomically.

Every user mistake becomes an :class:`MtrlError` that names the file and line,
so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtrl.errors import MtrlError


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file (``.gz`` too), without their line ends (one segment per line).

    A leading UTF-8 byte-order mark is dropped: it is an encoding mark, not part of the first segment.
    """
    return _decode_lines(_read_bytes(path), path)


def _decode_lines(data: bytes, path: str | Path) -> list[str]:
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise MtrlError(f"{path}: line {i} is not valid UTF-8 (byte {e.start})") from None
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file; blank lines are skipped."""
    return [obj for _, obj in numbered_jsonl(path)]


def numbered_jsonl(path: str | Path, lines: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file, so callers can name the line of a later problem."""
    rows = []
    for i, line in enumerate(read_lines(path) if lines is None else lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MtrlError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise MtrlError(f"{path}: line {i} is not a JSON object")
        rows.append((i, obj))
    return rows


def read_log(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Objects of an append-only JSON-lines log (``metrics.jsonl``, a labelling ``.partial``)."""
    return [obj for _, obj in numbered_log(path, repair)]


def numbered_log(path: str | Path, repair: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of an append-only JSON-lines log.

    A crash can leave the last line half-written: that line is dropped with a warning on stderr and
    everything before it is read. A bad line anywhere else is still an error naming the line.
    ``repair``: also make the file ready for appending again (cut the half-written line off, or end a
    complete last line that lacks its line end), so the next append starts on a line of its own.
    """
    data = _read_bytes(path)
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:].decode("utf-8"))
            complete = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
            n = data.count(b"\n") + 1
            print(f"mtrl: warning: {path}: line {n} is incomplete (an interrupted write?); reading the "
                  f"{n - 1} lines before it", file=sys.stderr)
        if repair:
            with open(path, "r+b") as f:
                if complete:
                    f.seek(len(data))
                    f.write(b"\n")
                else:
                    f.truncate(cut)
        if not complete:
            data = data[:cut]
    return numbered_jsonl(path, _decode_lines(data, path))


def _read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise MtrlError(f"{path}: no such file")
    if p.is_dir():
        raise MtrlError(f"{path}: is a directory, expected a file")
    data = p.read_bytes()
    return gzip.decompress(data) if p.suffix == ".gz" else data


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Write to a temporary file next to ``path`` and rename it into place on success.

    A crash or Ctrl-C leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
