"""The README documents every option of every script, with its current default."""

import ast

import pytest

from nerveseg.settings import format_default, option_name, read_settings_block
from tests.conftest import ROOT


@pytest.mark.parametrize("script", ["data_cleaning.py", "train.py", "predict.py", "export.py"])
def test_every_option_is_in_the_readme_with_its_default(script):
    readme = (ROOT / "README.md").read_text()
    source = (ROOT / script).read_text()
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id.isupper() and isinstance(node.value, ast.Constant | ast.Tuple | ast.UnaryOp)}
    for setting in read_settings_block(source):
        row = f"| `{option_name(setting.name)}` | `{format_default(values[setting.name])}` |"
        assert row in readme, f"README.md lacks the row for {script} {option_name(setting.name)}"
