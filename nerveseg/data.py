"""Reading what data_cleaning.py wrote, and splitting it by subject."""

import csv
import random
from pathlib import Path

from nerveseg.cleaning import natural_key
from nerveseg.errors import UserError


def read_manifest(data_dir: str | Path) -> list[dict]:
    """The kept training pairs of a clean folder, as MONAI data dicts (image, label, id, subject, empty)."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise UserError(
            f"{manifest} not found: run python data_cleaning.py first (or --demo for synthetic data), "
            "or pass --data-dir to the folder it wrote"
        )
    with open(manifest, newline="", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if row.get("kept") == "1"]
    items = []
    for row in rows:
        image, label = data_dir / row["image"], data_dir / row["mask"]
        for path in (image, label):
            if not path.is_file():
                raise UserError(f"{manifest} lists {path}, which is missing; run data_cleaning.py again")
        items.append(
            {
                "image": str(image),
                "label": str(label),
                "id": row["id"],
                "subject": int(row["subject"]),
                "empty": int(row["mask_area"]) == 0,
                "mask_fraction": int(row["mask_area"]) / (int(row["height"]) * int(row["width"])),
            }
        )
    if not items:
        raise UserError(f"{manifest} lists no kept training pair; see its 'reason' column")
    return items


def split_by_subject(items: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole subjects for validation (their frames are strongly correlated).

    Subjects are shuffled with the seed, ordered by their share of empty masks, and every k-th one goes
    to validation, so both sides keep a similar empty/non-empty balance. Reproducible from the seed.
    """
    subjects = sorted({item["subject"] for item in items})
    if len(subjects) < 2:
        raise UserError(
            f"only {len(subjects)} subject in the data: a split by subject needs at least 2 (one to train on, one to "
            "validate on); clean a download with more subjects (python data_cleaning.py)"
        )
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    empty_share = {s: 0.0 for s in subjects}
    counts = {s: 0 for s in subjects}
    for item in items:
        empty_share[item["subject"]] += item["empty"]
        counts[item["subject"]] += 1
    random.Random(seed).shuffle(subjects)
    subjects.sort(key=lambda s: empty_share[s] / counts[s])  # stable: ties keep the shuffled order
    n_val = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)
    step = len(subjects) / n_val
    offset = random.Random(seed + 1).random() * step
    val_subjects = {subjects[int(offset + i * step)] for i in range(n_val)}
    train = [item for item in items if item["subject"] not in val_subjects]
    val = [item for item in items if item["subject"] in val_subjects]
    return train, val


def partition(items: list[dict], rank: int, world_size: int, pad: bool) -> list[dict]:
    """This process's share of the items. pad=True repeats a few so that every share has the same length
    (training steps must match across processes); pad=False keeps each item exactly once (validation)."""
    if world_size == 1:
        return items
    share = items[rank::world_size]
    if pad:
        longest = -(-len(items) // world_size)
        share += items[: longest - len(share)]
    return share


def list_images(folder: str | Path) -> list[dict]:
    """The images of a folder to predict on (TIFF, PNG, JPEG, BMP), sorted naturally (2 before 10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass --input with a folder of images")
    suffixes = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise UserError(f"{folder} holds no images (.tif, .png, .jpg or .bmp); pass --input with a folder of images")
    return [{"image": str(path), "image_path": str(path), "id": path.stem} for path in files]
