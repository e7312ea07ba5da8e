"""The code a stage's outputs depend on: every project module a stage imports, but the MLflow package, is one of its
DVC dependencies, and nothing else is; the checkpoint's code digest covers the same files."""

import re
from pathlib import Path

import yaml

from cvae_pipeline import code_dependencies
from helpers import REPO


def listed_problems(pipeline: dict, root: Path) -> dict[str, set[str]]:
    """Per stage: the modules its outputs depend on that its `deps` do not list, and listings that are not such."""
    problems = {}
    for name, stage in pipeline["stages"].items():
        script = re.search(r"python (stages/\w+\.py)", stage["cmd"]).group(1)
        imported = {path.relative_to(root).as_posix() for path in code_dependencies.stage_modules(root / script)}
        listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
        wrong = (imported | {script}) ^ listed
        if wrong:
            problems[name] = wrong
    return problems


def test_every_stage_depends_on_every_project_module_it_imports():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert listed_problems(pipeline, REPO) == {}


def test_a_missing_code_dependency_is_found():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"]["evaluate"]["deps"].remove("src/cvae_pipeline/model/losses.py")  # imported via model/
    assert listed_problems(pipeline, REPO) == {"evaluate": {"src/cvae_pipeline/model/losses.py"}}


def test_train_depends_on_what_decides_the_model_and_not_on_evaluation_serving_or_mlflow():
    modules = {path.relative_to(REPO / "src/cvae_pipeline").as_posix()
               for path in code_dependencies.stage_modules(REPO / "stages/train.py")}
    assert {"model/network.py", "model/losses.py", "model/optimization.py", "training/loop.py",
            "training/batches.py", "data.py", "config.py"} <= modules
    assert not [module for module in modules if module.startswith(("evaluation/", "tracking/", "commands/"))]
    assert "model/loading.py" not in modules  # how evaluate and serving load a trained model
    # The stage itself imports MLflow's package: only the dependency list leaves it out.
    everything = {path.relative_to(REPO / "src/cvae_pipeline").as_posix()
                  for path in code_dependencies.imported_modules(REPO / "stages/train.py")}
    assert {"tracking/session.py", "tracking/logged_model.py"} <= everything


def test_imports_are_followed_through_modules_packages_and_inside_functions(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("def main():\n    from cvae_pipeline.training.stage import train_and_track\n")
    names = {path.relative_to(code_dependencies.PACKAGE_DIR).as_posix()
             for path in code_dependencies.imported_modules(script)}
    assert {"__init__.py", "training/__init__.py", "training/stage.py", "training/loop.py",
            "training/checkpoints.py", "tracking/__init__.py", "tracking/session.py", "tracking/store.py",
            "tracking/logged_model.py", "errors.py"} <= names
    assert "evaluation/figures.py" not in names and "evaluation/stage.py" not in names  # only what it imports


def write_package(root: Path) -> Path:
    """A package of its own: cvae_pipeline/{a.py, b.py, sub/c.py, unrelated.py, tracking/log.py}."""
    package = root / "cvae_pipeline"
    (package / "sub").mkdir(parents=True)
    (package / "tracking").mkdir()
    for name in ("__init__.py", "b.py", "unrelated.py", "sub/__init__.py", "sub/c.py", "tracking/__init__.py",
                 "tracking/log.py"):
        (package / name).write_text("")
    (package / "a.py").write_text("from cvae_pipeline import b\nfrom .sub import c\n"
                                  "def log():\n    from cvae_pipeline.tracking import log\n")
    return package


def test_the_code_digest_changes_with_any_module_the_outputs_depend_on_and_only_with_them(tmp_path, monkeypatch):
    package = write_package(tmp_path)
    script = tmp_path / "stage.py"
    script.write_text("import cvae_pipeline.a\n")
    monkeypatch.setattr(code_dependencies, "PACKAGE_DIR", package)
    digests = [code_dependencies.code_digest(script)]
    for changed in ("unrelated.py", "tracking/log.py", "b.py", "sub/c.py", "sub/__init__.py", "__init__.py"):
        (package / changed).write_text("x = 1\n")
        digests.append(code_dependencies.code_digest(script))
    # Neither an unrelated module nor the MLflow package changes it; a module imported through another (absolutely
    # or relatively) does, and so do the packages that hold it.
    assert digests[0] == digests[1] == digests[2]
    assert len(set(digests[2:])) == 5
