"""docs/pipeline.md lists train.py's cells as the script has them (docs/options.md: tests/test_settings.py)."""

from tests.helpers import ROOT


def test_pipeline_md_lists_the_cells_of_train_py_in_order():
    cells = [line.removeprefix("# %% ").split(":")[0] for line in (ROOT / "train.py").read_text().splitlines()
             if line.startswith("# %% ")]
    pipeline = (ROOT / "docs" / "pipeline.md").read_text()
    listed = [line.split("**")[1].rstrip(".") for line in pipeline.splitlines() if line[:1].isdigit() and "**" in line]
    assert len(cells) == 6 and listed[: len(cells)] == cells, (cells, listed)
