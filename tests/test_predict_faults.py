"""Stage 3's faults: a disk that fills up while predicting, an output that cannot be a folder, a user's files in
the output folder, two runs into one folder, a run stopped by SIGTERM, pictures that cannot be written, and inputs
that are too large, not files, rotated, not finite, of several frames or behind symbolic links."""

import csv
import gc
import io
import os
import re
import shutil
import signal
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from nerveseg.errors import UserError
from nerveseg.files import write_csv
from nerveseg.inference.outputs import OutputFolder
from tests.helpers import (
    NO_SPACE,
    SYS_IS_UNWRITABLE,
    FullDisk,
    assert_user_error,
    run_script,
    stop_when_building,
    tree_hashes,
    write_small_checkpoint,
)


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


# %% A predictions folder: a user's files in it are kept, what the run reads is never replaced, one run at a time


def predictions_of(target: Path, names: list[str]) -> None:
    """One predict.py run's output folder, written through OutputFolder."""
    output = OutputFolder(target)
    for name in names:
        output.write_mask(name, np.eye(8, dtype=np.uint8))
    write_csv(output.building / "images.csv", [{"img": name} for name in names], ["img"])
    output.finish()


def test_files_a_user_added_to_a_predictions_folder_are_carried_over_untouched(tmp_path):
    target = tmp_path / "predictions"
    predictions_of(target, ["1", "2"])
    (target / "notes.txt").write_text("what I saw")
    (target / "masks" / "mine").mkdir()
    (target / "masks" / "mine" / "drawn.png").write_bytes(b"my own drawing")
    kept = {name: (target / name).stat().st_ino for name in ("notes.txt", "masks/mine/drawn.png")}
    for names in (["3"], ["4"]):  # twice: what is carried over stays the user's, never becomes ours
        predictions_of(target, names)
        assert (target / "notes.txt").read_text() == "what I saw"
        assert {name: (target / name).stat().st_ino for name in kept} == kept  # the same files, not copies
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.png")) == ["masks/4.png",
                                                                                       "masks/mine/drawn.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]


def test_empty_folders_a_user_made_in_a_predictions_folder_are_kept(tmp_path):
    target = tmp_path / "predictions"
    predictions_of(target, ["1"])
    for folder in ("to sort", "masks/reviewed", "later/empty/too"):
        (target / folder).mkdir(parents=True)
    predictions_of(target, ["2"])
    assert all((target / folder).is_dir() for folder in ("to sort", "masks/reviewed", "later/empty/too"))
    (target / "masks" / "2.png").unlink()
    (target / "masks" / "2.png").mkdir()  # a folder of the user's where this run writes a mask
    with pytest.raises(UserError, match="masks/2.png is a folder of yours, and this run wrote a file of that name"):
        predictions_of(target, ["2"])


def test_a_user_file_named_like_a_new_prediction_stops_the_run_and_changes_nothing(tmp_path):
    target = tmp_path / "predictions"
    predictions_of(target, ["1"])
    (target / "masks" / "2.png").write_bytes(b"the user's file")
    before = tree_hashes(target)
    with pytest.raises(UserError, match="masks/2.png was not written by predict.py, and this run wrote a file of"):
        predictions_of(target, ["2"])
    gc.collect()
    assert tree_hashes(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]


def test_an_output_folder_that_is_or_holds_the_input_is_refused(tmp_path):
    target = tmp_path / "predictions"
    predictions_of(target, ["1"])
    before = tree_hashes(tmp_path)
    for reads in ([target / "masks"], [target], [tmp_path / "link"]):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(target / "masks")
        with pytest.raises(UserError, match="(is what|which) predict.py reads, and replacing it would delete"):
            OutputFolder(target, reads=reads)
    assert tree_hashes(tmp_path) == before


def test_a_second_run_into_the_same_output_folder_is_refused_at_once(tmp_path):
    target = tmp_path / "predictions"
    first = OutputFolder(target)
    refusal = rf"predictions is being written by another predict.py run \(process {os.getpid()}\); wait for it to end"
    with pytest.raises(UserError, match=refusal + ", or choose another --output"):
        OutputFolder(target)
    first.write_mask("1", np.eye(8, dtype=np.uint8))
    first.finish()
    predictions_of(target, ["2"])  # once it ended, the next run goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"], "a lock file was left"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """An untrained checkpoint of a small network: predict.py runs in seconds with it."""
    return write_small_checkpoint(tmp_path_factory.mktemp("small-model") / "model.pt")


def images_folder(folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for number, name in enumerate(names):
        Image.fromarray(np.full((40, 60), 10 * number % 256, np.uint8)).save(folder / f"{name}.png")
    return folder


def test_predict_stopped_by_sigterm_leaves_no_building_folder(small_model, tmp_path):
    images_folder(tmp_path / "input", [str(number) for number in range(300)])
    args = ["--checkpoint", str(small_model), "--input", "input", "--output", "out", "--num-workers", "0", "--quiet"]
    stderr, hidden = stop_when_building("predict.py", args, tmp_path, ".out.building-*", signal.SIGTERM)
    assert "predict.py: interrupted" in stderr and "Traceback" not in stderr, stderr
    assert hidden == [] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_what_predict_killed_by_kill_9_left_is_tidied_by_the_next_run(small_model, tmp_path):
    images_folder(tmp_path / "input", [str(number) for number in range(300)])
    args = ["--checkpoint", str(small_model), "--input", "input", "--output", "out", "--quiet"]
    _, hidden = stop_when_building("predict.py", [*args, "--num-workers", "2"], tmp_path, ".out.building-*",
                                   signal.SIGKILL)
    assert [re.sub(r"-\w{8}$", "-*", name) for name in hidden] == [".out.building-*", ".out.lock"]
    rerun = run_script("predict.py", *args, "--num-workers", "2", cwd=tmp_path)  # the same command: it resumes
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (tmp_path / "out" / "masks" / "1.png").is_file() and not (tmp_path / "out.parts").exists()


@pytest.mark.slow
def test_pictures_that_cannot_be_written_are_refused_before_any_mask(small_model, tmp_path):
    images_folder(tmp_path / "input", ["1"])
    (tmp_path / "a_file").write_text("not a folder")
    result = run_script("predict.py", "--checkpoint", str(small_model), "--input", "input", "--output", "out",
                        "--pictures", "a_file", "--quiet", cwd=tmp_path)
    assert_user_error(result, "a_file cannot be a folder: a_file is a file; choose another --pictures")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "input"]


@pytest.mark.slow
def test_no_picture_is_claimed_and_names_a_spreadsheet_would_run_stay_text(small_model, tmp_path):
    names = ["=HYPERLINK(1)", "+A1", "-2+3", "@SUM(1)", "-3"]
    images_folder(tmp_path / "input", names)
    result = run_script("predict.py", "--checkpoint", str(small_model), "--input", "input", "--output", "out",
                        "--num-pictures", "0", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 5 masks to out/masks, out/images.csv, out/report.html in" in result.stdout
    assert "png" not in result.stdout
    assert not (tmp_path / "Images").exists()
    with open(tmp_path / "out" / "images.csv", newline="") as file:
        written = [row["img"] for row in csv.DictReader(file)]
    assert sorted(written) == sorted(["'=HYPERLINK(1)", "'+A1", "'-2+3", "'@SUM(1)", "-3"])  # -3: a number, as it is
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == sorted(f"{name}.png" for name in names)
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


@pytest.mark.slow
def test_an_image_of_too_many_pixels_is_skipped_before_it_is_decoded(awkward_predictions):
    result, rows = awkward_predictions.result, awkward_predictions.rows
    assert result.returncode == 0, result.stderr
    reason = "12000x12000 is 144 million pixels, more than the 25 million allowed (--max-image-pixels)"
    assert reason in rows["huge"]["skipped_because"] and reason in result.stderr
    assert not (awkward_predictions.masks / "huge.png").exists()


@pytest.mark.slow
def test_a_named_pipe_is_skipped_not_waited_for(awkward_predictions):
    row = awkward_predictions.rows["scan"]
    assert row["skipped_because"] == "a named pipe, not an image file; move it out of the folder", row
    assert f"{awkward_predictions.folder / 'scan.png'}: a named pipe" in awkward_predictions.result.stderr


@pytest.mark.slow
def test_the_mask_of_a_rotated_jpeg_has_the_orientation_it_is_shown_in(awkward_predictions):
    assert PIL.Image.open(awkward_predictions.masks / "rotated.png").size == (580, 420)  # as every viewer shows it


@pytest.mark.slow
def test_nan_pixels_and_extra_frames_are_noted(awkward_predictions):
    rows, stderr = awkward_predictions.rows, awkward_predictions.result.stderr
    assert rows["nan"]["note"] == "1 non-finite pixels shown black" and rows["nan"]["mask_area"] != ""
    assert rows["moving"]["note"] == "first of 2 frames used" and "moving.png: first of 2 frames used" in stderr
    assert rows["1"]["note"] == ""


@pytest.mark.slow
def test_images_in_linked_folders_are_segmented_once(awkward_predictions):
    written = sorted(path.relative_to(awkward_predictions.masks).as_posix()
                     for path in awkward_predictions.masks.rglob("*.png"))
    linked = sorted(f"linked/{path.stem}.png" for path in (awkward_predictions.folder / "linked").iterdir())
    assert len(linked) == 2 and written == sorted(["1.png", "2.png", "sub/3.png", "rotated.png", "nan.png",
                                                   "moving.png", *linked])


# %% Odd names, damaged or unmatched truths: the good images still get their masks


@pytest.mark.slow
def test_names_of_superscripts_bytes_that_are_not_utf8_and_right_to_left_controls_are_segmented(small_model,
                                                                                                 tmp_path):
    folder = images_folder(tmp_path / "input", ["1", "10", "2", "²", "scan\u202egnp.exe"])
    Image.fromarray(np.full((40, 60), 9, np.uint8)).save(os.fsencode(folder) + b"/bad\xff\xfe.png")
    result = run_script("predict.py", "--checkpoint", str(small_model), "--input", "input", "--output", "out",
                        "--pictures", "pictures", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "images.csv", newline="", encoding="utf-8") as file:
        assert [row["img"] for row in csv.DictReader(file)] == ["1", "2", "10", "bad\\xff\\xfe", "scan\\u202egnp.exe",
                                                                 "²"]
    masks = {os.fsencode(path.name) for path in (tmp_path / "out" / "masks").iterdir()}
    assert b"bad\xff\xfe.png" in masks and "².png".encode() in masks and len(masks) == 6
    assert "scan\\\\u202egnp.exe" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_damaged_truths_are_left_out_and_named_and_unmatched_ones_get_a_mask_suffix_hint(small_model, tmp_path):
    images_folder(tmp_path / "images", ["1", "2", "3", "4", "5"])
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("1", "4_seg", "5_seg"):
        Image.fromarray(np.zeros((40, 60), np.uint8)).save(masks / f"{name}.png")
    (masks / "2.png").write_bytes((masks / "1.png").read_bytes()[:40])  # truncated
    (masks / "3.png").write_text("not an image")
    result = run_script("predict.py", "--checkpoint", str(small_model), "--input", "images", "--masks", "masks",
                        "--output", "out", "--pictures", "pictures", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "images.csv", newline="") as file:
        rows = {row["img"]: row for row in csv.DictReader(file)}
    assert len(list((tmp_path / "out" / "masks").iterdir())) == 5 and rows["1"]["dice"]
    for name, reason in (("2", "a damaged or truncated PNG file"), ("3", "not an image")):
        left_out = f"its truth mask was left out: masks/{name}.png: {reason}"
        assert not rows[name]["dice"] and rows[name]["note"].startswith(left_out), rows[name]
        assert f"images/{name}.png: its truth mask was left out: masks/{name}.png" in result.stderr
    assert ("2 of 5 images have no truth mask in --masks masks (the Dice is of the others only): images/4.png, "
            "images/5.png; 2 mask file(s) matched no image: masks/4_seg.png, masks/5_seg.png. 2 file(s) are named "
            "<name>_seg beside <name>: if those are masks, pass --mask-suffix _seg.") in result.stderr
    assert "on 1 images with truth masks" in result.stdout


@pytest.mark.slow
def test_a_run_that_replaces_the_picture_of_the_run_before_says_so(small_model, tmp_path):
    images_folder(tmp_path / "input", ["1", "2"])
    arguments = ("--checkpoint", str(small_model), "--input", "input", "--pictures", "pictures", "--quiet")
    first = run_script("predict.py", *arguments, "--output", "first", cwd=tmp_path)
    assert first.returncode == 0 and "pictures/predictions.png in" in first.stdout, first.stderr
    second = run_script("predict.py", *arguments, "--output", "second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert ("pictures/predictions.png (replacing the picture of the run before; --pictures DIR keeps it) in"
            in second.stdout)
