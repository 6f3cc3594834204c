"""User-facing errors: the CLI prints their message as one line and exits 2, no traceback."""


class BlitextError(Exception):
    """A mistake the user can fix (bad path, mismatched cache, missing weights).

    The message must say what is wrong, quoting the offending value, and what to do.
    """


class BadInputError(BlitextError):
    """One input item (an image, a line of text) cannot be used; runs record it and go on."""
