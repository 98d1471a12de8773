"""Stage 1: data_cleaning.py on every form of the download, its checks, its policies, its safety."""

import csv
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.rle import rle_decode
from tests.conftest import KAGGLE_SAMPLE, needs_kaggle_sample, run_script, tree_hashes


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
        cleaned[name] = tree_hashes(output)
        cleaned[name].pop("cleaning.json")  # names the source, so it differs between forms
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


def test_a_mask_that_disagrees_with_train_masks_csv_is_reported(tiny_download, tmp_path):
    download = copy_download(tiny_download[0], tmp_path)
    rows = (download / "train_masks.csv").read_text().splitlines()
    rows = [row if not row.startswith("4,1,") else "4,1,1 5" for row in rows]
    (download / "train_masks.csv").write_text("\n".join(rows) + "\n")
    output = tmp_path / "clean"
    result = run_script("data_cleaning.py", "--source", str(download), "--output", str(output), "--quiet", cwd=tmp_path)
    assert result.returncode == 0
    assert "differs from its train_masks.csv row" in read_manifest(output)["4_1"]["reason"]


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


def test_an_empty_or_missing_source_says_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in ("empty", "missing"):
        result = run_script("data_cleaning.py", "--source", source, cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "train" in result.stderr and source in result.stderr


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


def test_help_lists_every_setting_with_its_default(tmp_path):
    result = run_script("data_cleaning.py", "-h", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--source", "--output", "--duplicates", "--similarity", "--strict", "--demo", "--overwrite"):
        assert option in result.stdout
    assert "default: drop-empty" in result.stdout


def test_zip_reader_never_writes_entries(tmp_path):
    """Reading a member goes through memory, so the archive's names never become paths."""
    from nerveseg.sources import ArchiveCache, Locator

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("train/1_1.tif", b"data")
    assert ArchiveCache().read(Locator(str(archive), "train/1_1.tif")) == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]
