"""Stage 2: train.py end to end, its split, its reading of images, its metric and its augmentation (stopping and
resuming, and seeded runs that agree: test_training_faults.py)."""


import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.checkpoint import FORMAT, load_checkpoint
from nerveseg.data import read_manifest, split_by_subject
from nerveseg.images import read_gray
from nerveseg.metrics import DiceTally, describe_scores, kaggle_dice
from nerveseg.training.augment import BatchAugment
from nerveseg.training.crossval import MIN_TTA_GAIN
from nerveseg.transforms import load_transforms, network_input, unpack_mask
from tests.helpers import read_metrics, run_script


@pytest.mark.slow
def test_a_short_run_writes_its_checkpoint_metrics_and_pictures(trained_run):
    run = trained_run / "runs" / "first"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "settings.json", "summary.json"):
        assert (run / name).is_file(), name
    assert (trained_run / "Images" / "training_curves.png").stat().st_size > 10_000
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(0 <= float(row["val_dice"]) <= 1 and float(row["train_loss"]) > 0 for row in rows)
    raw = torch.load(trained_run / "2D_Nerve_Segmentation.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["preprocessing"]["image_size"] == [64, 96]
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in raw["state_dict"])
    assert raw["settings"]["batch_size"] == 8 and raw["settings"]["max_epochs"] == 2
    assert {"threshold", "keep_largest", "min_area_fraction", "presence_threshold"} <= raw["postprocessing"].keys()
    # what the choice guarantees (the balanced rule may lower the Kaggle Dice: see tests/test_postprocess.py)
    use_tta, dice = raw["tta"]["use"], raw["tta"]["validation_dice"]
    assert use_tta == (dice["tta"] - dice["plain"] > MIN_TTA_GAIN)
    assert raw["metrics"]["dice_postprocessed"] == pytest.approx(dice["tta" if use_tta else "plain"])
    for rule in ("default_rule", "postprocessed"):
        assert {"dice", "dice_empty", "dice_nonempty", "presence_accuracy"} <= raw["metrics"][rule].keys()
    assert raw["model_config"]["presence"] is True
    model, checkpoint = load_checkpoint(trained_run / "2D_Nerve_Segmentation.pt")
    mask_logits, presence_logits = model(torch.zeros(3, 1, 64, 96))
    assert mask_logits.shape == (3, 1, 64, 96) and presence_logits.shape == (3,)


@pytest.mark.slow
def test_bad_settings_are_refused_with_a_clear_message(train_clean, tmp_path):
    """The command line's side (the checks of the values themselves are a table in test_runs.py)."""
    for args, message in (
        (["--batch-size", "many"], "--batch-size takes a whole number"),
        (["--data-dir", str(tmp_path / "nowhere")], "run python data_cleaning.py first"),
    ):
        result = run_script("train.py", "--data-dir", str(train_clean), *args, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    result = run_script("train.py", "--no-such-option", "1", cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_help_lists_each_setting_with_default_and_comment(tmp_path):
    result = run_script("train.py", "-h", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert ("training images per step and process (0: 128, fewer on small data sets, down to 8) "
            "(default: 0; at least 0)") in text
    for option in ("--max-epochs", "--val-interval", "--learning-rate", "--resume", "--device", "--compile"):
        assert option in result.stdout


@pytest.mark.slow
def test_the_split_keeps_subjects_apart_reproducibly_and_balanced(train_clean):
    items = read_manifest(train_clean)
    train, val = split_by_subject(items, 0.34, seed=5)
    assert {i["subject"] for i in train}.isdisjoint({i["subject"] for i in val})
    assert len(train) + len(val) == len(items) and val
    assert split_by_subject(items, 0.34, seed=5) == (train, val)
    many = [{"subject": s, "empty": f < (s % 5) + 3, "id": f"{s}_{f}"} for s in range(40) for f in range(10)]
    train, val = split_by_subject(many, 0.2, seed=1)
    share = [sum(i["empty"] for i in side) / len(side) for side in (train, val)]
    assert len({i["subject"] for i in val}) == 8 and abs(share[0] - share[1]) < 0.05


@pytest.mark.slow
def test_a_loaded_image_has_the_orientation_and_pixels_pil_shows(train_clean):
    path = train_clean / "images" / "2_4.tif"
    pil = np.asarray(Image.open(path))
    assert pil.shape == (420, 580)
    array = read_gray(path).pixels
    assert np.array_equal(array, pil)
    loaded = load_transforms((420, 580), with_label=True, keep_full_label=True)(
        {"image": str(path), "label": str(path).replace("images", "masks")}
    )
    assert loaded["image"].shape == (1, 420, 580) and loaded["image"].dtype == torch.uint8
    assert np.array_equal(loaded["image"][0].numpy(), pil)
    assert torch.equal(network_input(loaded["image"]) * 255, loaded["image"].float())
    mask = np.asarray(Image.open(train_clean / "masks" / "2_4.tif")) > 0
    assert np.array_equal(loaded["label"][0].numpy() == 1, mask)
    assert np.array_equal(unpack_mask(loaded["full_label"], (420, 580))[0].numpy(), mask)
    small = load_transforms((64, 96), with_label=True)(
        {"image": str(path), "label": str(path).replace("images", "masks")}
    )
    assert small["image"].shape == (1, 64, 96) and set(small["label"].unique().tolist()) <= {0, 1}
    assert loaded["original_size"].tolist() == [420, 580]


def test_the_dice_follows_the_kaggle_rule():
    empty, full, half = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    half[..., :2] = 1
    assert kaggle_dice(empty, empty).item() == 1.0  # both empty: 1, not left out
    assert kaggle_dice(full, empty).item() == 0.0  # a stray prediction on an empty image: 0
    assert kaggle_dice(empty, full).item() == 0.0
    assert kaggle_dice(half, full).item() == pytest.approx(2 * 8 / (8 + 16))
    tally = DiceTally()
    tally.add(torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor([True, True, False, False]),
              torch.tensor([True, False, False, True]))
    assert tally.summary() == {"dice": 0.375, "dice_empty": 0.5, "dice_nonempty": 0.25, "presence_accuracy": 0.5,
                               "images": 4, "images_empty": 2}
    from_masks = DiceTally()  # as evaluate() calls it: from a predicted mask and a truth
    prediction, truth = torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)
    from_masks.add(kaggle_dice(prediction[None], truth[None]), ~truth.any().reshape(1), ~prediction.any().reshape(1))
    assert from_masks.summary()["presence_accuracy"] == 1.0
    nerve_only = DiceTally()
    nerve_only.add(torch.tensor([0.5]), torch.tensor([False]), torch.tensor([False]))
    assert nerve_only.summary()["dice_empty"] is None and "empty truths: none, target: 0.5000 on 1" in describe_scores(
        nerve_only.summary()
    )


def test_batch_augmentation_is_seeded_keeps_masks_binary_and_can_be_switched_off():
    images, labels = torch.rand(6, 1, 32, 48), (torch.rand(6, 1, 32, 48) > 0.7).float()
    off = BatchAugment(rotate_degrees=10, scale=0.1, shift=0.05, flip_prob=0.0, intensity_prob=0.0, affine_prob=0.0)
    same_images, same_labels = off(images, labels, torch.Generator().manual_seed(0))
    assert torch.allclose(same_images, images, atol=1e-5) and torch.equal(same_labels, labels)
    flip = BatchAugment(rotate_degrees=0, scale=0, shift=0, flip_prob=1.0, intensity_prob=0.0, affine_prob=0.0)
    flipped_images, flipped_labels = flip(images, labels, torch.Generator().manual_seed(0))
    assert torch.allclose(flipped_images, images.flip(-1), atol=1e-5) and torch.equal(flipped_labels, labels.flip(-1))
    on = BatchAugment(rotate_degrees=10, scale=0.1, shift=0.05, flip_prob=0.0, intensity_prob=0.5)
    first = on(images, labels, torch.Generator().manual_seed(3))
    second = on(images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], images)
    assert set(first[1].unique().tolist()) <= {0.0, 1.0} and 0 <= first[0].min() and first[0].max() <= 1


def test_nnunets_augmentation_blurs_lowers_the_resolution_and_changes_contrast_only_where_drawn():
    from nerveseg.training.augment import gaussian_blur, lower_resolution

    torch.manual_seed(0)
    images = torch.rand(4, 1, 32, 48)
    blurred = gaussian_blur(images, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(blurred[:2], images[:2])
    assert blurred[2:].std() < images[2:].std() / 2  # white noise loses most of its spread under sigma 1
    assert float((blurred[2:].mean() - images[2:].mean()).abs()) < 0.01
    coarse = lower_resolution(images, torch.tensor([1.0, 0.5, 1.0, 0.5]))
    torch.testing.assert_close(coarse[[0, 2]], images[[0, 2]])
    small = torch.nn.functional.interpolate(images[1:2], size=(16, 24), mode="nearest-exact")
    torch.testing.assert_close(coarse[1:2], torch.nn.functional.interpolate(small, size=(32, 48), mode="bilinear"))
    labels = (torch.rand(4, 1, 32, 48) > 0.7).float()
    options = {"rotate_degrees": 10, "scale": 0.1, "shift": 0.05, "flip_prob": 0.0, "intensity_prob": 0.3}
    light, nnunet = BatchAugment.preset("light", **options), BatchAugment.preset("nnunet", **options)
    assert light.zoom_range == (0.9, 1.1) and nnunet.zoom_range == (0.7, 1.4)
    assert light.blur_prob == light.low_resolution_prob == light.contrast_prob == 0
    assert (nnunet.blur_prob, nnunet.low_resolution_prob, nnunet.contrast_prob) == (0.2, 0.25, 0.15)
    augmented, masks = nnunet(images, labels, torch.Generator().manual_seed(5))
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and 0 <= augmented.min() and augmented.max() <= 1
    assert torch.equal(nnunet(images, labels, torch.Generator().manual_seed(5))[0], augmented)  # seeded
    contrast = BatchAugment(rotate_degrees=0, scale=0, shift=0, flip_prob=0, intensity_prob=0, affine_prob=0,
                            contrast_prob=1.0)
    changed, _ = contrast(images * 0.5 + 0.25, labels, torch.Generator().manual_seed(1))
    torch.testing.assert_close(changed.mean(dim=(1, 2, 3)), (images * 0.5 + 0.25).mean(dim=(1, 2, 3)))
    assert not torch.allclose(changed, images * 0.5 + 0.25)
