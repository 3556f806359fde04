"""The package's shape, checked: layers that point one way (import-linter, lazy imports included),
one module per outside system, short functions, formatting left to the formatter."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "image_classifier"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES, MAX_FILE_LINES = 200, 350


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PACKAGE.rglob("*.py"))]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_layers_contract_holds():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    "module, imported, message",
    [
        ("data/images.py", "training.train", "data is not allowed to import"),  # upward
        ("audit/labels.py", "training.features", "audit is not allowed to import"),  # forbidden
        ("serving/app.py", "export.onnx", "serving is not allowed to import"),  # forbidden
        ("inference/infer.py", "runs", "inference is not allowed to import"),  # forbidden
        ("inference/meta.py", "tracking", "inference is not allowed to import"),  # forbidden
    ],
)
def test_contracts_see_a_lazy_import(tmp_path, module, imported, message):
    """The contracts would catch an import inside a function, the kind that hides best."""
    shutil.copytree(PACKAGE, tmp_path / "image_classifier")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "image_classifier" / module, "a") as f:
        f.write(f"\n\ndef _reach():\n    import image_classifier.{imported}\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert f"image_classifier.{message} image_classifier.{imported.split('.')[0]}" in proc.stdout


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "outside, allowed",
    [
        ("mlflow", {"tracking.py", "export/mlflow_model.py"}),  # the pyfunc class subclasses it
        ("tensorrt", {"inference/tensorrt.py"}),
    ],
)
def test_one_module_talks_to_each_outside_system(outside, allowed):
    users = {
        str(p.relative_to(PACKAGE))
        for p, tree in _modules()
        if any(m == outside or m.startswith(outside + ".") for m in _imports(tree))
    }
    assert users <= allowed, f"{outside} imported in {sorted(users - allowed)}"


def test_only_models_checkpoint_reads_a_ckpt():
    readers = {
        str(p.relative_to(PACKAGE))
        for p, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "load"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    }
    # pretrained.py reads ImageNet weight files (.pth), never a training checkpoint
    assert readers == {"models/checkpoint.py", "models/pretrained.py"}


def test_no_function_is_longer_than_sixty_lines():
    long = [
        f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for p, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these into named steps: " + ", ".join(long)


def test_no_class_or_file_is_longer_than_the_limits():
    long = [
        f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for p, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    long += [
        f"{p.relative_to(PACKAGE)} ({n})"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert not long, "split these by responsibility: " + ", ".join(long)


def test_formatting_is_left_to_the_formatter():
    skips = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*PACKAGE.rglob("*.py"), ROOT / "commands.py"]
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "fmt: " + "skip" in line or "fmt: " + "off" in line
    ]
    assert not skips, skips


def test_no_import_circles():
    """No module reaches itself through its imports (lazy imports inside functions included)."""
    import grimp

    graph = grimp.build_graph("image_classifier", cache_dir=None)
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if chain := graph.find_shortest_chain(importer=imported, imported=module):
                circles.append(" -> ".join([module, *chain]))
    assert circles == []
