"""Stage 3: predict.py: masks, the submission, pictures and the Dice against truths."""

import csv
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.files import current_umask
from nerveseg.rle import rle_encode
from tests.helpers import KAGGLE_SAMPLE, needs_kaggle_sample, run_script

pytestmark = pytest.mark.slow  # every test here runs predict.py, most on a model trained by train.py


def valid_pairs(text: str, pixels: int) -> bool:
    values = list(map(int, text.split()))
    starts, lengths = values[0::2], values[1::2]
    ends = [s + n - 1 for s, n in zip(starts, lengths, strict=True)]
    return (
        len(values) % 2 == 0
        and all(n > 0 for n in lengths)
        and all(s >= 1 for s in starts)
        and all(e <= pixels for e in ends)
        and all(b > a for a, b in zip(ends, starts[1:], strict=False))
    )


def test_prediction_writes_a_valid_submission_masks_and_a_picture(trained_run, train_clean):
    result = run_script("predict.py", "--input", str(train_clean / "test"), "--quiet", cwd=trained_run)
    assert result.returncode == 0, result.stderr
    with open(trained_run / "predictions" / "submission.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == ["img", "pixels"]
        rows = list(reader)
    assert [row["img"] for row in rows] == [str(n) for n in range(1, 7)]
    assert all(valid_pairs(row["pixels"], 420 * 580) for row in rows)
    for row in rows:
        mask = np.asarray(Image.open(trained_run / "predictions" / "masks" / f"{row['img']}.png"))
        assert mask.shape == (420, 580) and set(np.unique(mask)) <= {0, 255}
        assert rle_encode(mask) == row["pixels"]
    assert (trained_run / "Images" / "predictions.png").stat().st_size > 10_000
    umask = current_umask()
    assert stat.S_IMODE((trained_run / "predictions").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((trained_run / "predictions" / "submission.csv").stat().st_mode) == 0o666 & ~umask


def test_masks_give_the_dice_and_other_image_sizes_work(trained_run, tmp_path):
    rng = np.random.default_rng(1)
    pngs, truths = tmp_path / "pngs", tmp_path / "truths"
    pngs.mkdir()
    truths.mkdir()
    for name, (height, width) in {"a": (200, 300), "b": (333, 250), "c": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(pngs / f"{name}.png")
        Image.fromarray(np.zeros((height, width), np.uint8)).save(truths / f"{name}_mask.png")
    result = run_script(
        "predict.py",
        "--input",
        str(pngs),
        "--masks",
        str(truths),
        "--output",
        str(tmp_path / "out"),
        "--pictures",
        str(tmp_path / "pictures"),
        "--quiet",
        cwd=trained_run,
    )
    assert result.returncode == 0, result.stderr
    for name, size in {"a": (200, 300), "b": (333, 250), "c": (64, 64)}.items():
        assert np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png")).shape == size
    assert "on 3 images with truth masks" in result.stdout and "empty truths: 1.0000 on 3" in result.stdout
    with open(tmp_path / "out" / "images.csv", newline="") as file:
        rows = {row["img"]: row for row in csv.DictReader(file)}
    assert sorted(rows) == ["a", "b", "c"] and all(0 <= float(row["presence"]) <= 1 for row in rows.values())
    assert all(row["dice"] in ("0.0000", "1.0000") and not row["skipped_because"] for row in rows.values())


def test_bad_inputs_give_clear_messages(trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "bad.tif").write_bytes(b"II*\x00 this is not really a TIFF")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained_run / "2D_Nerve_Segmentation.pt").read_bytes()[:5000])
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (["--checkpoint", str(truncated)], "is not a readable checkpoint"),
        (["--checkpoint", str(not_ours)], "is not a checkpoint written by train.py"),
        (["--input", str(tmp_path / "empty")], "holds no images"),
        (["--input", str(unreadable)], "no image of"),
    ]
    for args, message in cases:
        result = run_script("predict.py", *args, "--output", str(tmp_path / "out"), "--quiet", cwd=trained_run)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()
    assert "bad.tif: a damaged or truncated TIFF file" in result.stderr


def test_unreadable_images_are_skipped_and_named_with_their_reason(trained_run, train_clean, tmp_path):
    """One bad file among many costs only itself; --strict stops at it instead."""
    folder = tmp_path / "input"
    folder.mkdir()
    for path in sorted((train_clean / "test").glob("*.tif"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "b.png").write_text("a text file named like an image")
    whole = (train_clean / "test" / "4.tif").read_bytes()
    (folder / "cut.tif").write_bytes(whole[: len(whole) // 2])
    model = ["--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--pictures", str(tmp_path / "pictures")]
    result = run_script("predict.py", *model, "--input", str(folder), "--output", "out", "--num-workers", "2",
                        "--submission", "true", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 2 unreadable file(s)" in result.stderr
    assert f"{folder / 'b.png'}: not an image" in result.stderr
    assert f"{folder / 'cut.tif'}: a damaged or truncated TIFF file" in result.stderr
    for noise in ("Traceback", "LoadImaged", "monai", "Warning", "EXIF"):
        assert noise not in result.stderr, noise
    with open(tmp_path / "out" / "submission.csv", newline="") as file:
        assert [row["img"] for row in csv.DictReader(file)] == ["1", "2", "3"]
    with open(tmp_path / "out" / "images.csv", newline="") as file:
        rows = {row["img"]: row for row in csv.DictReader(file)}
    assert rows["b"]["skipped_because"].startswith("not an image") and rows["cut"]["skipped_because"]
    assert rows["1"]["presence"] and not rows["1"]["skipped_because"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["1.png", "2.png", "3.png"]
    strict = run_script("predict.py", *model, "--input", str(folder), "--output", "strict", "--strict", "--quiet",
                        cwd=tmp_path)
    assert strict.returncode == 1 and "b.png: not an image" in strict.stderr and "--strict" in strict.stderr
    assert "Traceback" not in strict.stderr and not (tmp_path / "strict").exists()


def test_an_output_folder_of_other_files_is_not_overwritten(trained_run, train_clean, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_script(
        "predict.py", "--input", str(train_clean / "test"), "--output", str(mine), "--quiet", cwd=trained_run
    )
    assert result.returncode != 0 and "did not write" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_help_lists_the_options(tmp_path):
    result = run_script("predict.py", "-h", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--checkpoint", "--input", "--output", "--masks", "--pictures", "--batch-size", "--device"):
        assert option in result.stdout


@needs_kaggle_sample
def test_real_images_read_by_worker_processes_give_the_same_masks_as_in_process(trained_run, tmp_path):
    """The readers of predict.py run in worker processes: on the real competition TIFFs, two workers give
    exactly what reading in the main process gives."""
    folder = tmp_path / "real"
    folder.mkdir()
    for path in sorted((KAGGLE_SAMPLE / "train").glob("*.tif")):
        if not path.stem.endswith("_mask"):
            (folder / path.name).write_bytes(path.read_bytes())
    model = ["--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--pictures", str(tmp_path / "pictures")]
    outputs = {}
    for workers in ("0", "2"):
        result = run_script("predict.py", *model, "--input", str(folder), "--output", f"out-{workers}",
                            "--num-workers", workers, "--batch-size", "8", "--submission", "true", "--quiet",
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs[workers] = (tmp_path / f"out-{workers}" / "submission.csv").read_text()
    assert outputs["0"] == outputs["2"] and outputs["0"].count("\n") == 56
