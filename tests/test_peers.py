"""The nnU-Net peer benchmark (benchmarks/peers/): the conversion to nnU-Net's raw format, the split it is given,
and the scoring of both systems, all without nnunetv2; the worker itself only where nnunetv2 is installed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.errors import UserError
from nerveseg.transforms import load_transforms
from tests.helpers import ROOT, run_script

PEERS = ROOT / "benchmarks" / "peers"
SIZE = (32, 48)  # a small network size: height, width


@pytest.fixture(scope="module")
def peers(monkeypatch_module: pytest.MonkeyPatch):
    """benchmarks/peers on the import path (the scripts there import each other by name, as when run)."""
    monkeypatch_module.syspath_prepend(str(PEERS))
    import conversion
    import nnunet

    return conversion, nnunet


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def held_out_clean(train_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train_download cleaned with 2 of its 6 subjects held out."""
    output = tmp_path_factory.mktemp("peers-clean") / "clean"
    result = run_script("data_cleaning.py", "--source", str(train_download), "--output", str(output),
                        "--hold-out", "0.34", "--quiet", cwd=output.parent)
    assert result.returncode == 0, result.stderr
    return output


def subjects(items: list[dict]) -> set[str]:
    return {item["subject"] for item in items}


@pytest.mark.slow
def test_conversion_writes_nnunet_raw_format_of_train_py_split(peers, held_out_clean: Path, tmp_path: Path):
    conversion, _ = peers
    train, val = conversion.training_split(held_out_clean, val_fraction=0.2, seed=0)
    test = conversion.held_out_items(held_out_clean)
    assert subjects(train) and subjects(val) and not subjects(train) & subjects(val)
    assert len(test) > 0 and not {i["id"] for i in test} & {i["id"] for i in train + val}

    folder = conversion.write_raw_dataset(tmp_path, 7, "Tiny", train_items=train, val_items=val, test_items=test,
                                          image_size=SIZE)
    assert folder == tmp_path / "Dataset007_Tiny"
    ids = sorted(i["id"] for i in train + val)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(f"{i}_0000.png" for i in ids)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(f"{i['id']}_0000.png" for i in test)

    described = json.loads((folder / "dataset.json").read_text())
    assert described["labels"] == {"background": 0, "target": 1}
    assert described["channel_names"] == {"0": "ultrasound"}
    assert described["numTraining"] == len(ids)
    assert described["file_ending"] == ".png"
    assert described["overwrite_image_reader_writer"] == "NaturalImage2DIO"

    reference = load_transforms(SIZE, with_label=True)
    for item in (next(i for i in train if i["empty"]), next(i for i in train if not i["empty"])):
        image = Image.open(folder / "imagesTr" / f"{item['id']}_0000.png")
        label = np.asarray(Image.open(folder / "labelsTr" / f"{item['id']}.png"))
        assert image.mode == "L" and image.size == (SIZE[1], SIZE[0]) and label.shape == SIZE
        assert set(np.unique(label)) <= {0, 1} and label.any() != item["empty"]
        expected = reference({"image": item["image"], "label": item["label"]})
        np.testing.assert_array_equal(np.asarray(image), expected["image"][0].numpy())  # resized as train.py does
        np.testing.assert_array_equal(label, expected["label"][0].numpy())

    splits = json.loads(conversion.write_splits(tmp_path / "pre", train, val).read_text())
    assert splits == [{"train": [i["id"] for i in train], "val": [i["id"] for i in val]}]


@pytest.mark.slow
def test_held_out_items_refuses_a_clean_without_hold_out(peers, train_clean: Path):
    conversion, _ = peers
    with pytest.raises(UserError, match="--hold-out"):
        conversion.held_out_items(train_clean)


def write_mask(path: Path, mask: np.ndarray) -> dict:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return {"id": path.stem, "label": str(path)}


def test_score_follows_the_kaggle_rule(peers, tmp_path: Path):
    conversion, _ = peers
    empty, target = np.zeros((4, 6), bool), np.zeros((4, 6), bool)
    target[1:3, 1:3] = True  # 4 pixels
    half = np.zeros((4, 6), bool)
    half[1:3, 2:4] = True  # 4 pixels, 2 of them on the target: Dice 0.5
    truths = [write_mask(tmp_path / f"{name}.png", mask) for name, mask in
              (("a", empty), ("b", empty), ("c", target), ("d", target))]
    predictions = {"a": empty, "b": target, "c": half, "d": empty}
    scores = conversion.score(predictions, truths)
    assert scores["dice"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert scores["dice_empty"] == pytest.approx(0.5) and scores["dice_nonempty"] == pytest.approx(0.25)
    assert (scores["empty_left_empty"], scores["targets_found"], scores["images_empty"]) == (1, 1, 2)
    assert scores["all_empty_baseline"] == pytest.approx(0.5)
    with pytest.raises(UserError, match="no prediction for d"):
        conversion.score({"a": empty, "b": empty, "c": empty}, truths)
    with pytest.raises(UserError, match="the prediction for a"):
        conversion.score(predictions | {"a": np.zeros((3, 6), bool)}, truths)


def test_probabilities_are_resized_then_thresholded(peers):
    conversion, _ = peers
    probabilities = np.zeros((2, 1, 4, 6), np.float32)
    probabilities[1, 0, 1:3, 2:4] = 0.9  # the target's probability
    probabilities[0] = 1 - probabilities[1]
    mask = conversion.probabilities_to_mask(probabilities, (8, 12))
    expected = np.zeros((8, 12), bool)
    expected[2:6, 4:8] = True
    np.testing.assert_array_equal(mask, expected)


def test_budgets(peers):
    _, nnunet = peers
    items = [{"id": str(i)} for i in range(345)]
    assert nnunet.images_seen_by_ours(items, 10) == 10 * 32 * 16  # 345 // 32 = 10 -> batch 16, 32 steps an epoch
    assert nnunet.images_seen_by_ours(items[:40], 3) == 3 * 32 * 16  # the smallest batch, 16
    assert nnunet.images_seen_by_ours([{"id": str(i)} for i in range(9000)], 2) == 2 * 9000  # batch 128, one pass


def test_script_answers_help_without_nnunetv2():
    result = subprocess.run([sys.executable, str(PEERS / "nnunet.py"), "-h"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--nnunet-defaults" in result.stdout and "CPU time" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None, reason="nnunetv2 is not installed")
def test_worker_budget_trainer_keeps_the_budget():
    sys.path.insert(0, str(PEERS))
    try:
        import nnunet_worker
    finally:
        sys.path.remove(str(PEERS))
    trainer_class = nnunet_worker.nnUNetTrainerBudget
    assert issubclass(trainer_class, nnunet_worker.nnUNetTrainer)
    assert (trainer_class.epochs, trainer_class.iterations_per_epoch, trainer_class.val_iterations_per_epoch) == (
        1000, 250, 50)


def test_table_shows_both_systems_with_the_baseline_and_the_plan(peers):
    _, nnunet = peers
    scores = {"dice": 0.375, "dice_empty": 0.5, "dice_nonempty": 0.25, "images": 4, "images_empty": 2,
              "empty_left_empty": 1, "targets_found": 1, "all_empty_baseline": 0.5}
    timing = {"cpu_seconds": 120.0, "wall_seconds": 600.0}
    rows = [{"system": "ours", "budget": "train.py --max-epochs 5", "images_seen": 2560, "training": timing,
             "scores": scores},
            {"system": "nnU-Net v2", "budget": "same CPU time", "epochs": 3, "iterations_per_epoch": 5,
             "images_seen": 390, "training": timing, "scores": scores | {"dice": 0.25}}]
    plan = {"network": "PlainConvUNet", "stages": 6, "features": [32, 512], "parameters": 20_619_082,
            "batch_size": 26, "patch_size": [128, 192]}
    text = nnunet.table(rows, plan, "a CPU, 2 cores")
    assert "all-empty baseline 0.500" in text and "a CPU, 2 cores" in text
    assert "PlainConvUNet, 6 stages, 32-512 features, 20.6 M parameters, batch 26, patch 128x192" in text
    ours = "| ours | train.py --max-epochs 5 | 0.375 | 1 of 2 (0.500) | 1 of 2 (0.250) | 2.0 min | 10.0 min | 2,560 |"
    assert ours in text
    assert "| nnU-Net v2 | same CPU time: 3 x 5 iterations | 0.250 |" in text
