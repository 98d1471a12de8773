"""Stage 1's faults: damaged pairs, names, duplicates in two places, --strict, an output that cannot be
written or a disk that fills up. Each gives a message that names the file and the fix, a non-zero exit
where the stage cannot go on, no traceback, and leaves the originals byte-identical."""

import contextlib
import csv
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from nerveseg import progress
from nerveseg.cleaning.clean_copy import CleaningOptions
from nerveseg.cleaning.layouts import find_own_data
from nerveseg.cleaning.parallel import run_parallel
from nerveseg.cleaning.pipeline import clean_download, clean_own_data
from nerveseg.cleaning.sources import ArchiveCache, Locator, TooLarge, find_download
from nerveseg.errors import UserError
from tests.helpers import (
    NO_SPACE,
    ROOT,
    SLOW_READS,
    SYS_IS_UNWRITABLE,
    assert_user_error,
    run_script,
    stop_when_building,
    tree_hashes,
)

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


def test_a_problem_is_counted_as_one_whatever_its_message_says(tiny_download, tmp_path):
    """A skipped file whose reason happens to hold the words "near-duplicate" (here in its name) is a problem:
    reported, counted as skipped and fatal under --strict, never counted as a dropped near-duplicate."""
    download, planted = tiny_download
    source = tmp_path / "download"
    shutil.copytree(download, source)
    shutil.copyfile(source / "train" / "1_1.tif", source / "train" / "near-duplicate.tif")
    found = find_download(source, tmp_path)
    summary = clean_download(found, tmp_path / "clean", CleaningOptions(workers=1, quiet=True))
    assert summary["dropped_as_duplicates"] == len(planted) and summary["pairs_skipped"] == len(planted) + 1
    assert summary["skipped_by_reason"]["skipped"] == 1
    assert summary["problems"] == [f"{source / 'train' / 'near-duplicate.tif'}: name is not <subject>_<n>.tif"]
    with pytest.raises(UserError, match="--strict: 1 problem"):
        clean_download(found, tmp_path / "strict", CleaningOptions(strict=True, workers=1, quiet=True))


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


# %% Only a clean copy of ours is ever replaced, never what the clean reads


def write_own_folder(root: Path, pairs: int = 4) -> None:
    """A user's own folder: 4 image/mask pairs in images/ and masks/, and a notes file of theirs."""
    rng = np.random.default_rng(0)
    for number in range(pairs):
        mask = np.zeros((32, 48), np.uint8)
        mask[8:20, 10 + number : 30] = 255
        for folder, pixels in (("images", rng.integers(0, 256, (32, 48), dtype=np.uint8)), ("masks", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / folder / f"P{number}_1.png")
    (root / "notes.txt").write_text("my notes")


def clean_own(source: Path, output: Path) -> dict:
    own = find_own_data(source, "images-masks", "_mask")
    return clean_own_data(own, output, CleaningOptions(workers=1, quiet=True), None, overwrite=True)


REPLACING = {  # (the --output, relative to a folder that holds mine/ and the user's other.txt; the message)
    "the source itself": ("mine", "--output {tmp}/mine is what data_cleaning.py reads, and replacing it would delete"),
    "a folder above the source": (".", "--output {tmp} holds {tmp}/mine, which data_cleaning.py reads, and replacing"),
    "a link to the source": ("alias", "--output {tmp}/alias is what data_cleaning.py reads"),
    "a folder of the user's": ("theirs", "theirs already holds files that data_cleaning.py did not write"),
}


@pytest.mark.parametrize("case", sorted(REPLACING))
def test_overwrite_never_replaces_the_source_or_a_folder_it_did_not_write(case, tmp_path):
    """--overwrite true replaces only a clean copy of ours: cleaning a folder into itself, into a folder above it,
    or over a folder of the user's deletes nothing, and the message does not suggest --overwrite."""
    write_own_folder(tmp_path / "mine")
    (tmp_path / "other.txt").write_text("the user's")
    (tmp_path / "alias").symlink_to(tmp_path / "mine")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("years of work")
    before = tree_hashes(tmp_path)
    output, message = REPLACING[case]
    with pytest.raises(UserError) as caught:
        clean_own(tmp_path / "mine", tmp_path / output)
    assert message.format(tmp=tmp_path) in str(caught.value)
    assert "--overwrite" not in str(caught.value) and "hoose another --output" in str(caught.value)
    assert tree_hashes(tmp_path) == before and not list(tmp_path.glob(".*"))


def test_a_clean_read_through_a_link_is_never_replaced_by_its_own_clean(tmp_path):
    """Resolved paths are compared: a source that is a link to the output is the output."""
    write_own_folder(tmp_path / "mine")
    clean_own(tmp_path / "mine", tmp_path / "clean")
    (tmp_path / "link").symlink_to(tmp_path / "clean")
    before = tree_hashes(tmp_path / "clean")
    with pytest.raises(UserError, match="clean is what data_cleaning.py reads, and replacing it would delete"):
        clean_own(tmp_path / "link", tmp_path / "clean")
    assert tree_hashes(tmp_path / "clean") == before
    assert clean_own(tmp_path / "mine", tmp_path / "clean")["unchanged"]  # a clean of ours: rebuilt as before


def test_a_file_named_cleaning_json_does_not_make_a_folder_ours(tmp_path):
    write_own_folder(tmp_path / "mine")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "cleaning.json").write_text('{"my": "settings"}')
    with pytest.raises(UserError, match="theirs/cleaning.json was not written by data_cleaning.py"):
        clean_own(tmp_path / "mine", tmp_path / "theirs")
    assert (tmp_path / "theirs" / "cleaning.json").read_text() == '{"my": "settings"}'


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_clean_stopped_by_a_signal_leaves_no_building_folder(stop, tmp_path):
    write_own_folder(tmp_path / "mine")
    before = tree_hashes(tmp_path / "mine")
    args = ["--source", "mine", "--output", "clean", "--workers", "1", "--quiet"]
    stderr, hidden = stop_when_building("data_cleaning.py", args, tmp_path, ".clean.building-*", stop)
    assert "data_cleaning.py: interrupted" in stderr and "Traceback" not in stderr, stderr
    assert hidden == [] and not (tmp_path / "clean").exists()
    assert tree_hashes(tmp_path / "mine") == before


def children_of(pid: int) -> list[int]:
    """The processes that `pid` started and that still run."""
    return [int(child) for task in Path(f"/proc/{pid}/task").glob("*")
            for child in (task / "children").read_text().split()]


def has_ended(pid: int) -> bool:
    """Whether the process `pid` ended (gone, or a zombie that nobody reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.slow
def test_a_clean_killed_by_kill_9_leaves_no_worker_and_nothing_in_the_way_of_the_next(tmp_path):
    write_own_folder(tmp_path / "mine", pairs=60)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_READS)  # each image read takes a while
    args = ["--source", "mine", "--output", "clean", "--quiet"]
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path / 'slow'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "data_cleaning.py"), *args, "--workers", "2"],
                               cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = children_of(process.pid)
        assert len(workers) == 2 and list(tmp_path.glob(".clean.building-*")), "the workers never started"
        process.kill()  # kill -9
        process.wait()
        deadline = time.monotonic() + 10
        while not all(map(has_ended, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(has_ended, workers)), "a worker lives on without its run"
        rerun = run_script("data_cleaning.py", *args, cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        assert len(list((tmp_path / "clean" / "images").iterdir())) == 60
    finally:
        for pid in [process.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# %% Archives and files bounded before they are read


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    """A deflated zip archive of these members."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def lie_about_sizes(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size that `member`'s local and central headers claim."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, offset, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = data.find(signature)
        while data[start + name_at : start + name_at + len(name)] != name:
            start = data.find(signature, start + 1)
        data[start + offset : start + offset + 4] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def clean_measured(source: Path, output: Path) -> tuple[dict | UserError, int]:
    """(the summary of cleaning `source`, or the UserError that stopped it; the peak of Python's allocations
    meanwhile, in bytes)."""
    tracemalloc.start()
    try:
        outcome = clean_download(find_download(source, output.parent), output, CleaningOptions(workers=1, quiet=True))
    except UserError as error:
        outcome = error
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return outcome, peak


@pytest.mark.slow
def test_a_zip_bomb_member_is_refused_from_its_headers_without_expanding_it(tiny_download, tmp_path):
    train = tiny_download[0] / "train"
    members = {f"train/{path.name}": path.read_bytes() for path in sorted(train.glob("1_*.tif"))}
    huge_csv = b"subject,img,pixels\n1,1," + b"1 2 " * (8 << 20)  # 32 MiB of run lengths, ~100 KiB deflated
    csv_bomb = zip_of(tmp_path / "csv-bomb.zip", {**members, "train_masks.csv": huge_csv})
    image_bomb = zip_of(tmp_path / "image-bomb.zip", {**members, "train/1_1.tif": bytes(65 << 20)})  # 65 MiB
    for path in (csv_bomb, image_bomb):
        assert path.stat().st_size < 3 << 20
    csv_refused, peak = clean_measured(csv_bomb, tmp_path / "a")
    assert isinstance(csv_refused, UserError) and peak < 16 << 20, (csv_refused, peak)
    assert f"{csv_bomb}:train_masks.csv expands" in str(csv_refused) and "a zip bomb?" in str(csv_refused)
    skipped, peak = clean_measured(image_bomb, tmp_path / "b")
    assert peak < 48 << 20, peak
    assert f"{image_bomb}:train/1_1.tif expands to 65 MiB or more, more than the 64 MiB allowed (--max-member-mb)" in (
        " ".join(skipped["problems"]))
    result = run_script("data_cleaning.py", "--source", str(csv_bomb), "--output", "c", cwd=tmp_path)
    assert_user_error(result, "train_masks.csv expands", "Re-download it from Kaggle")


def test_a_member_whose_headers_lie_is_not_expanded_past_them(tiny_download, tmp_path):
    members = {f"train/{path.name}": path.read_bytes() for path in sorted((tiny_download[0] / "train").glob("1_*.tif"))}
    liar = zip_of(tmp_path / "liar.zip", {**members, "train_masks.csv": b"subject,img,pixels\n" + bytes(32 << 20)})
    lie_about_sizes(liar, "train_masks.csv", 1000)  # claims 1000 bytes: fine by size and by ratio
    refused, peak = clean_measured(liar, tmp_path / "a")
    assert isinstance(refused, UserError) and peak < 16 << 20, (refused, peak)
    assert f"{liar}:train_masks.csv cannot be read" in str(refused) and "re-download it" in str(refused)


def test_a_plain_file_larger_than_the_bound_is_not_read(tmp_path):
    path = tmp_path / "1_1.tif"
    path.write_bytes(bytes(3 << 20))
    with pytest.raises(TooLarge, match=f"{path} is 3 MiB, more than the 2 MiB allowed \\(--max-member-mb\\)"):
        ArchiveCache().read(Locator(str(path)), max_bytes=2 << 20)
    assert ArchiveCache().read(Locator(str(path)), max_bytes=4 << 20) == bytes(3 << 20)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_checks_say_how_far_they_are_where_the_output_is_not_a_terminal(workers, monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)  # a line for every file (capsys: not a terminal)
    assert run_parallel(abs, [-1, -2, -3], workers, "pairs", quiet=False) == [1, 2, 3]
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "pairs: file 1 of 3", "pairs: file 2 of 3", "pairs: file 3 of 3"]
    assert run_parallel(abs, [-1, -2], workers, "pairs", quiet=True) == [1, 2]
    assert capsys.readouterr().err == ""
