"""Reading user files strictly and writing outputs atomically.

Every user mistake becomes an :class:`MtrlError` that names the file and line,
so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtrl.errors import MtrlError, one_line


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
            with writing(path), open(path, "r+b") as f:
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


# --------------------------------------------------------------------------- writing
# "... (os error 28)": how Rust libraries (safetensors, tokenizers) report an I/O error, without an errno attribute
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_errno(error: BaseException) -> int | None:
    """The errno behind ``error``: an ``OSError``'s, or one a Rust library names in its message, or its cause's."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _OS_ERROR.search(str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str | Path, error: BaseException) -> MtrlError | None:
    """The one line for a failed write of ``path`` (a full disk, a quota, a read-only file system ...):
    ``cannot write PATH: No space left on device``. None when ``error`` is not an I/O error (a bug: let it show)."""
    if isinstance(error, MtrlError):
        return error
    n = os_errno(error)
    if n is not None:
        return MtrlError(f"cannot write {path}: {os.strerror(n)}")
    if isinstance(error, OSError):
        return MtrlError(f"cannot write {path}: {one_line(error)}")
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Writes to ``path`` in this block that fail become one :class:`MtrlError` line naming ``path``."""
    try:
        yield
    except Exception as e:
        err = write_error(path, e)
        if err is None or err is e:
            raise
        raise err from e


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Write to a temporary file next to ``path`` and rename it into place on success.

    A crash or Ctrl-C leaves the old file (or none), never a half-written one. Any failure removes the
    temporary file; a failed write (a full disk: any ``OSError`` in the block too) is one :class:`MtrlError`
    line naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
            with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """Fill a temporary directory (``tmp``, default ``.NAME.tmp`` next to ``path``), then rename it to ``path``
    (replacing what was there). Any failure removes the temporary directory, so nothing half-written is
    left; a failed write (an ``OSError``, or a library's error naming an os error) is one :class:`MtrlError`
    line naming ``path``."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp")
    try:
        with writing(path):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            yield tmp
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` (whole lines) to an append-only log (``metrics.jsonl``, a labelling ``.partial``).

    A failed write (a full disk) cuts the file back to its length before, so that it holds whole lines only
    (and can be resumed from), and is one :class:`MtrlError` line naming ``path``.
    """
    data = text.encode("utf-8")
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
