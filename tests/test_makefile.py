"""`make help` cannot drift from the Makefile: it lists every target of .PHONY with a description and the variables a
user sets for it, aligned; and docs/make.md gives every such variable with the Makefile's default."""

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = REPO / "Makefile"
DOCS = REPO / "docs" / "make.md"
HEADER = ("target", "what it does", "variables")  # the first row of make help's table


def make_help(makefile: Path, *goals: str) -> str:
    """What `make help` prints in the Makefile's folder, as a user runs it (not as a sub-make of `make test`, which
    would name the folder it enters). No environment is needed: help does not install one."""
    environment = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    made = subprocess.run(["make", "--no-print-directory", "-f", makefile.name, *goals], cwd=makefile.parent,
                          capture_output=True, text=True, env=environment, timeout=60)
    assert made.returncode == 0, made.stderr
    return made.stdout


def phony_targets(makefile: Path) -> list[str]:
    return [name for line in re.findall(r"^\.PHONY:(.*)$", makefile.read_text(), flags=re.M) for name in line.split()]


def user_variables(makefile: Path) -> dict[str, str | None]:
    """The variables a user sets (`NAME ?= default`, or computed where the command line leaves them undefined): their
    default as the Makefile writes it, None where make computes it."""
    text = makefile.read_text()
    computed = {name: None for name in re.findall(r"^ifeq \(\$\(origin (\w+)\),undefined\)$", text, flags=re.M)}
    return computed | {name: value.strip() for name, value in re.findall(r"^(\w+) \?=(.*)$", text, flags=re.M)}


def assigned_variables(makefile: Path) -> set[str]:
    assigned = re.findall(r"^(?:export )?(\w+) *[:?]?=", makefile.read_text(), flags=re.M)
    return set(assigned) | set(user_variables(makefile))


def names(name: str, variable: str) -> bool:
    """Whether a name in make help stands for the variable: the same name, or a PREFIX_* it starts with."""
    return variable == name or (name.endswith("*") and variable.startswith(name[:-1]))


def help_rows(output: str) -> dict[str, tuple[str, list[str]]]:
    """make help's table: each target's description and the names of its variables, read by the columns of its
    header row; a row whose columns do not line up with the header's raises."""
    lines = output.splitlines()
    (header,) = [line for line in lines if line.split() == " ".join(HEADER).split()]
    start, description, variables = (header.index(title) for title in HEADER)
    rows = {}
    for line in lines[lines.index(header) + 1:]:
        assert line[:start] == " " * start and line[start] != " ", f"not in the target column: {line!r}"
        assert line[description - 2:description] == "  " and line[description] != " ", f"not aligned: {line!r}"
        assert len(line) <= variables or (line[variables - 2:variables] == "  " and line[variables] != " "), (
            f"variables not aligned: {line!r}")
        rows[line[start:description].strip()] = (line[description:variables].strip(), line[variables:].split())
    return rows


def undescribed_targets(makefile: Path) -> list[str]:
    """The targets of .PHONY that make help lists without a description, or not at all."""
    rows = help_rows(make_help(makefile, "help"))
    return [target for target in phony_targets(makefile) if not rows.get(target, ("", []))[0]]


def unnamed_variables(makefile: Path) -> list[str]:
    """The variables a user sets that no row of make help names, directly or as PREFIX_*."""
    named = [name for _, variables in help_rows(make_help(makefile, "help")).values() for name in variables]
    return [variable for variable in user_variables(makefile) if not any(names(name, variable) for name in named)]


def test_make_help_describes_every_phony_target_on_one_aligned_line():
    output = make_help(MAKEFILE, "help")
    rows = help_rows(output)
    assert len(phony_targets(MAKEFILE)) >= 16 and "help" in phony_targets(MAKEFILE)
    assert undescribed_targets(MAKEFILE) == []
    assert sorted(rows) == sorted(phony_targets(MAKEFILE))  # and no row for a target that is not a user's
    assert max(map(len, output.splitlines())) <= 120
    assert make_help(MAKEFILE) == output  # the default target


def test_make_help_names_every_variable_a_user_sets_and_only_the_makefiles():
    variables = user_variables(MAKEFILE)
    assert {"PYTHON", "EXTRAS", "TEST_WORKERS", "S", "J", "UI_WORKERS", "SERVER_AUTH_CACHE_S"} <= set(variables)
    assert unnamed_variables(MAKEFILE) == []
    named = {name for _, variables in help_rows(make_help(MAKEFILE, "help")).values() for name in variables}
    assigned = assigned_variables(MAKEFILE)
    assert [name for name in named if not any(names(name, variable) for variable in assigned)] == []


def test_docs_make_md_gives_every_variable_with_the_makefiles_default():
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", DOCS.read_text(), flags=re.M)
    documented = {name: default.strip() for name, default in rows}
    assert {name for name, _ in rows} <= assigned_variables(MAKEFILE)
    for name, default in user_variables(MAKEFILE).items():
        assert name in documented, f"docs/make.md has no row for {name}"
        if default == "":
            assert documented[name].startswith("empty"), (name, documented[name])
        elif default is not None and "$" not in default:
            assert documented[name] == f"`{default}`", (name, documented[name], default)


def test_a_target_or_variable_left_out_of_make_help_is_found(tmp_path):
    makefile = tmp_path / "Makefile"
    text = MAKEFILE.read_text()
    (sample,) = re.findall(r"^sample:.*$", text, flags=re.M)
    makefile.write_text(text.replace(sample, sample.split(" ## ")[0]))  # sample's ## comment gone
    assert undescribed_targets(makefile) == ["sample"]
    makefile.write_text(text.replace(sample, sample.replace(" SEED ", " ")))  # SEED left out of its variables
    assert unnamed_variables(makefile) == ["SEED"]
    shutil.copy(MAKEFILE, makefile)
    assert undescribed_targets(makefile) == [] and unnamed_variables(makefile) == []
