"""The manual holds together: every relative link in README.md, CONTRIBUTING.md and docs/ reaches a
file (and, with an anchor into a Markdown page, one of its headings), and every `docs/...` path named in
conf/, mlbreg/, scripts/ or tests/ exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens; explicit ids too."""
    text = page.read_text()
    out = set(re.findall(r'id="([^"]+)"', text))
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Each relative link of the page reaches a file or folder, and its #anchor a heading."""
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_docs_paths_named_in_code_exist():
    """`docs/...` paths in the code, configs, scripts and tests name files that exist."""
    missing = set()
    for folder in ("mlbreg", "conf", "scripts", "tests"):
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in (".py", ".yaml", ".sh") and f.is_file():
                for path in re.findall(r"\bdocs/[\w./-]*\w", f.read_text(errors="replace")):
                    if "<" not in path and not (ROOT / path).exists():
                        missing.add(f"{f.relative_to(ROOT)}: {path}")
    assert not missing, sorted(missing)


def test_no_tracker_numbers_outside_the_changelog():
    """No "issue N" of a tracker a reader of the repository does not have, outside CHANGELOG.md."""
    found = []
    for f in [
        *PAGES,
        *ROOT.glob("mlbreg/**/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("conf/**/*.yaml"),
        *ROOT.glob("scripts/*"),
    ]:
        if f.name != "CHANGELOG.md" and f.is_file():
            found += [f"{f.relative_to(ROOT)}: {m}" for m in re.findall(r"\bissue #?\d+", f.read_text(), re.I)]
    assert not found, found
