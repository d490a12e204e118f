"""The README is a front door that links to docs/, and no relative link in the docs is broken.

Engine-free: reads markdown files only.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def links(text: str) -> list[str]:
    """Link targets of inline links, images and reference definitions, outside code."""
    found = []
    for line in prose_lines(text):
        m = REF_DEF.match(line)
        if m:
            found.append(m.group(1))
            continue
        found += LINK.findall(INLINE_CODE.sub("", line))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation other than
    '-' and '_' dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def broken_links(md_path: str) -> list[str]:
    """Relative links of one markdown file whose file, or #anchor in a markdown file, is not there."""
    with open(md_path, encoding="utf-8") as f:
        text = f.read()
    bad = []
    for target in links(text):
        if not target or is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = md_path if not file_part else os.path.normpath(
            os.path.join(os.path.dirname(md_path), unquote(file_part)))
        if not dest.startswith(ROOT + os.sep) and dest != ROOT:
            bad.append(f"{target} (outside the repository)")
            continue
        if not os.path.exists(dest):
            bad.append(f"{target} (no such file)")
            continue
        if anchor and dest.endswith(".md") and unquote(anchor).lower() not in anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {rel(dest)})")
    return bad


def checked_files() -> list[str]:
    files = [README, os.path.join(ROOT, "converters", "README.md"), os.path.join(ROOT, "bench", "RESULTS.md")]
    files += sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))
    return files


def test_readme_is_a_front_door_of_at_most_250_lines():
    with open(README, encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (limit {README_MAX_LINES})"


def test_every_docs_page_is_linked_from_the_readme():
    with open(README, encoding="utf-8") as f:
        linked = {rel(os.path.normpath(os.path.join(ROOT, unquote(t.partition("#")[0]))))
                  for t in links(f.read()) if t and not is_external(t) and not t.startswith("#")}
    pages = {rel(os.path.join(DOCS, n)) for n in os.listdir(DOCS) if n.endswith(".md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_the_readme_shows_the_test_command_that_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        command = [line for line in f.read().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))][-1]
    with open(README, encoding="utf-8") as f:
        assert command.strip() in f.read(), f"README.md does not show .ci/run's command: {command}"


COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def user_docs() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


@pytest.mark.parametrize("path", user_docs(), ids=rel)
def test_user_docs_hold_no_test_log(path):
    # A claim links to the test or bench that shows it; commit hashes and "Tested: ..." paragraphs
    # belong in bench/RESULTS.md and the git history. Code blocks (real output) are not prose.
    with open(path, encoding="utf-8") as f:
        prose = [INLINE_CODE.sub("", line) for line in prose_lines(f.read())]
    assert [line for line in prose if "Tested:" in line or COMMIT_HASH.search(line)] == []


@pytest.mark.parametrize("path", checked_files(), ids=rel)
def test_no_broken_relative_link(path):
    bad = broken_links(path)
    assert not bad, f"{rel(path)}: broken links: {bad}"


def test_the_link_check_finds_broken_files_and_anchors(tmp_path, monkeypatch):
    # The checker itself: a missing file, a missing anchor; GitHub slugs.
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# The `kdgen audit` checks: why?\n## Setup\n## Setup\n"
        "[ok](#setup-1) [ok](b.md) [ok](#the-kdgen-audit-checks-why)\n"
        "[bad](missing.md) [bad](#nope) [bad](b.md#gone) `[code](missing2.md)`\n"
        "```\n[fenced](missing3.md)\n```\n[ext](https://example.com/x.md)\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n")
    bad = broken_links(str(tmp_path / "docs" / "a.md"))
    assert [b.split(" ")[0] for b in bad] == ["missing.md", "#nope", "b.md#gone"]
    assert github_slug("Logit KD: bytes per token and throughput (k = 0, 5, 20; JSONL vs parquet)") == \
        "logit-kd-bytes-per-token-and-throughput-k--0-5-20-jsonl-vs-parquet"


@pytest.mark.parametrize("kind", ["sequence_kd", "conversations", "score", "error"])
def test_outputs_doc_records_tables_are_the_schema(kind):
    from kdgen.records import schema

    with open(os.path.join(DOCS, "outputs.md"), encoding="utf-8") as f:
        page = f.read()
    assert schema.doc_table(kind) in page, (
        f"docs/outputs.md: the {kind} records table is not kdgen.records.schema's; paste the output of "
        f"`python -c 'from kdgen.records import schema; print(schema.doc_table(\"{kind}\"))'`")
