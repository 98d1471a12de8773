"""The package's shape: a core every stage shares, a subpackage per stage, no stage importing another."""

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "nerveseg"
STAGES = ("cleaning", "training", "inference", "export")
SCRIPTS = {"data_cleaning.py": "cleaning", "train.py": "training", "predict.py": "inference", "export.py": "export"}
MAX_MODULE_LINES = 450


def stage_of(module: str) -> str | None:
    """The stage subpackage of a dotted nerveseg module name, or None for the core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def imported_modules(path: Path) -> set[str]:
    """Every nerveseg module a file imports (from nerveseg.x import y counts nerveseg.x and nerveseg.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "nerveseg" or name.startswith("nerveseg.")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def crossings(path: Path, own_stage: str | None) -> list[str]:
    """The imports of `path` that reach a stage other than its own (the core reaches none)."""
    return sorted(name for name in imported_modules(path)
                  if (stage := stage_of(name)) is not None and stage != own_stage)


def test_each_stage_has_its_folder() -> None:
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    assert not list(PACKAGE.glob("*/*/")) or all(p.name == "__pycache__" for p in PACKAGE.glob("*/*/")), \
        "nothing deeper than one stage folder"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_stage(path: Path) -> None:
    assert crossings(path, stage_of(module_name(path))) == []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_imports_the_core_and_its_own_stage(script: str) -> None:
    assert crossings(ROOT / script, SCRIPTS[script]) == []


def test_the_rule_catches_a_crossing(tmp_path: Path) -> None:
    """The check above can fail: a module that imports another stage is found, and so is a core module that
    imports any stage."""
    bad = tmp_path / "bad.py"
    bad.write_text("from nerveseg.training.evaluation import evaluate\nfrom nerveseg import inputs\n")
    reached = ["nerveseg.training.evaluation", "nerveseg.training.evaluation.evaluate"]
    assert crossings(bad, "inference") == reached
    assert crossings(bad, None) == reached
    assert crossings(bad, "training") == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_readable_in_size(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it along what its parts do"
