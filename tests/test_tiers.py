"""The two tiers of the suite: every test that starts one of the project's scripts in a subprocess (directly, or
through a helper or a fixture of its file or of conftest.py) is marked slow, so that make test-fast stays fast."""

import ast
from pathlib import Path

from tests.helpers import ROOT

STARTS_A_SCRIPT = {"run_script", "Popen", "torchrun", "start_training"}  # the ways the tests start a script


def is_fixture(node: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)


def is_marked_slow(node: ast.FunctionDef, module: ast.Module) -> bool:
    marks = [ast.unparse(decorator) for decorator in node.decorator_list]
    marks += [ast.unparse(n.value) for n in module.body if isinstance(n, ast.Assign)
              and any(getattr(target, "id", "") == "pytestmark" for target in n.targets)]
    return any("mark.slow" in mark for mark in marks)


def classify_tests(path: Path, shared: dict[str, ast.FunctionDef]) -> dict[str, bool]:
    """Each test of a file: whether it starts a script, and whether it is marked slow."""
    module = ast.parse(path.read_text())
    functions = {**shared, **{n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}}
    starts: dict[str, bool] = {}

    def starts_a_script(name: str) -> bool:
        if name not in starts:
            starts[name] = False  # a recursion ends here
            node = functions[name]
            used = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(node)}
            used |= {argument.arg for argument in node.args.args}  # the fixtures it asks for
            starts[name] = bool(used & STARTS_A_SCRIPT) or any(starts_a_script(u) for u in used & functions.keys())
        return starts[name]

    return {name: (starts_a_script(name), is_marked_slow(node, module)) for name, node in functions.items()
            if name.startswith("test_") and not is_fixture(node)}


def test_every_test_that_starts_a_script_is_marked_slow():
    conftest = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    shared = {n.name: n for n in conftest.body if isinstance(n, ast.FunctionDef) and is_fixture(n)}
    unmarked, fast = [], 0
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name, (starts, slow) in classify_tests(path, shared).items():
            unmarked += [f"{path.name}::{name}"] if starts and not slow else []
            fast += not slow
    assert not unmarked, f"these start a script in a subprocess: mark them @pytest.mark.slow: {unmarked}"
    assert fast >= 60  # the fast tier holds the unit and table tests
