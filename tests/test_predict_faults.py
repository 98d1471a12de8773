"""Stage 3's faults: a disk that fills up while predicting, an output that cannot be a folder, and inputs that
are too large, not files, rotated, not finite, of several frames or behind symbolic links."""

import csv
import gc
import io
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from nerveseg.errors import UserError
from nerveseg.files import write_csv
from nerveseg.inference import OutputFolder
from tests.helpers import NO_SPACE, SYS_IS_UNWRITABLE, FullDisk, run_script, tree_hashes


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


# %% Awkward inputs: too many pixels, a named pipe, EXIF orientation, NaN, several frames, symbolic links


@pytest.fixture(scope="module")
def awkward_predictions(trained_run, train_clean, tmp_path_factory) -> types.SimpleNamespace:
    """predict.py on a folder holding, besides two test images, each awkward input of issue 20."""
    where = tmp_path_factory.mktemp("awkward-predict")
    folder, elsewhere = where / "input", where / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    test_images = sorted((train_clean / "test").glob("*.tif"))
    for path in test_images[:2]:
        shutil.copy(path, folder / path.name)
    upright = np.asarray(PIL.Image.open(test_images[0]))
    PIL.Image.new("L", (12000, 12000)).save(folder / "huge.png", compress_level=1)  # ~140 KB, 144 million pixels
    os.mkfifo(folder / "scan.png")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn left, shown upright
    PIL.Image.fromarray(np.rot90(upright)).save(folder / "rotated.jpg", quality=95, exif=exif)
    floats = upright.astype(np.float32)
    floats[0, 0] = np.nan
    PIL.Image.fromarray(floats).save(folder / "nan.tif")
    frames = [PIL.Image.fromarray(upright), PIL.Image.fromarray(255 - upright)]
    frames[0].save(folder / "moving.png", save_all=True, append_images=frames[1:])  # an APNG
    shutil.copy(test_images[2], folder / "sub" / "3.tif")
    for path in test_images[3:5]:
        shutil.copy(path, elsewhere / path.name)
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    result = run_script("predict.py", "--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--input",
                        str(folder), "--output", "out", "--pictures", "pictures", "--quiet", cwd=where, timeout=300)
    rows = {}
    if (where / "out" / "images.csv").exists():
        with open(where / "out" / "images.csv", newline="") as file:
            rows = {row["img"]: row for row in csv.DictReader(file)}
    return types.SimpleNamespace(result=result, rows=rows, folder=folder, masks=where / "out" / "masks")


def test_an_image_of_too_many_pixels_is_skipped_before_it_is_decoded(awkward_predictions):
    result, rows = awkward_predictions.result, awkward_predictions.rows
    assert result.returncode == 0, result.stderr
    reason = "12000x12000 is 144 million pixels, more than the 25 million allowed (--max-image-pixels)"
    assert reason in rows["huge"]["skipped_because"] and reason in result.stderr
    assert not (awkward_predictions.masks / "huge.png").exists()


def test_a_named_pipe_is_skipped_not_waited_for(awkward_predictions):
    row = awkward_predictions.rows["scan"]
    assert row["skipped_because"] == "a named pipe, not an image file; move it out of the folder", row
    assert f"{awkward_predictions.folder / 'scan.png'}: a named pipe" in awkward_predictions.result.stderr


def test_the_mask_of_a_rotated_jpeg_has_the_orientation_it_is_shown_in(awkward_predictions):
    assert PIL.Image.open(awkward_predictions.masks / "rotated.png").size == (580, 420)  # as every viewer shows it


def test_nan_pixels_and_extra_frames_are_noted(awkward_predictions):
    rows, stderr = awkward_predictions.rows, awkward_predictions.result.stderr
    assert rows["nan"]["note"] == "1 non-finite pixels shown black" and rows["nan"]["mask_area"] != ""
    assert rows["moving"]["note"] == "first of 2 frames used" and "moving.png: first of 2 frames used" in stderr
    assert rows["1"]["note"] == ""


def test_images_in_linked_folders_are_segmented_once(awkward_predictions):
    written = sorted(path.relative_to(awkward_predictions.masks).as_posix()
                     for path in awkward_predictions.masks.rglob("*.png"))
    linked = sorted(f"linked/{path.stem}.png" for path in (awkward_predictions.folder / "linked").iterdir())
    assert len(linked) == 2 and written == sorted(["1.png", "2.png", "sub/3.png", "rotated.png", "nan.png",
                                                   "moving.png", *linked])
