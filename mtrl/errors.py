"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""

import re


class MtrlError(Exception):
    """A mistake in the user's input or setup (bad file, bad option, missing model)."""


class DetectorOutOfMemory(MtrlError):
    """The detector ran out of memory even on a single row, after its batch was retried in halves.

    Raised by :class:`mtrl.rewards.Rewarder` (training, ``mtrl score``, ``mtrl label``); a trainer saves a
    checkpoint before it stops.
    """


def one_line(error: BaseException | str, limit: int = 200) -> str:
    """The first sentence of a library's error message, whole, for an ``MtrlError`` of one line.

    Libraries append paragraphs (torch, transformers); longer than ``limit``, it is cut at a word, with "…".
    """
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else (type(error).__name__ if isinstance(error, BaseException) else "")
    sentence = re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0]
    if len(sentence) <= limit:
        return sentence
    cut = sentence[:limit].rsplit(None, 1)[0] if " " in sentence[:limit] else sentence[:limit]
    return cut.rstrip(",;:") + "…"


def exit_status(command, *args) -> int:
    """Run a command function; a user error is one ``mtrl: error:`` line and status 2, Ctrl-C status 130."""
    import sys

    try:
        return int(command(*args) or 0)
    except MtrlError as e:
        print(f"mtrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtrl: interrupted", file=sys.stderr)
        return 130
