"""The code a stage runs: every project module a stage imports, directly or not, is one of its DVC dependencies."""

import re
from pathlib import Path

import yaml

from conftest import REPO
from cvae_pipeline import sources


def missing_code_dependencies(pipeline: dict, root: Path) -> dict[str, set[str]]:
    """Per stage: the modules its script imports (transitively) that its `deps` do not list, and stale listings."""
    problems = {}
    for name, stage in pipeline["stages"].items():
        script = re.search(r"python (stages/\w+\.py)", stage["cmd"]).group(1)
        imported = {f"src/{sources.PACKAGE}/{path.name}" for path in sources.imported_modules(root / script)}
        listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
        wrong = (imported | {script}) ^ listed
        if wrong:
            problems[name] = wrong
    return problems


def test_every_stage_depends_on_every_project_module_it_imports():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert missing_code_dependencies(pipeline, REPO) == {}


def test_a_missing_code_dependency_is_found():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"]["evaluate"]["deps"].remove("src/cvae_pipeline/mlflow_store.py")  # imported via tracking
    assert missing_code_dependencies(pipeline, REPO) == {"evaluate": {"src/cvae_pipeline/mlflow_store.py"}}


def test_imports_are_followed_through_modules_and_inside_functions(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("def main():\n    from cvae_pipeline.training import train_and_track\n")
    names = {path.name for path in sources.imported_modules(script)}
    assert {"training.py", "trainer.py", "checkpoints.py", "tracking.py", "mlflow_store.py", "errors.py"} <= names
    assert "figures.py" not in names and "evaluation.py" not in names  # only what it imports


def test_the_code_digest_changes_with_any_imported_module_and_only_with_them(tmp_path, monkeypatch):
    package = tmp_path / "cvae_pipeline"
    package.mkdir()
    for name in ("a.py", "b.py", "unrelated.py"):
        (package / name).write_text("")
    (package / "a.py").write_text("from cvae_pipeline import b\n")
    script = tmp_path / "stage.py"
    script.write_text("import cvae_pipeline.a\n")
    monkeypatch.setattr(sources, "PACKAGE_DIR", package)
    first = sources.code_digest(script)
    (package / "unrelated.py").write_text("x = 1\n")
    assert sources.code_digest(script) == first
    (package / "b.py").write_text("x = 1\n")  # imported through a.py
    second = sources.code_digest(script)
    assert second != first
    (package / "__init__.py").write_text('"""The package, which every import of a module of it runs first."""\n')
    assert sources.code_digest(script) != second
