"""The README's claims that can go stale by themselves: every test its Guarantees table names exists."""

import ast
import fnmatch
import re

from conftest import REPO


def guarantees_tests(readme: str) -> list[tuple[str, str]]:
    """(file, test name or pattern) for each test the Guarantees table cites; `::name` continues the previous file."""
    table = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited, current = [], None
    for file, name in re.findall(r"`(test_\w+\.py)?::(test_[\w*]+)`", table):
        current = file or current
        cited.append((current, name))
    return cited


def defined_tests(path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
            and node.name.startswith("test_")}


def missing_tests(readme: str) -> list[str]:
    return [f"{file}::{name}" for file, name in guarantees_tests(readme)
            if not (REPO / "tests" / file).is_file()
            or not fnmatch.filter(defined_tests(REPO / "tests" / file), name)]


def test_every_test_the_guarantees_table_names_exists():
    readme = (REPO / "README.md").read_text()
    assert len(guarantees_tests(readme)) > 40
    assert missing_tests(readme) == []


def test_a_renamed_test_is_found():
    readme = (REPO / "README.md").read_text().replace("::test_a_missing_code_dependency_is_found",
                                                       "::test_a_missing_code_dependency_is_spotted")
    assert missing_tests(readme) == ["test_sources.py::test_a_missing_code_dependency_is_spotted"]
