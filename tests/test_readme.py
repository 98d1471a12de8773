"""docs/pipeline.md lists train.py's cells as the script has them (docs/options.md: tests/test_settings.py)."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT


def test_pipeline_md_lists_the_cells_of_train_py_in_order():
    cells = [line.removeprefix("# %% ").split(":")[0] for line in (ROOT / "train.py").read_text().splitlines()
             if line.startswith("# %% ")]
    pipeline = (ROOT / "docs" / "pipeline.md").read_text()
    listed = [line.split("**")[1].rstrip(".") for line in pipeline.splitlines() if line[:1].isdigit() and "**" in line]
    assert len(cells) == 6 and listed[: len(cells)] == cells, (cells, listed)


def test_what_the_readmes_commands_write_is_ignored_by_git():
    """The README promises a clean `git status` after its commands: every --output, --model-path and --pictures
    they name (in README.md and docs/own-data.md) is ignored, as Images/ and predictions/ are."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", "\n".join(
        (ROOT / name).read_text() for name in ("README.md", "docs/own-data.md")), re.S)).replace("\\\n", " ")
    written = {match[1] for match in re.finditer(r"--(?:output|model-path|pictures) (\S+)", commands)}
    assert "predictions-bus-uclm" in written, written
    for path in sorted(written):
        probe = path if Path(path).suffix else f"{path}/masks/1.png"
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", probe])
        assert ignored.returncode == 0, f"{probe} would show in git status"
