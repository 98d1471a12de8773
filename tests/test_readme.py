"""docs/options.md documents every option of every script, with its current default; docs/pipeline.md lists
train.py's cells as the script has them."""

import pytest

from nerveseg.settings import format_default, option_name, read_settings_block, script_defaults
from tests.helpers import ROOT


@pytest.mark.parametrize("script", ["data_cleaning.py", "train.py", "predict.py", "export.py"])
def test_every_option_is_in_the_readme_with_its_default(script):
    readme = (ROOT / "docs" / "options.md").read_text()
    defaults = script_defaults(ROOT / script)
    for setting in read_settings_block((ROOT / script).read_text()):
        row = f"| `{option_name(setting.name)}` | `{format_default(defaults[setting.name])}` |"
        assert row in readme, f"docs/options.md lacks the row for {script} {option_name(setting.name)}"


def test_pipeline_md_lists_the_cells_of_train_py_in_order():
    cells = [line.removeprefix("# %% ").split(":")[0] for line in (ROOT / "train.py").read_text().splitlines()
             if line.startswith("# %% ")]
    pipeline = (ROOT / "docs" / "pipeline.md").read_text()
    listed = [line.split("**")[1].rstrip(".") for line in pipeline.splitlines() if line[:1].isdigit() and "**" in line]
    assert len(cells) == 6 and listed[: len(cells)] == cells, (cells, listed)
