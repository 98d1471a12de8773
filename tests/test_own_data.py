"""Your own data: data_cleaning.py on image/mask folders in every layout, format and kind of mask, subjects and
held-out subjects, the bad cases; then train.py and predict.py on the clean copy and on nested folders."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.data import read_manifest, split_by_subject
from nerveseg.errors import UserError
from nerveseg.images import COLOUR, MaskValues, mask_labels, parse_mask_values, target_pixels, to_grayscale
from nerveseg.inputs import images_to_segment, natural_key
from tests.helpers import FAST_TRAINING, SHARED_DATA, assert_user_error, run_script, tree_hashes

BUS_UCLM = SHARED_DATA / "bus-uclm"
SUBJECT_PATTERN = "P(?P<subject>[0-9]+)_"  # own names are P<subject>_<frame>, maybe below a class folder


def kaggle_pairs(download: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(own name, image, 0/255 mask) of every pair of a synthetic Kaggle download, named P<subject>_<frame>."""
    pairs = []
    for mask_path in sorted((download / "train").glob("*_mask.tif")):
        subject, frame = mask_path.name.split("_")[:2]
        image = np.asarray(Image.open(mask_path.with_name(f"{subject}_{frame}.tif")))
        pairs.append((f"P{subject}_{int(frame):03d}", image, np.asarray(Image.open(mask_path))))
    return pairs


def write_own(root: Path, pairs: list, layout: str) -> None:
    """The pairs as PNG files in one of the own-data layouts."""
    for name, image, mask in pairs:
        group = "lesion" if mask.any() else "normal"
        image_path, mask_path = {
            "images-masks": (f"images/{name}.png", f"masks/{name}.png"),
            "suffix": (f"{name}.png", f"{name}_mask.png"),
            "class-folders": (f"{group}/{name}.png", f"{group}/{name}_mask.png"),
            "class-images-masks": (f"{group}/images/{name}.png", f"{group}/masks/{name}_mask.png"),
        }[layout]
        for relative, pixels in ((image_path, image), (mask_path, mask)):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / relative)


def clean(source: Path, output: Path, *options: str) -> tuple:
    """Run data_cleaning.py; return (result, manifest rows by id)."""
    result = run_script("data_cleaning.py", "--source", str(source), "--output", str(output), "--quiet", *options,
                        cwd=output.parent)
    rows = {}
    if result.returncode == 0:
        with open(output / "manifest.csv", newline="") as file:
            rows = {row["id"]: row for row in csv.DictReader(file)}
    return result, rows


@pytest.fixture(scope="module")
def own_pairs(tiny_download) -> list:
    return kaggle_pairs(tiny_download[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["images-masks", "suffix", "class-folders", "class-images-masks"])
def test_every_layout_is_found_and_cleaned_exactly(layout, own_pairs, tiny_download, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs, layout)
    before = tree_hashes(source)
    result, rows = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN)
    assert result.returncode == 0, result.stderr
    expected_layout = "suffix" if layout in ("suffix", "class-folders") else "images-masks"
    assert f"24 images (layout {expected_layout})" in result.stdout and "from 4 subjects" in result.stdout
    assert tree_hashes(source) == before  # the originals are only read
    by_name = {identifier.rpartition("/")[2]: row for identifier, row in rows.items()}
    assert len(by_name) == 24 and sum(row["kept"] == "1" for row in rows.values()) == 24 - len(tiny_download[1])
    for name, image, mask in own_pairs:
        row = by_name[name]
        assert row["subject"] == name[1:].split("_")[0]
        if row["kept"] == "1":
            assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / row["image"])), image)
            assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / row["mask"])), mask)
            assert row["split"] == "train" and Path(row["original_image"]).is_file()
    assert "warning" not in result.stderr


@pytest.mark.slow
def test_a_clean_of_own_data_trains_and_predicts_the_held_out_subjects(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs, "class-folders")
    for path in source.rglob(f"{own_pairs[0][0]}*.png"):  # one pair of another size and shape
        Image.open(path).resize((300, 260), Image.Resampling.NEAREST).save(path)
    result, rows = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN, "--hold-out", "0.25")
    assert result.returncode == 0, result.stderr
    assert "Image sizes from 300x260 to 580x420" in result.stdout
    held = {row["subject"] for row in rows.values() if row["split"] == "held-out"}
    trained = {row["subject"] for row in rows.values() if row["split"] == "train"}
    assert len(held) == 1 and held.isdisjoint(trained) and "Held out: " in result.stdout
    items = read_manifest(tmp_path / "clean")
    assert {item["subject"] for item in items} == trained
    held_out = tmp_path / "clean" / "held-out"
    assert len(list((held_out / "images").rglob("*.png"))) == sum(r["split"] == "held-out" for r in rows.values())
    trained_run = run_script("train.py", "--data-dir", str(tmp_path / "clean"), "--max-epochs", "1", *FAST_TRAINING,
                             cwd=tmp_path)
    assert trained_run.returncode == 0, trained_run.stderr
    no_test_set = run_script("predict.py", "--input", str(tmp_path / "clean" / "test"), cwd=tmp_path)
    assert no_test_set.returncode == 1 and f"--input {held_out / 'images'} --masks" in no_test_set.stderr
    predicted = run_script("predict.py", "--input", str(held_out / "images"), "--masks", str(held_out / "masks"),
                           "--output", "out", "--quiet", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert "Kaggle Dice" in predicted.stdout and "all-empty baseline" in predicted.stdout
    written = sorted(p.relative_to(tmp_path / "out" / "masks") for p in (tmp_path / "out" / "masks").rglob("*.png"))
    assert written == sorted(p.relative_to(held_out / "images") for p in (held_out / "images").rglob("*.png"))
    assert not (tmp_path / "out" / "submission.csv").exists()  # not a Kaggle test set
    for path in (held_out / "images").rglob("*.png"):
        written = tmp_path / "out" / "masks" / path.relative_to(held_out / "images")
        assert Image.open(written).size == Image.open(path).size


@pytest.mark.slow
def test_formats_and_modes_are_converted_and_said_once(own_pairs, tmp_path):
    source = tmp_path / "mine"
    (source / "images").mkdir(parents=True)
    (source / "masks").mkdir()
    pairs = own_pairs[:6]
    palette = Image.frombytes("P", pairs[2][1].shape[::-1], pairs[2][1].tobytes())
    palette.putpalette([level for grey in range(256) for level in (grey, grey, grey)])
    images = {
        "P1_001.tif": Image.fromarray(pairs[0][1]).convert("RGB"),
        "P1_002.png": Image.fromarray(pairs[1][1]).convert("RGBA"),
        "P1_003.png": palette,
        "P2_001.png": Image.fromarray(pairs[3][1].astype(np.uint16) * 200 + 1000),  # 16-bit
        "P2_002.bmp": Image.fromarray(pairs[4][1]),
        "P2_003.jpg": Image.fromarray(pairs[5][1]),
    }
    masks = [
        Image.fromarray((pairs[0][2] > 0).astype(np.uint8)),  # 0/1
        Image.fromarray(pairs[1][2]).convert("1"),  # 1-bit
        Image.fromarray(np.stack([pairs[2][2], pairs[2][2] * 0, pairs[2][2] * 0], -1)),  # red on black
        Image.fromarray(pairs[3][2]).convert("P"),  # palette
        Image.fromarray(pairs[4][2].astype(np.uint16) * 257),  # 16-bit 0/65535
        Image.fromarray(pairs[5][2]),
    ]
    for (name, image), mask in zip(images.items(), masks, strict=True):
        image.save(source / "images" / name)
        mask.save(source / "masks" / f"{Path(name).stem}.png")
    result, rows = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN, "--duplicates", "keep")
    assert result.returncode == 0, result.stderr
    assert "Converted to 8-bit grayscale: 1 RGB, 1 RGBA, 1 P, 1 I;16" in result.stdout
    for (name, image), pair in zip(images.items(), pairs, strict=True):
        row = rows[Path(name).stem]
        assert row["kept"] == "1", row["reason"]
        stored = np.asarray(Image.open(tmp_path / "clean" / row["image"]))
        if name.endswith(".jpg"):  # lossy: the clean copy holds the decoded JPEG exactly
            assert np.array_equal(stored, np.asarray(Image.open(source / "images" / name)))
        elif image.mode == "I;16":
            assert stored.min() == 0 and stored.max() == 255  # stretched
            assert np.array_equal(stored, np.asarray(to_grayscale(Image.open(source / "images" / name))))
        else:
            assert np.array_equal(stored, pair[1])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / row["mask"])), pair[2])


@pytest.mark.slow
def test_several_mask_values_need_the_target_named(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs[:6], "images-masks")
    name, _, mask = next(pair for pair in own_pairs[:6] if pair[2].any())
    two_labels = (mask > 0).astype(np.uint8)
    two_labels[:, :40] = 2  # a second structure
    Image.fromarray(two_labels).save(source / "masks" / f"{name}.png")
    result, _ = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hold more than one non-zero value" in result.stderr and "Values found: 1 (in 1 masks), 2" in result.stderr
    assert "--mask-values" in result.stderr and not (tmp_path / "clean").exists()
    result, rows = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN, "--mask-values", "2")
    assert result.returncode == 0, result.stderr
    stored = np.asarray(Image.open(tmp_path / "clean" / rows[name]["mask"]))
    assert np.array_equal(stored > 0, two_labels == 2)
    assert all(row["mask_area"] == "0" for other, row in rows.items() if other != name)  # 255 is not named


@pytest.mark.slow
def test_extra_masks_of_one_image_are_merged(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs[:4], "suffix")
    name, _, mask = next(pair for pair in own_pairs[:4] if pair[2].any())
    extra = np.zeros_like(mask)
    extra[:20, :20] = 255
    Image.fromarray(extra).save(source / f"{name}_mask_1.png")
    result, rows = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN)
    assert result.returncode == 0, result.stderr
    assert rows[name]["reason"] == "2 mask files merged"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / rows[name]["mask"])), np.maximum(mask, extra))


@pytest.mark.slow
def test_bad_pairs_are_named_and_skipped(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs[:8], "images-masks")
    names = [pair[0] for pair in own_pairs[:8]]
    (source / "masks" / f"{names[0]}.png").unlink()  # an image without a mask
    (source / "images" / f"{names[1]}.png").unlink()  # a mask without an image
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(source / "masks" / f"{names[2]}.png")  # another size
    (source / "images" / f"{names[3]}.png").write_bytes(b"not an image")
    Image.fromarray(own_pairs[4][1]).save(source / "images" / f"{names[4]}.jpg")  # a second image of one id
    result, rows = clean(source, tmp_path / "clean", "--subjects", SUBJECT_PATTERN)
    assert result.returncode == 0, result.stderr
    reasons = {name: rows[name]["reason"] for name in names[:5]}
    assert reasons[names[0]].startswith("image ") and reasons[names[0]].endswith("has no mask")
    assert reasons[names[1]].startswith("mask ") and reasons[names[1]].endswith("has no image")
    assert f"is 40x30, its image is {own_pairs[2][1].shape[1]}x{own_pairs[2][1].shape[0]}" in reasons[names[2]]
    assert "cannot be decoded" in reasons[names[3]]
    assert "was found 2 times" in reasons[names[4]] and "keep only one" in reasons[names[4]]
    assert all(rows[name]["kept"] == "0" for name in names[:5]) and all(rows[n]["kept"] == "1" for n in names[5:])
    for reason in reasons.values():
        assert f"skipped: {reason}" in result.stderr
    strict, _ = clean(source, tmp_path / "strict", "--subjects", SUBJECT_PATTERN, "--strict", "true")
    assert strict.returncode == 1 and "--strict: 5 problem(s)" in strict.stderr


@pytest.mark.slow
def test_an_ambiguous_unrecognised_or_empty_source_says_what_it_found(own_pairs, tmp_path):
    both = tmp_path / "both"
    write_own(both, own_pairs[:4], "images-masks")
    write_own(both / "more", own_pairs[4:8], "suffix")
    result, _ = clean(both, tmp_path / "clean")
    assert result.returncode == 1 and "holds more than one layout" in result.stderr
    assert "--layout images-masks or --layout suffix" in result.stderr
    chosen, rows = clean(both, tmp_path / "clean", "--layout", "suffix", "--subjects", SUBJECT_PATTERN)
    assert chosen.returncode == 0 and len(rows) == 4 and all(i.startswith("more/") for i in rows)
    no_masks = tmp_path / "no-masks"
    no_masks.mkdir()
    for name, image, _ in own_pairs[:3]:
        Image.fromarray(image).save(no_masks / f"{name}.png")
    result, _ = clean(no_masks, tmp_path / "clean2")
    assert result.returncode == 1 and "found no image/mask pairs" in result.stderr
    assert "3 image files: 3 .png in ./" in result.stderr and "--mask-suffix" in result.stderr
    (tmp_path / "empty").mkdir()
    result, _ = clean(tmp_path / "empty", tmp_path / "clean3")
    assert result.returncode == 1 and "it is empty" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_subjects_come_from_a_csv_a_pattern_or_each_image_with_a_warning(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs, "images-masks")
    table = tmp_path / "subjects.csv"
    table.write_text("File;Patient\n" + "".join(f"{name}.png;patient-{name[1]}\n" for name, _, _ in own_pairs[:-1]))
    result, rows = clean(source, tmp_path / "by-csv", "--subjects", str(table))
    assert result.returncode == 0, result.stderr
    assert rows[own_pairs[0][0]]["subject"] == "patient-1"
    assert rows[own_pairs[-1][0]]["reason"] == f"{own_pairs[-1][0]}: no subject found for it by --subjects"
    result, rows = clean(source, tmp_path / "each", "--duplicates", "keep")
    assert result.returncode == 0 and len({row["subject"] for row in rows.values()}) == 24
    assert "warning: no --subjects given" in result.stderr
    assert "--subjects '^(?P<subject>[A-Za-z0-9]+)[_-]'" in result.stderr  # P1_001: a suggestion that works
    bad_pattern, _ = clean(source, tmp_path / "bad", "--subjects", "P[0-9]+")
    assert bad_pattern.returncode == 1 and "(?P<subject>...)" in bad_pattern.stderr
    bad_csv = tmp_path / "info.csv"
    bad_csv.write_text("Image;Label\nP1_001.png;Benign\n")
    result, _ = clean(source, tmp_path / "bad2", "--subjects", str(bad_csv))
    assert result.returncode == 1 and "its columns are image, label" in result.stderr


@pytest.mark.slow
def test_near_duplicates_are_found_across_images_when_subjects_are_unknown(own_pairs, tiny_download, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs, "images-masks")
    result, rows = clean(source, tmp_path / "clean")
    assert result.returncode == 0, result.stderr
    assert f"{len(tiny_download[1])} pairs found, policy drop-empty" in result.stdout
    dropped = {name for name, row in rows.items() if "near-duplicate" in row["reason"]}
    planted_empty = {f"P{e.split('_')[0]}_{int(e.split('_')[1]):03d}" for _, e in tiny_download[1]}
    assert dropped == planted_empty


@pytest.mark.slow
def test_predict_reads_nested_folders_and_truths_beside_the_images(trained_run, own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs[:6], "class-folders")
    result = run_script("predict.py", "--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--input",
                        str(source), "--masks", str(source), "--output", "out", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(tmp_path / "out" / "masks").as_posix()
                     for p in (tmp_path / "out" / "masks").rglob("*.png"))
    expected = sorted(f"{'lesion' if mask.any() else 'normal'}/{name}.png" for name, _, mask in own_pairs[:6])
    assert written == expected  # the _mask files are truths, not images
    with open(tmp_path / "out" / "images.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and all(row["dice"] for row in rows)
    assert "on 6 images with truth masks" in result.stdout
    for name, image, _ in own_pairs[:1]:
        group = "lesion" if own_pairs[0][2].any() else "normal"
        assert Image.open(tmp_path / "out" / "masks" / group / f"{name}.png").size == image.shape[::-1]


# Units: pixels and masks --------------------------------------------------------------------------------------
GRAY = np.array([[0, 10], [200, 255]], np.uint8)
GRAYSCALE_CASES = {
    "L": (Image.fromarray(GRAY), GRAY),
    "RGB of grey": (Image.fromarray(GRAY).convert("RGB"), GRAY),
    "LA": (Image.fromarray(GRAY).convert("LA"), GRAY),
    "16-bit stretched": (Image.fromarray(np.array([[1000, 1100], [1200, 1510]], np.uint16)),
                         np.array([[0, 50], [100, 255]], np.uint8)),
    "constant 16-bit": (Image.fromarray(np.full((2, 2), 7, np.uint16)), np.zeros((2, 2), np.uint8)),
    "1-bit": (Image.fromarray(GRAY > 100), np.array([[0, 0], [255, 255]], np.uint8)),
}


@pytest.mark.parametrize("case", sorted(GRAYSCALE_CASES))
def test_to_grayscale(case):
    image, expected = GRAYSCALE_CASES[case]
    converted = to_grayscale(image)
    assert converted.mode == "L" and np.array_equal(np.asarray(converted), expected)


RED, GREEN = COLOUR + 0xFF0000, COLOUR + 0x00FF00
MASK_CASES = [  # (labels, --mask-values, the target or None when it must be named, the values reported)
    (np.array([0, 255]), "", [False, True], []),
    (np.array([0, 1, 1]), "", [False, True, True], []),
    (np.array([0, 1, 2]), "", None, [1, 2]),
    (np.array([0, 1, 2]), "any", [False, True, True], []),
    (np.array([0, 1, 2]), "2", [False, False, True], []),
    (np.array([0, 100, 200, 255]), "128-255", [False, False, True, True], []),
    (np.array([0, RED, GREEN]), "#ff0000", [False, True, False], []),
    (np.array([0, RED, GREEN]), "", None, [GREEN, RED]),
]


@pytest.mark.parametrize(("labels", "values", "target", "several"), MASK_CASES)
def test_target_pixels(labels, values, target, several):
    found, reported = target_pixels(labels, parse_mask_values(values))
    assert (found is None) == (target is None) and reported == several
    if target is not None:
        assert found.tolist() == target


def test_mask_labels_tell_colours_from_greys():
    colour = np.zeros((1, 3, 3), np.uint8)
    colour[0, 1] = (255, 0, 0)
    colour[0, 2] = (0, 255, 0)
    assert mask_labels(Image.fromarray(colour)).tolist() == [[0, RED, GREEN]]
    assert mask_labels(Image.fromarray(np.full((1, 2, 3), 255, np.uint8))).tolist() == [[255, 255]]


@pytest.mark.parametrize("text", ["0", "5-2", "red", "#ff00", "1,,x"])
def test_bad_mask_values_are_refused_with_the_forms(text):
    with pytest.raises(UserError, match="--mask-values"):
        parse_mask_values(text)


def test_mask_values_accept_lists_ranges_and_colours():
    assert parse_mask_values("1, 3-4 #00ff00") == MaskValues("1, 3-4 #00ff00", ((1, 1), (3, 4), (GREEN, GREEN)))


def test_images_to_segment_skips_truths_beside_their_image_and_refuses_two_of_one_name(tmp_path):
    for name in ("a.png", "a_mask.png", "b_mask.png", "sub/c.tif", "x/images/d.png", "x/masks/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(GRAY).save(tmp_path / name)
    assert [item["id"] for item in images_to_segment(tmp_path, "_mask")] == ["a", "b_mask", "sub/c", "x/images/d"]
    Image.fromarray(GRAY).save(tmp_path / "a.jpg")
    with pytest.raises(UserError, match="rename one"):
        images_to_segment(tmp_path, "_mask")


# The real breast-ultrasound data, in its own layout -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not BUS_UCLM.is_dir(), reason="../shared/data/bus-uclm is absent")
def test_the_real_bus_uclm_folder_cleans_by_patient(tmp_path):
    result, rows = clean(BUS_UCLM, tmp_path / "clean", "--subjects", "^(?P<subject>[A-Z]{4})_", "--hold-out", "0.25")
    assert result.returncode == 0, result.stderr
    assert "570 images (layout images-masks)" in result.stdout and "570 pairs kept from 30 subjects" in result.stdout
    assert "Converted to 8-bit grayscale: 570 RGB" in result.stdout
    summary = json.loads((tmp_path / "clean" / "cleaning.json").read_text())["summary"]
    assert summary["empty_mask_fraction"] == pytest.approx(364 / 570, abs=1e-4)
    assert summary["held_out_subjects"] == 8
    row = rows["ALWI_000"]
    original = np.asarray(Image.open(BUS_UCLM / "images" / "ALWI_000.jpg").convert("L"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / row["image"])), original)
    truth = np.asarray(Image.open(BUS_UCLM / "masks" / "ALWI_000.png")) > 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / row["mask"])) > 0, truth)
    train, _ = split_by_subject(read_manifest(tmp_path / "clean"), 0.2, seed=0)
    assert {item["subject"] for item in train}.isdisjoint({r["subject"] for r in rows.values()
                                                           if r["split"] == "held-out"})


# %% Awkward inputs: rotated, float, multi-frame, too large, symbolic links, named pipes, unclear sources


def upright_jpeg_stored_rotated(path: Path, pixels: np.ndarray) -> None:
    """`pixels` as a JPEG stored turned a quarter left, with the EXIF orientation (6) that shows it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(np.rot90(pixels)).save(path, quality=95, exif=exif)


@pytest.fixture(scope="module")
def awkward_clean(own_pairs, tmp_path_factory) -> tuple:
    """A suffix-layout source with a rotated JPEG, a float TIFF with a NaN, a 3-frame TIFF, a class folder that is
    a symbolic link and a link back up the tree; cleaned."""
    where = tmp_path_factory.mktemp("awkward")
    source, elsewhere = where / "mine", where / "elsewhere"
    (source / "normal").mkdir(parents=True)
    elsewhere.mkdir()
    (name0, image0, mask0), (name1, image1, mask1), (name2, image2, mask2), (name3, image3, mask3) = own_pairs[:4]
    upright_jpeg_stored_rotated(source / "normal" / f"{name0}.jpg", image0)
    floats = image1.astype(np.float32) / 7.0
    floats[5, 5] = np.nan
    Image.fromarray(floats).save(source / "normal" / f"{name1}.tif")
    frames = [Image.fromarray(image2), Image.fromarray(255 - image2), Image.fromarray(image2 // 2)]
    frames[0].save(source / "normal" / f"{name2}.tif", save_all=True, append_images=frames[1:])
    for name, mask in ((name0, mask0), (name1, mask1), (name2, mask2)):
        Image.fromarray(mask).save(source / "normal" / f"{name}_mask.png")
    for name, image, mask in own_pairs[3:6]:
        Image.fromarray(image).save(elsewhere / f"{name}.png")
        Image.fromarray(mask).save(elsewhere / f"{name}_mask.png")
    (source / "linked").symlink_to(elsewhere, target_is_directory=True)
    (source / "normal" / "loop").symlink_to(source, target_is_directory=True)
    result, rows = clean(source, where / "clean")
    return result, rows, where / "clean", own_pairs


@pytest.mark.slow
def test_an_image_is_turned_upright_by_its_exif_orientation(awkward_clean):
    result, rows, clean_copy, pairs = awkward_clean
    assert result.returncode == 0, result.stderr
    row = rows[f"normal/{pairs[0][0]}"]
    assert row["kept"] == "1" and (row["width"], row["height"]) == ("580", "420"), row
    upright = np.asarray(Image.open(clean_copy / row["image"])).astype(int)
    assert upright.shape == (420, 580) and np.abs(upright - pairs[0][1]).mean() < 3  # JPEG's loss only


@pytest.mark.slow
def test_a_float_image_with_a_nan_is_stretched_over_its_finite_pixels(awkward_clean):
    result, rows, clean_copy, pairs = awkward_clean
    row = rows[f"normal/{pairs[1][0]}"]
    assert row["kept"] == "1" and "1 non-finite pixels shown black" in row["reason"], row
    pixels = np.asarray(Image.open(clean_copy / row["image"]))
    assert pixels[5, 5] == 0 and pixels.max() == 255, "the image is not stretched over its finite values"
    original = pairs[1][1].astype(float)
    stretched = np.round((original - original.min()) * 255 / (original.max() - original.min()))
    stretched[5, 5] = 0
    assert np.abs(pixels - stretched).max() <= 1


@pytest.mark.slow
def test_a_multi_frame_image_uses_its_first_frame_and_says_so(awkward_clean):
    result, rows, clean_copy, pairs = awkward_clean
    row = rows[f"normal/{pairs[2][0]}"]
    assert row["kept"] == "1" and "first of 3 frames used" in row["reason"], row
    assert np.array_equal(np.asarray(Image.open(clean_copy / row["image"])), pairs[2][1])


@pytest.mark.slow
def test_an_image_of_too_many_pixels_is_skipped_before_it_is_decoded(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs[:2], "suffix")
    Image.new("L", (600, 500)).save(source / "big.png")
    Image.new("L", (600, 500)).save(source / "big_mask.png")
    result, rows = clean(source, tmp_path / "clean", "--max-image-pixels", "250000")  # 580x420 fits, 600x500 not
    assert result.returncode == 0 and sum(row["kept"] == "1" for row in rows.values()) == 2, result.stderr
    reason = f"{source / 'big.png'}: 600x500 is 0.3 million pixels, more than the 0.25 million allowed"
    assert rows["big"]["kept"] == "0" and reason in rows["big"]["reason"] and reason in result.stderr
    assert "(--max-image-pixels)" in rows["big"]["reason"]


@pytest.mark.slow
def test_symbolic_links_to_folders_are_followed_once(awkward_clean):
    result, rows, _, pairs = awkward_clean
    linked = {f"linked/{name}" for name, _, _ in pairs[3:6]}
    assert linked <= set(rows) and all("has no" not in rows[identifier]["reason"] for identifier in linked)
    assert not [identifier for identifier in rows if "loop" in identifier], "the link back up the tree was followed"
    assert len(rows) == 3 + 3  # the three awkward pairs, the three linked pairs


@pytest.mark.slow
def test_a_named_pipe_named_like_an_image_is_skipped_not_waited_for(own_pairs, tmp_path):
    source = tmp_path / "mine"
    write_own(source, own_pairs[:3], "suffix")
    os.mkfifo(source / "scan.png")
    Image.fromarray(own_pairs[0][2]).save(source / "scan_mask.png")
    result = run_script("data_cleaning.py", "--source", str(source), "--output", str(tmp_path / "clean"), "--quiet",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{source / 'scan.png'}: a named pipe, not an image file; move it out of the folder" in result.stderr
    assert "3 pairs kept" in result.stdout


@pytest.mark.slow
def test_masks_of_another_suffix_get_a_hint_at_mask_suffix(own_pairs, tmp_path):
    beside, folders = tmp_path / "beside", tmp_path / "folders"
    for folder in (beside, folders / "images", folders / "masks"):
        folder.mkdir(parents=True)
    for name, image, mask in own_pairs[:3]:
        Image.fromarray(image).save(beside / f"{name}.png")
        Image.fromarray(mask).save(beside / f"{name}_seg.png")
        Image.fromarray(image).save(folders / "images" / f"{name}.png")
        Image.fromarray(mask).save(folders / "masks" / f"{name}_seg.png")
    for source in (beside, folders):
        result, _ = clean(source, tmp_path / f"clean-{source.name}")
        assert_user_error(result, "3 file(s) are named <name>_seg beside <name>", "pass --mask-suffix _seg")
        fixed, rows = clean(source, tmp_path / f"fixed-{source.name}", "--mask-suffix", "_seg")
        assert fixed.returncode == 0 and sum(row["kept"] == "1" for row in rows.values()) == 3, fixed.stderr
    suffix = run_script("data_cleaning.py", "--source", str(beside), "--layout", "suffix", cwd=tmp_path)
    assert_user_error(suffix, "no file below", "pass --mask-suffix _seg")


@pytest.mark.slow
def test_a_source_that_is_an_image_or_a_device_says_what_to_pass(own_pairs, tmp_path):
    image = tmp_path / "scan.png"
    Image.fromarray(own_pairs[0][1]).save(image)
    for source, kind in ((image, "an image file"), (Path("/dev/null"), "a device, a named pipe or a socket")):
        for layout in ("auto", "kaggle", "suffix"):
            result = run_script("data_cleaning.py", "--source", str(source), "--layout", layout, "--output", "x",
                                cwd=tmp_path)
            assert_user_error(result, f"--source {source} is {kind}, not a folder or a zip archive",
                              "Pass --source with the folder")
            assert "re-download" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.png"]


def test_only_the_digits_0_to_9_are_numbers_in_the_natural_order(tmp_path):
    for name in ("2.png", "10.png", "².png", "a٣.png"):  # "²".isdigit() is True, and int("²") fails
        Image.fromarray(GRAY).save(tmp_path / name)
    assert [item["id"] for item in images_to_segment(tmp_path, "_mask")] == ["2", "10", "a٣", "²"]
    assert natural_key("x²_9b") < natural_key("x²_10") and natural_key("²") == ("²",)
