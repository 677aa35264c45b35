"""dvc.yaml lists, for each stage, exactly the code the stage runs.

The code a stage runs is ``stages/<name>.py`` and every module of the ``stages`` package it imports,
transitively (imports inside functions count: they run too). The test reads the imports with ``ast``
(nothing is imported, so it is fast and needs no torch) and compares them with the stage's deps under
``stages/`` in dvc.yaml (a folder stands for every file in it, as DVC hashes it). A module missing
from dvc.yaml means an edit to it would not rerun the stage; a listed module the stage does not
import means an edit to it reruns the stage for nothing (issue 18: a model-card edit re-ran all eight).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The file of module ``stages.x.y`` (a package's ``__init__.py``), or None if there is none."""
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return None


def direct_imports(name: str) -> set[str]:
    """Modules of the ``stages`` package that module ``name`` imports, with their parent packages
    (importing ``stages.core.io`` runs ``stages/__init__.py`` and ``stages/core/__init__.py`` too)."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            named.add(base)
            named |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for mod in named:
        if mod.split(".")[0] == "stages" and module_file(mod):
            parts = mod.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found


def import_closure(name: str) -> set[Path]:
    """Files of every ``stages`` module that running module ``name`` may import."""
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += direct_imports(mod) - seen
    return {module_file(m).relative_to(ROOT) for m in seen}


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return bool(body)


def listed_code(stage: dict) -> set[Path]:
    """Files under ``stages/`` that a dvc.yaml stage lists as deps (folders expanded, bytecode skipped
    as .dvcignore does)."""
    files = set()
    for dep in stage.get("deps", []):
        path = ROOT / dep
        if Path(dep).parts[0] != "stages":
            continue
        assert path.exists(), f"dvc.yaml dep {dep} does not exist"
        if path.is_dir():
            files |= {f.relative_to(ROOT) for f in path.rglob("*")
                      if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"}
        else:
            files.add(Path(dep))
    return files


def data_files(code: set[Path]) -> set[Path]:
    """Files a package reads at run time: everything but code and docs in the non-package
    subfolders of each package the code comes from (e.g. ``stages/metrics/templates/``)."""
    found = set()
    for package in {f.parent for f in code}:
        for sub in (ROOT / package).iterdir():
            if sub.is_dir() and sub.name != "__pycache__" and not (sub / "__init__.py").exists():
                found |= {f.relative_to(ROOT) for f in sub.rglob("*")
                          if f.is_file() and f.suffix not in (".py", ".pyc", ".md") and "__pycache__" not in f.parts}
    return found


def stage_module(stage: dict) -> str:
    cmd = stage["cmd"].split()
    assert cmd[:3] == ["python", "-m", cmd[2]] and cmd[2].startswith("stages."), stage["cmd"]
    return cmd[2]


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_stage_deps_are_its_imports(name):
    stage = DVC_STAGES[name]
    imported = import_closure(stage_module(stage))
    listed = listed_code(stage)
    listed_py = {f for f in listed if f.suffix == ".py"}
    # An __init__.py without code (empty, or a docstring) runs nothing: listing it is harmless,
    # omitting it too.
    needed = {f for f in imported if has_code(ROOT / f)}
    missing = sorted(map(str, (needed - listed_py) | (data_files(imported) - listed)))
    extra = sorted(map(str, listed_py - imported))
    assert not missing, f"{name}: imports {missing} but dvc.yaml does not list them"
    assert not extra, f"{name}: dvc.yaml lists {extra} but the stage never imports them"


def test_non_stage_code_reruns_nothing():
    """Editing publish, the model card, the app, benchmarks or docs leaves `dvc status` clean."""
    outside = [Path("stages/publish.py"), Path("stages/modelcard.py"), Path("stages/sweep.py"),
               Path("stages/abtest.py")]
    for name, stage in DVC_STAGES.items():
        listed = listed_code(stage)
        assert not listed & set(outside), f"{name} depends on {sorted(map(str, listed & set(outside)))}"
        for dep in stage.get("deps", []):
            assert Path(dep).parts[0] not in ("app", "benchmarks", "docs", "notebooks", "tests"), (name, dep)
    for module in ("stages.publish", "stages.modelcard"):
        users = [n for n, s in DVC_STAGES.items() if module_file(module).relative_to(ROOT)
                 in import_closure(stage_module(s))]
        assert not users, f"{module} is imported by the DVC stages {users}"


def test_closure_follows_imports_inside_functions():
    """The walker sees lazy imports (a stage that imports a module only inside main() still runs it)."""
    assert Path("stages/models/flux.py") in import_closure("stages.encode")
    assert Path("stages/core/io.py") in import_closure("stages.core.params")


def test_stages_readme_lists_every_module():
    """stages/README.md is the map of the package: every module is on it."""
    readme = (ROOT / "stages" / "README.md").read_text()
    modules = sorted(f.relative_to(ROOT / "stages").as_posix() for f in (ROOT / "stages").rglob("*.py")
                     if f.name != "__init__.py" and "__pycache__" not in f.parts)
    missing = [m for m in modules if f"`{m}`" not in readme]
    assert not missing, f"stages/README.md does not list {missing}"
