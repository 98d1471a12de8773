"""Stage 1: data_cleaning.py on every form of the download, its checks, its policies, its safety."""

import csv
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.rle import rle_decode
from tests.helpers import KAGGLE_SAMPLE, needs_kaggle_sample, run_script, tree_hashes


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> None:
    """Zip every file below `folder`, names relative to it (under `prefix`)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, prefix + str(path.relative_to(folder)))


def make_forms(download: Path, where: Path) -> dict[str, Path]:
    """The same download as Kaggle serves it in each accepted form."""
    forms = {"folders": download}
    kaggle_zip = where / "cli" / "ultrasound-nerve-segmentation.zip"
    kaggle_zip.parent.mkdir(parents=True)
    zip_folder(download, kaggle_zip)
    forms["kaggle-zip"] = kaggle_zip
    inner = where / "inner"
    inner.mkdir()
    for name in ("train", "test"):
        zip_folder(download / name, inner / f"{name}.zip", prefix=f"{name}/")
    for name in ("train_masks.csv", "sample_submission.csv"):
        with zipfile.ZipFile(inner / f"{name}.zip", "w") as out:
            out.write(download / name, name)
    forms["inner-zips"] = inner
    nested = where / "nested" / "ultrasound-nerve-segmentation.zip"
    nested.parent.mkdir()
    zip_folder(inner, nested)
    forms["zip-of-inner-zips"] = nested
    return forms


def read_manifest(clean: Path) -> dict[str, dict]:
    with open(clean / "manifest.csv", newline="") as file:
        return {row["id"]: row for row in csv.DictReader(file)}


def clean_contents(clean: Path) -> dict[str, str]:
    """The hashes of a clean copy's files, less what names the source (cleaning.json, the manifest's original
    paths): equal for every form of one download."""
    hashes = tree_hashes(clean)
    hashes.pop("cleaning.json")
    rows = [{k: v for k, v in row.items() if not k.startswith("original_")} for row in read_manifest(clean).values()]
    hashes["manifest.csv"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return hashes


@pytest.mark.slow
def test_every_form_gives_the_same_clean_copy(tiny_download, tmp_path):
    download, planted = tiny_download
    forms = make_forms(download, tmp_path / "forms")
    originals = {name: tree_hashes(path) if path.is_dir() else tree_hashes(path.parent) for name, path in forms.items()}
    cleaned = {}
    for name, source in forms.items():
        output = tmp_path / f"clean-{name}"
        result = run_script(
            "data_cleaning.py", "--source", str(source), "--output", str(output), "--quiet", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert "24 training ids found" in result.stdout
        cleaned[name] = clean_contents(output)
    first = cleaned["folders"]
    for name, hashes in cleaned.items():
        assert hashes == first, f"{name} differs from the folder form"
    for name, path in forms.items():
        assert (tree_hashes(path) if path.is_dir() else tree_hashes(path.parent)) == originals[name]
    manifest = read_manifest(tmp_path / "clean-folders")
    assert len(manifest) == 24
    row = manifest["1_1"]
    assert row["image"] == "images/1_1.tif" and row["mask"] == "masks/1_1.tif"
    assert (tmp_path / "clean-folders" / "test" / "4.tif").is_file()
    assert sum(r["kept"] == "1" for r in manifest.values()) == 24 - len(planted)


@pytest.mark.slow
def test_clean_copy_is_exact_and_a_second_run_changes_nothing(tiny_download, tmp_path):
    download, _ = tiny_download
    output = tmp_path / "clean"
    first = run_script("data_cleaning.py", "--source", str(download), "--output", str(output), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (output / "images" / "2_3.tif").read_bytes() == (download / "train" / "2_3.tif").read_bytes()
    assert (output / "masks" / "2_3.tif").read_bytes() == (download / "train" / "2_3_mask.tif").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    second = run_script("data_cleaning.py", "--source", str(download), "--output", str(output), cwd=tmp_path)
    assert second.returncode == 0
    assert "nothing to do" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before


@pytest.mark.slow
def test_planted_contradictions_are_found_and_each_policy_does_what_it_says(tiny_download, tmp_path):
    download, planted = tiny_download
    assert planted
    outcomes = {}
    for policy in ("drop-empty", "drop-both", "keep"):
        output = tmp_path / policy
        result = run_script(
            "data_cleaning.py",
            "--source",
            str(download),
            "--output",
            str(output),
            "--duplicates",
            policy,
            "--quiet",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        outcomes[policy] = read_manifest(output)
    for with_mask, empty in planted:
        for manifest in outcomes.values():
            assert manifest[with_mask]["duplicate_of"] == empty and manifest[empty]["duplicate_of"] == with_mask
            assert float(manifest[empty]["similarity"]) >= 0.99
        assert (outcomes["drop-empty"][with_mask]["kept"], outcomes["drop-empty"][empty]["kept"]) == ("1", "0")
        assert (outcomes["drop-both"][with_mask]["kept"], outcomes["drop-both"][empty]["kept"]) == ("0", "0")
        assert (outcomes["keep"][with_mask]["kept"], outcomes["keep"][empty]["kept"]) == ("1", "1")
    flagged = {row["id"] for row in outcomes["keep"].values() if row["duplicate_of"]}
    assert flagged == {name for pair in planted for name in pair}, "an ordinary frame was flagged as a twin"


def copy_download(download: Path, where: Path) -> Path:
    target = where / "download"
    shutil.copytree(download, target)
    return target


def save_tiff(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(pixels, mode).save(path, compression="tiff_lzw")


BAD_INPUTS = {
    "truncated image": (
        lambda t: t.joinpath("1_1.tif").write_bytes(t.joinpath("1_1.tif").read_bytes()[:3000]),
        "1_1",
        "cannot be decoded",
    ),
    "zero-byte image": (lambda t: t.joinpath("1_2.tif").write_bytes(b""), "1_2", "empty file"),
    "missing mask": (lambda t: t.joinpath("1_3_mask.tif").unlink(), "1_3", "has no mask"),
    "orphan mask": (lambda t: t.joinpath("1_4.tif").unlink(), "1_4", "has no image"),
    "size mismatch": (
        lambda t: save_tiff(t / "2_1_mask.tif", np.zeros((400, 580), np.uint8)),
        "2_1",
        "580x400, its image is 580x420",
    ),
    "non-binary mask": (
        lambda t: save_tiff(t / "2_2_mask.tif", np.full((420, 580), 128, np.uint8)),
        "2_2",
        "not binary",
    ),
    "RGB image": (lambda t: save_tiff(t / "2_3.tif", np.zeros((420, 580, 3), np.uint8)), "2_3", "mode RGB"),
    "PNG named .tif": (
        lambda t: Image.fromarray(np.zeros((420, 580), np.uint8)).save(t / "2_4.tif", format="PNG"),
        "2_4",
        "PNG file, not a TIFF",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_pair_is_skipped_with_its_reason_and_strict_stops(case, tiny_download, tmp_path):
    download = copy_download(tiny_download[0], tmp_path)
    damage, bad_id, reason = BAD_INPUTS[case]
    damage(download / "train")
    (download / "train_masks.csv").unlink()  # the damaged masks would also disagree with it
    originals = tree_hashes(download)
    output = tmp_path / "clean"
    result = run_script("data_cleaning.py", "--source", str(download), "--output", str(output), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert reason in result.stderr and "Traceback" not in result.stderr
    row = read_manifest(output)[bad_id]
    assert row["kept"] == "0" and reason in row["reason"]
    assert not (output / "images" / f"{bad_id}.tif").exists()
    strict = run_script(
        "data_cleaning.py",
        "--source",
        str(download),
        "--output",
        str(tmp_path / "strict"),
        "--strict",
        "--quiet",
        cwd=tmp_path,
    )
    assert strict.returncode != 0 and reason in strict.stderr and "Traceback" not in strict.stderr
    assert not (tmp_path / "strict").exists()
    assert tree_hashes(download) == originals


@pytest.mark.slow
def test_a_zero_one_mask_is_repaired(tiny_download, tmp_path):
    download = copy_download(tiny_download[0], tmp_path)
    mask_path = download / "train" / "3_2_mask.tif"
    mask = np.asarray(Image.open(mask_path))
    save_tiff(mask_path, (mask > 0).astype(np.uint8))
    output = tmp_path / "clean"
    result = run_script("data_cleaning.py", "--source", str(download), "--output", str(output), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_manifest(output)["3_2"]["kept"] == "1"
    assert np.array_equal(np.asarray(Image.open(output / "masks" / "3_2.tif")), mask)


@pytest.mark.slow
def test_a_mask_that_disagrees_with_train_masks_csv_is_reported(tiny_download, tmp_path):
    download = copy_download(tiny_download[0], tmp_path)
    rows = (download / "train_masks.csv").read_text().splitlines()
    rows = [row if not row.startswith("4,1,") else "4,1,1 5" for row in rows]
    (download / "train_masks.csv").write_text("\n".join(rows) + "\n")
    output = tmp_path / "clean"
    result = run_script("data_cleaning.py", "--source", str(download), "--output", str(output), "--quiet", cwd=tmp_path)
    assert result.returncode == 0
    assert "differs from its train_masks.csv row" in read_manifest(output)["4_1"]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["../evil.txt", "/tmp/evil.txt", "link"])
def test_an_archive_with_an_unsafe_entry_is_refused(entry, tiny_download, tmp_path):
    archive = tmp_path / "ultrasound-nerve-segmentation.zip"
    zip_folder(tiny_download[0], archive)
    with zipfile.ZipFile(archive, "a") as out:
        info = zipfile.ZipInfo(entry)
        if entry == "link":
            info.external_attr = 0o120777 << 16  # a symbolic link
        out.writestr(info, "../../etc/passwd" if entry == "link" else "boom")
    result = run_script("data_cleaning.py", "--source", str(archive), "--output", str(tmp_path / "clean"), cwd=tmp_path)
    assert result.returncode != 0
    assert "refusing to read this archive" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "clean").exists() and not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.slow
def test_an_empty_or_missing_source_says_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in ("empty", "missing"):
        result = run_script("data_cleaning.py", "--source", source, cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "train" in result.stderr and source in result.stderr


@pytest.mark.slow
def test_an_output_holding_another_clean_is_not_mixed(tiny_download, train_download, tmp_path):
    output = tmp_path / "clean"
    assert (
        run_script(
            "data_cleaning.py", "--source", str(tiny_download[0]), "--output", str(output), "--quiet", cwd=tmp_path
        ).returncode
        == 0
    )
    before = tree_hashes(output)
    other = run_script(
        "data_cleaning.py", "--source", str(train_download), "--output", str(output), "--quiet", cwd=tmp_path
    )
    assert other.returncode != 0 and "--overwrite true" in other.stderr
    assert tree_hashes(output) == before
    replaced = run_script(
        "data_cleaning.py",
        "--source",
        str(train_download),
        "--output",
        str(output),
        "--quiet",
        "--overwrite",
        "true",
        cwd=tmp_path,
    )
    assert replaced.returncode == 0
    assert len(read_manifest(output)) == 60 and not (output / "images" / "4_6.tif").read_bytes() == b""


@pytest.mark.slow
@needs_kaggle_sample
def test_real_kaggle_files_are_kept_exactly(tmp_path):
    output = tmp_path / "clean"
    result = run_script(
        "data_cleaning.py",
        "--source",
        str(KAGGLE_SAMPLE),
        "--output",
        str(output),
        "--duplicates",
        "keep",
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(output)
    assert len(manifest) == 55 and all(row["kept"] == "1" for row in manifest.values())
    with open(KAGGLE_SAMPLE / "train_masks.csv", newline="") as file:
        rows = {f"{r['subject']}_{r['img']}": r["pixels"] for r in csv.DictReader(file)}
    for name, pixels in rows.items():
        mask = np.asarray(Image.open(output / "masks" / f"{name}.tif"))
        assert np.array_equal(mask, rle_decode(pixels, (420, 580)) * 255)
        original = np.asarray(Image.open(KAGGLE_SAMPLE / "train" / f"{name}.tif"))
        assert np.array_equal(np.asarray(Image.open(output / "images" / f"{name}.tif")), original)
    assert int(manifest["1_1"]["mask_area"]) == int(np.count_nonzero(rle_decode(rows["1_1"], (420, 580))))
    assert manifest["1_9"]["duplicate_of"] == "1_14", "the known contradictory twin of the real data"


@pytest.mark.slow
def test_help_lists_every_setting_with_its_default(tmp_path):
    result = run_script("data_cleaning.py", "-h", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--source", "--output", "--duplicates", "--similarity", "--strict", "--demo", "--overwrite"):
        assert option in result.stdout
    assert "default: drop-empty" in result.stdout


def test_zip_reader_never_writes_entries(tmp_path):
    """Reading a member goes through memory, so the archive's names never become paths."""
    from nerveseg.cleaning.sources import ArchiveCache, Locator

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("train/1_1.tif", b"data")
    assert ArchiveCache().read(Locator(str(archive), "train/1_1.tif")) == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


# Archives read by several worker processes at once (issue: the Kaggle CLI zip crashed the default run).
# The Kaggle CLI writes sample_submission.csv and train_masks.csv first, then test/ and train/: the parent
# read the CSV, and the workers it forked then shared its file offset and read each other's bytes. These
# orders put the CSVs before, between and after the images; each is cleaned by several workers at once.
MEMBER_ORDERS = {
    "kaggle-cli": ("sample_submission.csv", "train_masks.csv", "test/", "train/"),
    "train-first": ("train/", "test/", "train_masks.csv", "sample_submission.csv"),
    "csv-between": ("test/", "train_masks.csv", "train/", "sample_submission.csv"),
}


def zip_in_order(download: Path, archive: Path, order: tuple[str, ...]) -> None:
    """Zip a download with deflate, as the Kaggle CLI does, its members grouped in `order`."""
    files = sorted(p.relative_to(download).as_posix() for p in download.rglob("*") if p.is_file())
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for group in order:
            for name in files:
                if name == group or (group.endswith("/") and name.startswith(group)):
                    out.write(download / name, name)


def clean_in_process(source: Path, output: Path, workers: int) -> dict[str, str]:
    """Clean `source` with `workers` processes (0: the default, one per core); the clean copy's hashes."""
    from nerveseg.cleaning.clean_copy import CleaningOptions
    from nerveseg.cleaning.pipeline import clean_download
    from nerveseg.cleaning.sources import find_download, scratch_folder

    with scratch_folder() as scratch:
        download = find_download(source, Path(scratch))
        clean_download(download, output, CleaningOptions(workers=workers, quiet=True), overwrite=False)
    return clean_contents(output)


@pytest.fixture(scope="module")
def medium_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic download of 240 pairs and 60 test images: several chunks of work for every worker."""
    from nerveseg.cleaning import synthetic

    root = tmp_path_factory.mktemp("medium") / "download"
    spec = synthetic.SyntheticSpec(n_subjects=8, frames_per_subject=30, n_test=60, n_contradictions=3, seed=5)
    synthetic.write_kaggle_download(root, spec, workers=2)
    return root


@pytest.mark.slow  # in process, but 240 pairs cleaned again and again: minutes on 2 busy cores
@pytest.mark.parametrize("workers", [0, 2])
def test_zips_in_any_member_order_clean_like_the_folders_with_several_workers(medium_download, tmp_path, workers):
    expected = clean_in_process(medium_download, tmp_path / "clean-folders", workers=1)
    assert sum(name.startswith("images/") for name in expected) > 200
    for order_name, order in MEMBER_ORDERS.items():
        archive = tmp_path / order_name / "ultrasound-nerve-segmentation.zip"
        zip_in_order(medium_download, archive, order)
        assert clean_in_process(archive.parent, tmp_path / f"clean-{order_name}", workers) == expected, order_name
    # A zip of inner zips (train.zip, test.zip, the CSVs zipped on their own), the CSV zips first.
    inner = tmp_path / "inner"
    for name in ("train", "test"):
        zip_in_order(medium_download, inner / f"{name}.zip", (f"{name}/",))
    for name in ("sample_submission.csv", "train_masks.csv"):
        zip_in_order(medium_download, inner / f"{name}.zip", (name,))
    nested = tmp_path / "nested" / "ultrasound-nerve-segmentation.zip"
    nested.parent.mkdir()
    with zipfile.ZipFile(nested, "w", zipfile.ZIP_DEFLATED) as out:
        for name in ("sample_submission.csv.zip", "train_masks.csv.zip", "test.zip", "train.zip"):
            out.write(inner / name, name)
    assert clean_in_process(nested.parent, tmp_path / "clean-nested", workers) == expected
    assert clean_in_process(inner, tmp_path / "clean-inner", workers) == expected


def pack_real_sample_as_the_kaggle_cli(archive: Path, order: tuple[str, ...]) -> Path:
    """The real sample as a download: train/, train_masks.csv, a test/ of its images renamed <n>.tif, and a
    sample_submission.csv; zipped in `order`. Returns the unzipped folder too."""
    folder = archive.parent / "unzipped"
    shutil.copytree(KAGGLE_SAMPLE / "train", folder / "train")
    shutil.copy(KAGGLE_SAMPLE / "train_masks.csv", folder / "train_masks.csv")
    (folder / "test").mkdir()
    images = sorted(p for p in (KAGGLE_SAMPLE / "train").glob("*.tif") if not p.stem.endswith("_mask"))
    for number, path in enumerate(images, 1):
        shutil.copy(path, folder / "test" / f"{number}.tif")
    (folder / "sample_submission.csv").write_text("img,pixels\n" + "".join(f"{n},1 1\n" for n in range(1, 56)))
    zip_in_order(folder, archive, order)
    return folder


@pytest.mark.slow
@needs_kaggle_sample
def test_the_real_sample_zipped_by_the_kaggle_cli_cleans_with_the_default_workers(tmp_path):
    archive = tmp_path / "data" / "ultrasound-nerve-segmentation.zip"
    folder = pack_real_sample_as_the_kaggle_cli(archive, MEMBER_ORDERS["kaggle-cli"])
    shutil.move(folder, tmp_path / "unzipped")
    result = run_script("data_cleaning.py", "--quiet", cwd=tmp_path)  # exactly what a new user runs
    assert result.returncode == 0, result.stderr
    assert "53 pairs kept" in result.stdout and "55 kept" in result.stdout
    again = run_script("data_cleaning.py", "--quiet", cwd=tmp_path)  # data/ now holds data/clean too
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    expected = clean_in_process(tmp_path / "unzipped", tmp_path / "clean-folders", workers=1)
    assert clean_contents(tmp_path / "data" / "clean") == expected
    for order_name, order in MEMBER_ORDERS.items():
        other = tmp_path / order_name / "ultrasound-nerve-segmentation.zip"
        zip_in_order(tmp_path / "unzipped", other, order)
        assert clean_in_process(other.parent, tmp_path / f"clean-{order_name}", workers=2) == expected, order_name


def test_an_archive_opened_before_a_fork_is_not_used_by_the_child(tmp_path):
    """The child opens its own handle: reading in the parent and the child at once cannot interfere."""
    from nerveseg.cleaning.sources import ArchiveCache, Locator

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("x", b"data")
    cache = ArchiveCache()
    assert cache.read(Locator(str(archive), "x")) == b"data"
    inherited = cache.archives[str(archive)]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports whether it used the parent's handle
        same = cache.read(Locator(str(archive), "x")) == b"data" and cache.archives[str(archive)] is inherited
        os.write(write, b"shared" if same else b"own")
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 16) == b"own"
    assert cache.archives[str(archive)] is inherited and not inherited.fp.closed  # the parent's stays usable
    cache.close()


def test_an_unforeseen_failure_in_a_worker_is_one_line_naming_the_file(tiny_download, tmp_path, monkeypatch):
    from nerveseg.cleaning import kaggle_checks
    from nerveseg.errors import UserError

    def broken(pixels):
        raise MemoryError("simulated")

    monkeypatch.setattr(kaggle_checks, "thumbnail_feature", broken)  # forked workers inherit the patch
    with pytest.raises(UserError) as caught:
        clean_in_process(tiny_download[0], tmp_path / "clean", workers=2)
    message = str(caught.value)
    assert "verifying" in message and "_mask.tif" not in message.split(" failed")[0]
    assert "train/1_1.tif" in message or ".tif" in message
    assert "MemoryError: simulated" in message and "--workers 1" in message
    assert not (tmp_path / "clean").exists()


@pytest.mark.slow
def test_a_damaged_member_is_named_and_skipped(tiny_download, tmp_path):
    archive = tmp_path / "src" / "ultrasound-nerve-segmentation.zip"
    zip_in_order(tiny_download[0], archive, MEMBER_ORDERS["kaggle-cli"])
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo("train/1_2.tif")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    data[start : start + 20] = bytes(20)  # damage the compressed bytes of one member
    archive.write_bytes(bytes(data))
    result = run_script("data_cleaning.py", "--source", str(archive.parent), "--output", "clean", "--quiet",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train/1_2.tif cannot be read" in result.stderr and "re-download" in result.stderr
    assert "Traceback" not in result.stderr
    manifest = read_manifest(tmp_path / "clean")
    assert manifest["1_2"]["kept"] == "0" and manifest["1_1"]["kept"] == "1"
