"""Stage 1's faults: damaged pairs, names, duplicates in two places, --strict, an output that cannot be
written or a disk that fills up. Each gives a message that names the file and the fix, a non-zero exit
where the stage cannot go on, no traceback, and leaves the originals byte-identical."""

import csv
import errno
import io
import shutil
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from nerveseg.cleaning import CleaningOptions, clean_download
from nerveseg.errors import UserError
from nerveseg.sources import find_download
from tests.helpers import NO_SPACE, SYS_IS_UNWRITABLE, assert_user_error, run_script, tree_hashes

# %% Stage 1: data_cleaning.py


def save_tiff(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, compression="tiff_lzw")


@pytest.fixture(scope="module")
def damaged_clean(tiny_download, tmp_path_factory) -> types.SimpleNamespace:
    """A copy of the tiny download with several new problems at once, cleaned normally and with --strict."""
    download, planted = tiny_download
    where = tmp_path_factory.mktemp("damaged")
    source = where / "download"
    shutil.copytree(download, source)
    train = source / "train"
    assert not {"3_2", "4_4", "2_3", "3_3"} & {name for pair in planted for name in pair}
    # a 16-bit image (mode I;16): its values would be misread as 8-bit
    pixels = np.asarray(Image.open(train / "3_2.tif")).astype(np.uint16) * 257
    Image.fromarray(pixels).save(train / "3_2.tif")
    # a mask drawn with anti-aliased (grey) edges: which side of the edge is nerve would be a guess
    mask = Image.open(train / "4_4_mask.tif")
    assert np.asarray(mask).any()
    mask.filter(ImageFilter.GaussianBlur(1.5)).save(train / "4_4_mask.tif", compression="tiff_lzw")
    # names that do not follow <subject>_<n>
    bad_names = ["abc.tif", "1-7.tif", "1_7_extra.tif", "x_1_mask.tif"]
    for name in bad_names:
        shutil.copyfile(train / "1_1.tif", train / name)
    # the same ids in train/ and in train.zip: 2_3 with different content, 3_3 (and its mask) identical
    changed = np.asarray(Image.open(train / "2_3.tif")).copy()
    changed[0, 0] ^= 0xFF
    buffer = io.BytesIO()
    Image.fromarray(changed).save(buffer, format="TIFF")
    with zipfile.ZipFile(source / "train.zip", "w") as archive:
        archive.writestr("train/2_3.tif", buffer.getvalue())
        archive.write(train / "3_3.tif", "train/3_3.tif")
        archive.write(train / "3_3_mask.tif", "train/3_3_mask.tif")
    before = tree_hashes(source)
    output = where / "clean"
    result = run_script("data_cleaning.py", "--source", str(source), "--output", str(output), "--quiet", cwd=where)
    strict = run_script(
        "data_cleaning.py", "--source", str(source), "--output", str(where / "strict"), "--strict", "--quiet", cwd=where
    )
    with open(output / "manifest.csv", newline="") as file:
        manifest = {row["id"]: row for row in csv.DictReader(file)}
    return types.SimpleNamespace(
        source=source,
        output=output,
        result=result,
        strict=strict,
        manifest=manifest,
        bad_names=bad_names,
        unchanged=tree_hashes(source) == before,
        where=where,
    )


def assert_skipped(damaged: types.SimpleNamespace, row_id: str, *reasons: str) -> None:
    """The id is in the manifest as not kept, for these reasons, reported on stderr, and not copied."""
    assert damaged.result.returncode == 0, damaged.result.stderr
    row = damaged.manifest[row_id]
    assert row["kept"] == "0", row
    for reason in reasons:
        assert reason in row["reason"], row["reason"]
        assert reason in damaged.result.stderr and reason in damaged.strict.stderr
    assert not (damaged.output / "images" / f"{row_id}.tif").exists()
    assert damaged.unchanged, "the originals were modified"


@pytest.mark.slow
def test_a_16_bit_image_is_skipped_with_its_reason(damaged_clean):
    assert_skipped(damaged_clean, "3_2", "3_2.tif is mode I;16, expected 8-bit grayscale (L)")


@pytest.mark.slow
def test_a_mask_with_anti_aliased_edges_is_refused_not_guessed(damaged_clean):
    assert_skipped(damaged_clean, "4_4", "4_4_mask.tif: mask is not binary (values [0, ", "expected 0/255")


@pytest.mark.slow
def test_names_that_do_not_follow_subject_n_are_skipped(damaged_clean):
    for name in damaged_clean.bad_names:
        assert_skipped(damaged_clean, name, f"train/{name}: name is not <subject>_<n>.tif")
        assert damaged_clean.manifest[name]["subject"] == ""


@pytest.mark.slow
def test_an_id_in_two_places_with_different_content_is_skipped(damaged_clean):
    zipped = f"{damaged_clean.source / 'train.zip'}:train/2_3.tif"
    assert_skipped(damaged_clean, "2_3", "2_3.tif was found 2 times with different content", zipped, "keep only")


@pytest.mark.slow
def test_an_id_in_two_places_with_the_same_content_is_kept_once(damaged_clean):
    row = damaged_clean.manifest["3_3"]
    assert row["kept"] == "1" and row["reason"] == "", row
    for folder, suffix in (("images", ""), ("masks", "_mask")):
        copy = (damaged_clean.output / folder / "3_3.tif").read_bytes()
        assert copy == (damaged_clean.source / "train" / f"3_3{suffix}.tif").read_bytes()
    assert damaged_clean.unchanged


@pytest.mark.slow
def test_strict_stops_on_these_problems_and_writes_nothing(damaged_clean):
    assert_user_error(damaged_clean.strict, "--strict: 7 problem(s)", "mode I;16", "not binary", "different content")
    assert not (damaged_clean.where / "strict").exists()
    assert not list(damaged_clean.where.glob(".strict.building-*"))
    assert damaged_clean.unchanged


@pytest.mark.slow
def test_an_output_that_cannot_be_a_folder_is_refused(tiny_download, tmp_path):
    source = tiny_download[0]
    before = tree_hashes(source)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    under = run_script("data_cleaning.py", "--source", str(source), "--output", str(blocker / "clean"), cwd=tmp_path)
    assert_user_error(under, f"cannot write into {blocker}", "choose --output in a writable folder")
    itself = run_script("data_cleaning.py", "--source", str(source), "--output", str(blocker), cwd=tmp_path)
    assert_user_error(itself, f"{blocker} is a file, not a folder; choose another --output")
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    if SYS_IS_UNWRITABLE:  # a folder that even root cannot write into, like a read-only mount
        refused = run_script(
            "data_cleaning.py", "--source", str(source), "--output", "/sys/nerveseg-clean", cwd=tmp_path
        )
        assert_user_error(refused, "cannot write into /sys: ", "choose --output in a writable folder")
    assert tree_hashes(source) == before


def test_a_full_disk_while_cleaning_keeps_the_previous_clean(tiny_download, tmp_path, monkeypatch):
    source, output = tiny_download[0], tmp_path / "clean"
    before_source = tree_hashes(source)
    download = find_download(source, tmp_path)
    clean_download(download, output, CleaningOptions(workers=1, quiet=True), overwrite=False)
    before = tree_hashes(output)
    real_write_bytes, calls = Path.write_bytes, []

    def write_bytes_until_full(path: Path, data: bytes) -> int:
        calls.append(path)
        if len(calls) < 5:
            return real_write_bytes(path, data)
        real_write_bytes(path, data[: len(data) // 2])  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "write_bytes", write_bytes_until_full)
    with pytest.raises(UserError) as caught:  # other options: the clean is redone over the previous one
        clean_download(download, output, CleaningOptions(duplicates="keep", workers=1, quiet=True), overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 5 and calls[-1].is_relative_to(tmp_path)
    message = str(caught.value)
    assert f"cleaning stopped: {NO_SPACE}; {output} was left as it was" in message and "Free some space" in message
    assert tree_hashes(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"], "a partial copy was left behind"
    assert tree_hashes(source) == before_source
