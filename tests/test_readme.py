"""The documentation's claims that can go stale by themselves: every test the guarantees cite exists, and every
relative link in README.md and docs/ points to a file that exists."""

import ast
import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUARANTEES = REPO / "docs" / "guarantees.md"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def table_rows(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def guarantees_tests(text: str) -> list[tuple[str, str]]:
    """(file, test name or pattern) for each test a table cites as `test_file.py::test_name`; `::name` continues the
    previous file."""
    cited, current = [], None
    for file, name in re.findall(r"`(test_\w+\.py)?::(test_[\w*]+)`", table_rows(text)):
        current = file or current
        cited.append((current, name))
    return cited


def guarantees_files(text: str) -> list[str]:
    """The test files a table cites whole, as `test_file.py`."""
    return re.findall(r"`(test_\w+\.py)`", table_rows(text))


def cited_guarantees() -> str:
    """docs/guarantees.md, and the README's Guarantees section if it still has one."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0] if "## Guarantees" in readme else ""
    return GUARANTEES.read_text() + "\n" + section


def find_test_files() -> dict[str, list[Path]]:
    """Every test file under tests/, at any depth, by its file name."""
    found: dict[str, list[Path]] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        found.setdefault(path.name, []).append(path)
    return found


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def missing_tests(text: str) -> list[str]:
    files = find_test_files()
    return [f"{file}::{name}" for file, name in guarantees_tests(text)
            if not fnmatch.filter(set().union(*map(defined_tests, files.get(file, []))), name)] + [
        file for file in guarantees_files(text) if file not in files]


def test_every_test_the_guarantees_cite_exists():
    text = cited_guarantees()
    assert len(guarantees_tests(text)) > 40 and guarantees_files(text)
    assert missing_tests(text) == []


def test_a_renamed_test_is_found():
    text = cited_guarantees()
    (file,) = {file for file, name in guarantees_tests(text) if name == "test_a_missing_code_dependency_is_found"}
    renamed = text.replace("::test_a_missing_code_dependency_is_found", "::test_a_missing_code_dependency_is_spotted")
    assert missing_tests(renamed) == [f"{file}::test_a_missing_code_dependency_is_spotted"]
    whole = guarantees_files(text)[0]  # a file cited whole, renamed
    assert set(missing_tests(text.replace(f"`{whole}`", "`test_gone.py`"))) == {"test_gone.py"}


def relative_links(markdown: str) -> list[str]:
    """The targets of the [text](target) links and ![alt](target) images outside code, other than URLs."""
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S))
    return [target for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def headings(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", prose, flags=re.M)}


def broken_links(document: Path) -> list[str]:
    """The relative links of a page whose file does not exist, or whose #anchor names no heading of a page."""
    broken = []
    for target in relative_links(document.read_text()):
        path, _, anchor = target.partition("#")
        linked = document.parent / path
        page = linked.suffix == ".md" and linked.is_file()
        if not linked.exists() or (anchor and page and anchor not in headings(linked.read_text())):
            broken.append(target)
    return broken


def test_every_relative_link_points_to_a_file_that_exists():
    """And every #anchor of a link to a page to one of its headings."""
    assert GUARANTEES in DOCUMENTS and len(DOCUMENTS) > 2
    assert sum(len(relative_links(document.read_text())) for document in DOCUMENTS) > 20
    assert {document.name: broken_links(document) for document in DOCUMENTS} == {
        document.name: [] for document in DOCUMENTS}


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top: the `page`\n[there](there.md) [here](page.md#top-the-page) ![figure](figures/gone.png)\n"
                    "[web](https://example.org) [nowhere](page.md#bottom) `[code](nowhere.md)`\n"
                    "```\n[block](nowhere.md)\n```\n")
    assert broken_links(page) == ["there.md", "figures/gone.png", "page.md#bottom"]
