"""The one-line quoting of an exception that every user-facing message uses."""
from __future__ import annotations

from blitext.errors import BlitextError, described, first_line


def test_first_line_is_the_first_non_blank_line_cut_to_width():
    assert first_line(ValueError("\n  bad header\nmore detail")) == "bad header"
    assert first_line(ValueError("x" * 300), 160) == "x" * 160
    assert first_line(KeyError("missing")) == "missing"  # str(KeyError) adds quotes


def test_an_exception_without_text_is_named_by_its_type():
    assert first_line(OSError()) == "OSError"
    assert first_line(RuntimeError("  \n ")) == "RuntimeError"
    assert described(OSError()) == "OSError"


def test_described_names_the_type_except_for_blitext_errors():
    assert described(RuntimeError("PytorchStreamReader failed\nat frame 2")) == "RuntimeError: PytorchStreamReader failed"
    assert described(BlitextError("cache x: damaged; run blitext cache verify")) == "cache x: damaged; run blitext cache verify"
