"""User-facing errors: the CLI prints their message as one line and exits 2, no traceback."""


class BlitextError(Exception):
    """A mistake the user can fix (bad path, mismatched cache, missing weights).

    The message must say what is wrong, quoting the offending value, and what to do.
    """


class BadInputError(BlitextError):
    """One input item (an image, a line of text) cannot be used; runs record it and go on."""


def first_line(e: BaseException, width: int | None = None) -> str:
    """An exception's text as one line, for a message that quotes it: its first non-blank line (cut to
    `width` characters), without the quotes KeyError adds; its type's name where it has no text.

    `str(e).splitlines()[0]` would raise IndexError on an exception with no text, turning one
    clear line into a traceback."""
    for line in str(e).strip().strip("'\"").splitlines():
        if line.strip():
            return line.strip()[:width]
    return type(e).__name__


def described(e: BaseException) -> str:
    """first_line after the exception's type name ("RuntimeError: ..."), which says what failed where the
    text alone would not; a BlitextError's text already says it all."""
    line = first_line(e)
    if isinstance(e, BlitextError) or line == type(e).__name__:
        return line
    return f"{type(e).__name__}: {line}"
