"""The README's first lines are the two fresh-machine commands, and CI runs the second; every
relative link in the README and docs/ leads to a file (and a heading) that exists."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "recipes/README.md", "launch/README.md",
             *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def readme_commands():
    lines = [l.strip() for l in (REPO / "README.md").read_text().splitlines()[1:6] if l.strip()]
    return lines[0], lines[1]


def test_readme_starts_with_main_and_test_commands():
    main, tests = readme_commands()
    assert main.startswith("bash launch/setup.sh && ") and "horovodrun -np 2" in main
    assert "hvd-easgd-train --config recipes/demo/digits.yaml" in main
    assert (REPO / "recipes/demo/digits.yaml").exists()
    assert tests.startswith("bash launch/setup.sh && ") and "pytest tests" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci = [l.strip() for l in (REPO / ".ci/run").read_text().splitlines()]
    assert tests in ci, f".ci/run must run the README's test command: {tests}"


def anchors(markdown: Path) -> set:
    """The anchors GitHub gives the headings of a markdown file (lower case, punctuation
    dropped, spaces to hyphens, repeats numbered)."""
    seen: dict = {}
    for line in markdown.read_text().splitlines():
        if not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def relative_links(document: str):
    text = re.sub(r"```.*?```", "", (REPO / document).read_text(), flags=re.S)
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        path, _, anchor = target.partition("#")
        file = Path(os.path.normpath((REPO / document).parent / path)) if path else REPO / document
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{document}: broken links:\n" + "\n".join(broken)
