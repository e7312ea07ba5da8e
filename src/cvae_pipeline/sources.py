"""The project's code a stage runs: the modules a script imports, directly or through other modules, and their digest.

DVC re-runs a stage when one of its declared code dependencies changes, and a checkpoint may only be resumed by the
code that wrote it; both rest on knowing exactly which files that code is. `imported_modules` reads the imports
(without running anything) and follows those of this package, wherever they are: at the top of a module or inside a
function.
"""

import ast
import hashlib
from pathlib import Path

PACKAGE = "cvae_pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """The names of this package's modules that `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # `from . import x` / `from .x import y` inside the package (which has no subpackages).
            module = ".".join(filter(None, [PACKAGE, node.module])) if node.level else node.module
            if module:
                names.add(module)
                # `from cvae_pipeline import tracking` imports a module by its attribute name.
                names.update(f"{module}.{alias.name}" for alias in node.names)
    found = {name for name in names
             if (name == PACKAGE or name.startswith(PACKAGE + ".")) and (PACKAGE_DIR / _relative(name)).is_file()}
    if found and (PACKAGE_DIR / _relative(PACKAGE)).is_file():
        found.add(PACKAGE)  # importing any module of the package runs the package's __init__.py first
    return found


def _relative(module: str) -> str:
    if module == PACKAGE:
        return "__init__.py"
    return module.removeprefix(PACKAGE + ".").replace(".", "/") + ".py"


def imported_modules(script: str | Path) -> list[Path]:
    """Every module file of this package that `script` imports, directly or transitively, sorted."""
    seen: set[str] = set()
    pending = _imports(Path(script))
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending |= _imports(PACKAGE_DIR / _relative(module)) - seen
    return sorted(PACKAGE_DIR / _relative(module) for module in seen)


def code_digest(script: str | Path) -> str:
    """A digest of `script` and every project module it imports: what changes when the code it runs changes."""
    digest = hashlib.sha256()
    for path in [Path(script).resolve(), *imported_modules(script)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
