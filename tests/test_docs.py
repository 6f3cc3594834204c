"""The method notes live in the repository: nothing cites a file outside it, and every
`docs/method.md#<anchor>` cited anywhere names a heading of docs/method.md. Pure Python, no torch."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"
OUTSIDE = ("REFERENCE.md", "../shared", "/work/shared")
OLD_CITATION = re.compile(r"\bREFERENCE\b")  # "REFERENCE 5", "REFERENCE's": the old file by another name
CITATION = re.compile(r"docs/method\.md#([A-Za-z0-9_-]+)")
LOCAL_LINK = re.compile(r"\]\(#([A-Za-z0-9_-]+)\)")
SKIPPED = ("bench/results/",)  # recorded outputs of earlier runs, not documentation


def tracked_texts() -> dict[str, str]:
    """path -> text of every tracked file that decodes as UTF-8 (binary files are skipped)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or name.startswith(SKIPPED) or not path.is_file():
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens, underscores and
    spaces kept), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor (outside code fences); a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen, fence = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fence or not match:
            continue
        base = github_anchor(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_github_anchor_rules():
    assert github_anchor("Stage 2: language modelling and alignment") == "stage-2-language-modelling-and-alignment"
    assert github_anchor("Paper and authors' code: differences and options") == \
        "paper-and-authors-code-differences-and-options"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n### B, c (d)\n") == {"a", "a-1", "b-c-d"}


def test_nothing_cites_a_file_outside_the_repository():
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()  # names the patterns it looks for
    bad = [f"{name}:{n}: {line.strip()}" for name, text in tracked_texts().items() if name != this
           for n, line in enumerate(text.splitlines(), 1)
           if any(s in line for s in OUTSIDE) or OLD_CITATION.search(line)]
    assert not bad, "cite docs/method.md#<section> instead:\n" + "\n".join(bad)


def test_every_cited_method_anchor_exists():
    assert METHOD.is_file(), "docs/method.md is missing"
    known = anchors(METHOD.read_text(encoding="utf-8"))
    cited = {(name, a) for name, text in tracked_texts().items() for a in CITATION.findall(text)}
    cited |= {("docs/method.md", a) for a in LOCAL_LINK.findall(METHOD.read_text(encoding="utf-8"))}
    assert cited, "nothing cites docs/method.md#<anchor>"
    missing = sorted(f"{name}: #{a}" for name, a in cited if a not in known)
    assert not missing, "anchors with no heading in docs/method.md:\n" + "\n".join(missing)


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(name: str, text: str) -> list[str]:
    """Relative links of a tracked markdown file whose file or heading does not exist (web links skipped)."""
    bad = []
    for target in MARKDOWN_LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / name).parent / path if path else ROOT / name
        if not file.resolve().is_file():
            bad.append(f"{name}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            bad.append(f"{name}: {target} (no such heading)")
    return bad


def test_every_relative_markdown_link_resolves():
    bad = [b for name, text in tracked_texts().items() if name.endswith(".md") for b in broken_links(name, text)]
    assert not bad, "links to a missing file or heading:\n" + "\n".join(bad)


def test_readme_is_a_guide_with_the_api_early():
    """A newcomer finds the two commands, the demo's result, the API and export in the first 150 lines."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move dated runs to docs/results.md"
    first = "\n".join(lines[:150])
    for needed in ("make demo", "make test", "## What the demo shows", "blitext.load(", "blitext export"):
        assert needed in first, f"{needed!r} is not in README.md's first 150 lines"
