"""docs/options.md documents every option of every script, with its current default."""

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
