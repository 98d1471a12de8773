"""Stage 3's faults: a disk that fills up while predicting, an output that cannot be a folder."""

import gc
import io
import os
import re
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from nerveseg.errors import UserError
from nerveseg.files import write_csv
from nerveseg.inference import OutputFolder
from tests.helpers import NO_SPACE, SYS_IS_UNWRITABLE, FullDisk, tree_hashes


@pytest.mark.parametrize("room", [0, 5000])
def test_a_full_disk_while_predicting_keeps_the_previous_predictions(room, tmp_path, monkeypatch):
    target = tmp_path / "predictions"
    mask = np.random.default_rng(0).random((420, 580)) > 0.5  # compresses badly: many writes
    first = OutputFolder(target)
    first.write_mask("1", mask)
    write_csv(first.building / "submission.csv", [{"img": "1", "pixels": "1 2"}], ["img", "pixels"])
    first.finish()
    before = tree_hashes(target)
    second = OutputFolder(target)
    second.write_mask("1", mask)
    real_open = PIL.Image.builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_open(file, mode, *args, **kwargs)
        return io.BufferedWriter(FullDisk(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), room))

    monkeypatch.setattr(PIL.Image, "builtins", types.SimpleNamespace(open=open_on_a_full_disk))
    with pytest.raises(UserError) as caught:
        second.write_mask("2", mask)
    monkeypatch.undo()
    path = second.building / "masks" / "2.png"
    assert str(caught.value) == f"cannot write {path}: {NO_SPACE}; nothing was changed in {target}"
    assert sorted(p.name for p in (second.building / "masks").iterdir()) == ["1.png"], "a half-written mask is left"
    del second, caught  # the run stops here; its unfinished folder goes with it
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]
    assert tree_hashes(target) == before


def test_a_predict_output_that_cannot_be_a_folder_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"{re.escape(str(blocker))} is a file, not a folder; choose another --output"):
        OutputFolder(blocker)
    with pytest.raises(UserError, match=f"cannot write into {re.escape(str(blocker))}: .*; choose another --output"):
        OutputFolder(blocker / "predictions")
    if SYS_IS_UNWRITABLE:
        with pytest.raises(UserError, match="cannot write into /sys: .*; choose another --output"):
            OutputFolder(Path("/sys/nerveseg-predictions"))
    assert blocker.read_text() == "not a folder" and [p.name for p in tmp_path.iterdir()] == ["a_file"]
