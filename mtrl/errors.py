"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class MtrlError(Exception):
    """A mistake in the user's input or setup (bad file, bad option, missing model)."""


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
