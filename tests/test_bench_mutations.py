"""bench/mutations.py breaks the library by replacing exact source text; a rename elsewhere must not
leave a mutation pointing at text that is gone (the script would stop at it). Pure Python, no torch."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_finds_its_source_text_once():
    spec = importlib.util.spec_from_file_location("bench_mutations", ROOT / "bench" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    stale = [f"{m.name}: {m.file} holds its text {(ROOT / m.file).read_text().count(m.old)} times"
             for m in module.MUTATIONS if (ROOT / m.file).read_text().count(m.old) != 1]
    assert not stale, "\n".join(stale)
