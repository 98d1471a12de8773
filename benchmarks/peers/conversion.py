"""This pipeline's data in nnU-Net v2's formats, and one scoring of both systems' masks: no nnunetv2 needed.

A clean folder of data_cleaning.py becomes an nnU-Net raw dataset (nnUNet_raw/DatasetNNN_Name/) holding exactly
the split train.py uses, at the size its network sees:

    imagesTr/<id>_0000.png   the training and validation images, resized as train.py's transforms do (area)
    labelsTr/<id>.png        their masks at the same size (nearest), values 0 and 1
    imagesTs/<id>_0000.png   the held-out images (data_cleaning.py --hold-out), resized the same way
    dataset.json             one channel, labels background 0 and target 1, PNG read by NaturalImage2DIO

and splits_final.json (one fold: train.py's training subjects train, its validation subjects validate) replaces
nnU-Net's own 5-fold split. Both systems' predictions are scored by the Kaggle rule of nerveseg.metrics on the
held-out masks at each image's own size.
"""

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nerveseg.data import read_manifest, split_into_folds
from nerveseg.errors import UserError
from nerveseg.files import atomic_write, write_json
from nerveseg.metrics import DiceTally, kaggle_dice
from nerveseg.transforms import load_transforms

CHANNEL = "0000"  # nnU-Net's suffix of the one input channel: <id>_0000.png
TARGET_LABEL = 1  # the target's value in nnU-Net's label maps (background 0)


def training_split(data_dir: str | Path, *, val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """train.py's (training items, validation items) of its one split (FOLDS = 1), from the same functions."""
    return split_into_folds(read_manifest(data_dir), 1, val_fraction, seed)[0]


def held_out_items(data_dir: str | Path) -> list[dict]:
    """The pairs data_cleaning.py --hold-out kept out of training, as data dicts (image, label, id)."""
    data_dir = Path(data_dir)
    with open(data_dir / "manifest.csv", newline="", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if row.get("kept") == "1" and row.get("split") == "held-out"]
    if not rows:
        raise UserError(f"{data_dir} holds no held-out subjects: clean the data again with data_cleaning.py "
                        "--hold-out 0.2 (the held-out subjects are this benchmark's test set)")
    return [{"image": str(data_dir / row["image"]), "label": str(data_dir / row["mask"]), "id": row["id"]}
            for row in rows]


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's name of a dataset folder: Dataset042_Name."""
    if not 1 <= dataset_id <= 999:
        raise UserError(f"an nnU-Net dataset id is between 1 and 999, not {dataset_id}")
    return f"Dataset{dataset_id:03d}_{name}"


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit grayscale PNG, written atomically."""
    with atomic_write(path, "wb") as file:
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(file, format="PNG")


def write_raw_dataset(
    raw_root: str | Path,
    dataset_id: int,
    name: str,
    *,
    train_items: Sequence[dict],
    val_items: Sequence[dict],
    test_items: Sequence[dict],
    image_size: Sequence[int],
) -> Path:
    """Write nnU-Net's raw dataset (see the module's docstring) and return its folder."""
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with_label, without_label = (load_transforms(image_size, with_label=flag) for flag in (True, False))
    for item in [*train_items, *val_items]:
        pair = with_label({"image": item["image"], "label": item["label"]})
        write_png(folder / "imagesTr" / f"{item['id']}_{CHANNEL}.png", pair["image"][0].numpy())
        write_png(folder / "labelsTr" / f"{item['id']}.png", pair["label"][0].numpy() * TARGET_LABEL)
    for item in test_items:
        image = without_label({"image": item["image"]})["image"]
        write_png(folder / "imagesTs" / f"{item['id']}_{CHANNEL}.png", image[0].numpy())
    write_json(folder / "dataset.json", dataset_json(name, len(train_items) + len(val_items)))
    return folder


def dataset_json(name: str, training_cases: int) -> dict:
    """nnU-Net's dataset.json for one grayscale channel (z-score normalised, its default) and one target."""
    return {
        "name": name,
        "description": "written by benchmarks/peers/nnunet.py from a clean folder of data_cleaning.py",
        "channel_names": {"0": "ultrasound"},
        "labels": {"background": 0, "target": TARGET_LABEL},
        "numTraining": training_cases,
        "file_ending": ".png",
        "overwrite_image_reader_writer": "NaturalImage2DIO",
    }


def write_splits(preprocessed_dataset: str | Path, train_items: Sequence[dict], val_items: Sequence[dict]) -> Path:
    """nnU-Net's splits_final.json with one fold, train.py's split (nnU-Net then trains fold 0 on it)."""
    path = Path(preprocessed_dataset) / "splits_final.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, [{"train": [i["id"] for i in train_items], "val": [i["id"] for i in val_items]}])
    return path


def read_binary_mask(path: str | Path) -> np.ndarray:
    """A mask file (0/255 of the clean folder, predict.py's 0/255, or nnU-Net's 0/1) as a bool array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def probabilities_to_mask(probabilities: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """nnU-Net's class probabilities at the network's size, (classes, [1,] height, width), as the target's mask
    at `size`: its probability resized bilinearly and thresholded at 0.5, as predict.py brings ours back."""
    target = torch.from_numpy(np.asarray(probabilities, dtype=np.float32)[TARGET_LABEL]).reshape(
        1, 1, *probabilities.shape[-2:]
    )
    resized = F.interpolate(target, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy() > 0.5


def score(predictions: Mapping[str, np.ndarray], truths: Sequence[dict]) -> dict:
    """The Kaggle Dice of bool masks {id: mask} against the truths' label files, each at the truth's size, with
    the empty truths left empty and the targets found; a missing or mis-sized prediction is refused."""
    tally = DiceTally()
    for item in truths:
        truth = read_binary_mask(item["label"])
        if item["id"] not in predictions:
            raise UserError(f"no prediction for {item['id']} (truth {item['label']})")
        predicted = np.asarray(predictions[item["id"]], dtype=bool)
        if predicted.shape != truth.shape:
            raise UserError(f"the prediction for {item['id']} is {predicted.shape}, its truth {truth.shape}")
        truth_t, predicted_t = (torch.from_numpy(m)[None, None] for m in (truth, predicted))
        tally.add(kaggle_dice(predicted_t, truth_t), torch.tensor([not truth.any()]),
                  torch.tensor([not predicted.any()]))
    scores = tally.summary()
    return scores | {
        "empty_left_empty": round(tally.sum_empty),  # an empty truth scores exactly 1 when left empty
        "targets_found": tally.found_nonempty,
        "all_empty_baseline": tally.count_empty / scores["images"] if scores["images"] else None,
    }


def read_json(path: str | Path) -> dict:
    """A JSON file that an earlier step wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
