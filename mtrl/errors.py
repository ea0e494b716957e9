"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class MtrlError(Exception):
    """A mistake in the user's input or setup (bad file, bad option, missing model)."""
