"""Every file the documentation cites exists in the repository.

Checked in README.md, docs/**/*.md and experiments/README.md: every relative link (and
image), and every repository path written in backquotes or in a fenced code block that starts
with one of PREFIXES (globs such as ``so-*.json`` must match at least one file).  No link may
leave the repository (the development machine's ``../shared`` folder is not shipped).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

PREFIXES = ("benchmarks/", "src/", "docs/", "experiments/", "configs/", "tests/", ".ci/")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(map(re.escape, PREFIXES)) + r")[\w./*{},@+-]*)")


def pages() -> list[Path]:
    found = [REPO / "README.md", REPO / "experiments" / "README.md"]
    found += sorted((REPO / "docs").rglob("*.md"))
    return [p for p in found if p.is_file()]


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    out = []
    for alt in m.group(1).split(","):
        out += _expand_braces(path[: m.start()] + alt + path[m.end() :])
    return out


def _exists(rel: str) -> bool:
    rel = rel.rstrip(".,;:")
    for candidate in _expand_braces(rel):
        if any(ch in candidate for ch in "*?["):
            if not any(REPO.glob(candidate)):
                return False
        elif not (REPO / candidate).exists():
            return False
    return True


def cited_paths(text: str) -> set[str]:
    spans = [m.group(1) for m in SPAN.finditer(FENCE.sub("", text))]
    spans += [m.group(0) for m in FENCE.finditer(text)]
    return {m.group(1) for span in spans for m in PATH.finditer(span)}


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_exist(page: Path):
    text = page.read_text()
    bad = []
    for m in LINK.finditer(FENCE.sub("", text)):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        if "shared" in Path(path).parts or not resolved.is_relative_to(REPO):
            bad.append(f"{target} (leaves the repository)")
        elif not resolved.exists():
            bad.append(target)
    assert not bad, f"{page.relative_to(REPO)} links to missing files: {bad}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_cited_repo_paths_exist(page: Path):
    missing = sorted(p for p in cited_paths(page.read_text()) if not _exists(p))
    assert not missing, f"{page.relative_to(REPO)} cites files not in the repository: {missing}"


def test_no_page_links_to_shared():
    for page in pages():
        assert "../shared" not in page.read_text(), f"{page.relative_to(REPO)} mentions ../shared"


def test_checker_finds_paths():
    text = "see `python benchmarks/quadratic.py [--train]` and\n```bash\nl2o x --config configs/q.toml\n```"
    assert cited_paths(text) == {"benchmarks/quadratic.py", "configs/q.toml"}
    assert _exists("experiments/results/fewshot_explore/so-*.json")
    assert not _exists("benchmarks/no-such-file.py")
