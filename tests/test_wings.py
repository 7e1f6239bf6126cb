"""The package's wings follow the pipeline, and no import runs from a lower wing to a higher one."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_python

PACKAGE = ROOT / "saekit"
WINGS = ["base", "activations", "training", "evaluation", "concepts", "show"]
ENTRY_POINTS = {"__init__", "notebooks"}  # saekit/notebooks.py runs the stages: it may import any wing


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, root_package: Path) -> list[tuple[int, str]]:
    """Every saekit module `path` imports, anywhere in the file (lazy imports included), made absolute."""
    name = _module_name(path, root_package)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if target.count(".") < 2 else [target]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name == "saekit" or name.startswith("saekit.")]


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def upward_imports(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        importer = _module_name(path, package)
        wing = _wing(importer)
        if wing is None:
            if path.parent == package and path.stem in ENTRY_POINTS:
                continue
            problems.append(f"{importer} is in no wing: put it in one of saekit/{{{','.join(WINGS)}}}/")
            continue
        for line, target in _imported_modules(path, package):
            target_wing = _wing(target)
            if target_wing is None:
                problems.append(f"{importer}:{line} imports {target}, which is in no wing")
            elif WINGS.index(target_wing) > WINGS.index(wing):
                problems.append(f"{importer}:{line} imports {target}: {wing} may not import from {target_wing}")
    return problems


def test_no_import_runs_up_between_wings():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    # the rule must be able to fail: a base module importing from training, lazily inside a function
    fake = tmp_path / "saekit"
    for wing in ("base", "training"):
        (fake / wing).mkdir(parents=True)
        (fake / wing / "__init__.py").write_text('"""A wing."""\n')
    (fake / "base" / "errors.py").write_text("def f():\n    from ..training.sae import TopKSAE\n")
    (fake / "training" / "sae.py").write_text("from ..base import errors\n")
    assert upward_imports(fake) == ["saekit.base.errors:2 imports saekit.training.sae: base may not import from training"]


def test_every_wing_says_what_it_does():
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
        assert doc and "\n" not in doc.strip(), f"saekit/{wing}/__init__.py needs a one-line docstring"
    for path in PACKAGE.rglob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} needs an opening docstring"


def test_the_package_imports_from_another_folder(tmp_path):
    # installed (pip install -e ., which `make setup` runs), saekit is importable outside the project folder
    proc = subprocess.run([sys.executable, "-c", "import saekit.notebooks, saekit.base.settings as s; print(s.PROJECT_ROOT)"],
                          cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if proc.returncode and "No module named 'saekit'" in proc.stderr:
        pytest.fail("saekit is not installed in this environment: run `make setup` (pip install -e .)")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT


def test_a_stage_notebook_runs_from_another_folder(tmp_path):
    # the notebook is found in the project and executed; with an empty store it stops, as it should, at
    # the missing SAE: the stage's own one-line error, not "no notebook"
    proc = run_python(["-m", "saekit.notebooks", "03_analyze_training.ipynb", f"--STORE_DIR={tmp_path / 'store'}"],
                      cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "no notebook" not in lines[-1], lines[-3:]
    assert "no trained SAE" in lines[-1], lines[-1]
