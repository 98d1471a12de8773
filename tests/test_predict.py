"""Stage 3: predict.py, the run-length encoding, the submission and the post-processing."""

import csv
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.files import current_umask
from nerveseg.postprocess import THRESHOLDS, choose_postprocessing, to_mask, tuning_scores, upsample
from nerveseg.rle import rle_decode, rle_encode
from tests.helpers import KAGGLE_SAMPLE, needs_kaggle_sample, run_script


@needs_kaggle_sample
def test_rle_reproduces_the_competition_rows_exactly():
    with open(KAGGLE_SAMPLE / "train_masks.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 55
    for row in rows:
        mask = np.asarray(Image.open(KAGGLE_SAMPLE / "train" / f"{row['subject']}_{row['img']}_mask.tif"))
        assert rle_encode(mask) == row["pixels"]
        assert np.array_equal(rle_decode(row["pixels"], mask.shape) * 255, mask)


def test_rle_round_trips_and_follows_the_kaggle_numbering():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) > rng.random()
        assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)
    assert rle_encode(np.zeros((4, 5))) == ""
    column_major = np.zeros((3, 2), np.uint8)
    column_major[1:, 0] = 1  # pixels 2 and 3: down the first column
    column_major[0, 1] = 1  # pixel 4: top of the second column
    assert rle_encode(column_major) == "2 3"
    with pytest.raises(ValueError):
        rle_decode("5 2 3 1", (3, 3))  # not ascending


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


def test_post_processing_never_lowers_the_validation_dice():
    generator = torch.Generator().manual_seed(0)
    for trial in range(3):
        total = 0
        for index in range(6):
            truth = torch.zeros(1, 42, 58, dtype=torch.bool)
            if index % 2:
                truth[:, 10:20, 20:35] = True
            probability = torch.rand(1, 1, 21, 29, generator=generator) * (0.4 + 0.2 * trial)
            probability[..., 5:10, 10:17] += 0.5 * (index % 2)
            full = upsample(probability.clamp(0, 1), [(42, 58)])[0]
            assert full.shape == truth.shape
            total = total + tuning_scores(full, 1.0, truth, has_presence=False)
        chosen, best, raw = choose_postprocessing(total, images=6, has_presence=False)
        assert best >= raw
        assert chosen.threshold in THRESHOLDS
    assert best > raw, "on the last trial a higher threshold or a minimum area beats 0.5"


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


def test_the_presence_rule_empties_images_judged_empty_where_area_cannot():
    """Spurious blobs on empty images as large as the real targets: only presence tells them apart."""
    truths, maps, presences = [], [], []
    for index in range(6):
        truth = torch.zeros(1, 40, 60, dtype=torch.bool)
        probability = torch.full((1, 40, 60), 0.05)
        probability[:, 10:25, 20:40] = 0.95  # the same blob everywhere
        if index % 2:
            truth[:, 10:25, 20:40] = True
        truths.append(truth)
        maps.append(probability)
        presences.append(0.8 if index % 2 else 0.15)
    with_presence = sum(
        tuning_scores(p, q, t, has_presence=True) for p, q, t in zip(maps, presences, truths, strict=True)
    )
    chosen, best, default = choose_postprocessing(with_presence, images=6, has_presence=True)
    assert best == pytest.approx(6.0) and default == pytest.approx(6.0)  # the default 0.5 already separates
    assert 0.15 < chosen.presence_threshold <= 0.8
    without = sum(tuning_scores(p, 1.0, t, has_presence=False) for p, t in zip(maps, truths, strict=True))
    _, best_without, _ = choose_postprocessing(without, images=6, has_presence=False)
    assert best_without == pytest.approx(3.0)  # every choice of threshold and area: all blobs or none
    assert choose_postprocessing(without, images=6, has_presence=False)[0].presence_threshold == 0.0
    assert not to_mask(maps[0], 0.15, chosen).any() and to_mask(maps[1], 0.8, chosen).sum() == 15 * 20


def test_the_presence_loss_follows_the_augmented_mask_and_its_weight():
    from nerveseg.training import SegmentationLoss

    labels = torch.zeros(2, 1, 8, 8)
    labels[1, :, 2:4, 2:4] = 1
    mask_logits = torch.zeros(2, 1, 8, 8)
    presence_logits = torch.tensor([-3.0, 3.0])  # right on both
    plain = SegmentationLoss(0.0)((mask_logits, presence_logits), labels)
    weighted = SegmentationLoss(0.5)((mask_logits, presence_logits), labels)
    wrong = SegmentationLoss(0.5)((mask_logits, -presence_logits), labels)
    expected = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(presence_logits, torch.tensor([0.0, 1.0]))
    assert float(weighted - plain) == pytest.approx(float(expected), rel=1e-5)
    assert float(wrong) > float(weighted) + 1
    assert float(SegmentationLoss(0.5)((mask_logits, None), labels)) == pytest.approx(float(plain))


@pytest.mark.parametrize(
    ("gains", "adopted"),
    [([1.0] + [0.0] * 59, False), ([0.2] * 60, True), ([0.3, -0.1] * 30, True), ([1.0, -0.9] * 30, False)],
    ids=["one image flips", "every image gains", "most gain a little", "large gains and losses"],
)
def test_a_rule_replaces_the_default_only_when_its_gain_beats_the_noise(gains, adopted):
    from nerveseg.postprocess import MIN_AREA_FRACTIONS, PRESENCE_THRESHOLDS, default_index

    shape = (len(PRESENCE_THRESHOLDS), 2, len(THRESHOLDS), len(MIN_AREA_FRACTIONS))
    default, other = default_index(has_presence=True), (PRESENCE_THRESHOLDS.index(0.7), 1, 0, 3)
    tuning = torch.zeros(2, *shape, dtype=torch.float64)
    for gain in gains:
        table = torch.full(shape, 0.5, dtype=torch.float64)
        table[other] += gain
        tuning[0] += table
        tuning[1] += (table - table[default]) ** 2
    chosen, best, default_sum = choose_postprocessing(tuning, images=len(gains), has_presence=True)
    assert (chosen.presence_threshold == 0.7 and chosen.keep_largest) == adopted
    assert best >= default_sum
