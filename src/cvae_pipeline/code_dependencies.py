"""The project's code a stage's outputs depend on: the modules its script imports, and their digest.

DVC re-runs a stage when one of its declared code dependencies changes, and a checkpoint may only be resumed by the
code that wrote it; both rest on knowing exactly which files that code is. `imported_modules` reads the imports
(without running anything) and follows those of this package, wherever they are: at the top of a module or inside a
function. `stage_modules` leaves out the MLflow package (`tracking/`): it records what a stage did and decides none of
its outputs, so a change to how runs are logged, served or registered re-runs nothing.
"""

import ast
import hashlib
from pathlib import Path

PACKAGE = "cvae_pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent
RECORDS_ONLY = (f"{PACKAGE}.tracking",)  # subpackages no stage output depends on


def _file(module: str) -> Path | None:
    """The file of a module or package of this project (`cvae_pipeline.training` is training/__init__.py)."""
    parts = module.split(".")[1:]
    package = PACKAGE_DIR.joinpath(*parts) / "__init__.py"
    for candidate in (package, package.parent.with_suffix(".py")) if parts else (package,):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join([PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _imports(path: Path, package: str | None) -> set[str]:
    """This project's modules and packages that the file at `path` imports, anywhere in it, with the packages that
    hold them (importing a module runs every `__init__.py` above it first). `package`: the file's own package, for
    relative imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level and package:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base:
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == PACKAGE and _file(name) is not None:
            found.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return {name for name in found if _file(name) is not None}


def imported_modules(script: str | Path, leave_out: tuple[str, ...] = ()) -> list[Path]:
    """Every file of this package that `script` imports, directly or transitively, sorted; modules under a package
    of `leave_out` are neither listed nor followed."""
    def kept(module: str) -> bool:
        return not any(module == package or module.startswith(package + ".") for package in leave_out)

    seen: set[str] = set()
    pending = {name for name in _imports(Path(script), None) if kept(name)}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _file(module)
        own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        pending |= {name for name in _imports(path, own_package) if kept(name)} - seen
    return sorted(_file(module) for module in seen)


def stage_modules(script: str | Path) -> list[Path]:
    """The modules that decide what `script`'s stage writes: all it imports but the MLflow package."""
    return imported_modules(script, RECORDS_ONLY)


def code_digest(script: str | Path) -> str:
    """A digest of `script` and the project modules its outputs depend on: what changes when that code changes."""
    digest = hashlib.sha256()
    for path in [Path(script).resolve(), *stage_modules(script)]:
        name = _module_name(path) if path.is_relative_to(PACKAGE_DIR) else path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
