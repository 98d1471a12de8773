"""Reading what data_cleaning.py wrote, and splitting it by subject."""

import csv
import random
from pathlib import Path

from nerveseg.errors import UserError
from nerveseg.inputs import natural_key


def read_manifest(data_dir: str | Path) -> list[dict]:
    """The kept training pairs of a clean folder, as MONAI data dicts (image, label, id, subject, empty, mask_fraction,
    size: the image's (height, width)); the held-out subjects (data_cleaning.py --hold-out) are left out. Refused:
    none, or none with a target."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise UserError(
            f"{manifest} not found: run python data_cleaning.py first (or --demo for synthetic data), "
            "or pass --data-dir to the folder it wrote"
        )
    with open(manifest, newline="", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if row.get("kept") == "1" and row.get("split") != "held-out"]
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
                "subject": row["subject"],
                "empty": int(row["mask_area"]) == 0,
                "mask_fraction": int(row["mask_area"]) / (int(row["height"]) * int(row["width"])),
                "size": (int(row["height"]), int(row["width"])),
            }
        )
    if not items:
        raise UserError(f"{manifest} lists no kept training pair; see its 'reason' column")
    if all(item["empty"] for item in items):
        raise UserError(f"{manifest}: all {len(items)} training masks are empty, so a model would learn to find "
                        "nothing (and score Dice 1.0 on such images). Check that the masks hold the target (own data: "
                        "--mask-values, --mask-suffix) and run data_cleaning.py again")
    return items


def split_by_subject(
    items: list[dict], val_fraction: float, seed: int, *, option: str = "--val-fraction"
) -> tuple[list[dict], list[dict]]:
    """Hold out whole subjects for validation (their frames are strongly correlated).

    Subjects are shuffled with the seed, ordered by their share of empty masks, and every k-th one goes
    to validation, so both sides keep a similar empty/non-empty balance. Reproducible from the seed.
    `option` is the setting that gave the fraction, for the messages.
    """
    subjects = sorted({item["subject"] for item in items}, key=natural_key)
    if len(subjects) < 2:
        raise UserError(
            f"only {len(subjects)} subject in the data: a split by subject needs at least 2 (one on each side of "
            f"{option}); clean a download with more subjects (python data_cleaning.py)"
        )
    if not 0 < val_fraction < 1:
        raise UserError(f"{option} must be between 0 and 1, not {val_fraction}")
    subjects = subjects_by_empty_share(items, seed)
    n_val = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)
    step = len(subjects) / n_val
    offset = random.Random(seed + 1).random() * step
    val_subjects = {subjects[int(offset + i * step)] for i in range(n_val)}
    train = [item for item in items if item["subject"] not in val_subjects]
    val = [item for item in items if item["subject"] in val_subjects]
    return train, val


def subjects_by_empty_share(items: list[dict], seed: int) -> list[str]:
    """The subjects shuffled with the seed, then ordered by their share of empty masks (ties keep the shuffled
    order): taking every k-th of them gives groups with similar shares."""
    subjects = sorted({item["subject"] for item in items}, key=natural_key)
    empty_share = {s: 0.0 for s in subjects}
    counts = {s: 0 for s in subjects}
    for item in items:
        empty_share[item["subject"]] += item["empty"]
        counts[item["subject"]] += 1
    random.Random(seed).shuffle(subjects)
    return sorted(subjects, key=lambda s: empty_share[s] / counts[s])


def split_into_folds(items: list[dict], folds: int, val_fraction: float, seed: int) -> list[tuple[list, list]]:
    """(training items, validation items) of each fold: with folds=1 the one split of split_by_subject; with more,
    every subject validates in exactly one fold. Each run of `folds` subjects of similar empty share (see
    subjects_by_empty_share) is dealt out to the folds in a seeded order, so the folds stay balanced."""
    if folds == 1:
        return [split_by_subject(items, val_fraction, seed)]
    subjects = subjects_by_empty_share(items, seed)
    if len(subjects) < folds:
        raise UserError(f"--folds {folds} needs at least {folds} subjects (one per fold), and the data has "
                        f"{len(subjects)}; use --folds {len(subjects)} or fewer")
    dealer, fold_of = random.Random(seed + 2), {}
    for start in range(0, len(subjects), folds):
        group = subjects[start : start + folds]
        for subject, fold in zip(group, dealer.sample(range(folds), len(group)), strict=True):
            fold_of[subject] = fold
    return [
        ([item for item in items if fold_of[item["subject"]] != fold],
         [item for item in items if fold_of[item["subject"]] == fold])
        for fold in range(folds)
    ]


def describe_split(train: list[dict], val: list[dict]) -> str:
    """The split in a line: pairs and subjects on each side, and the share of empty masks."""
    subjects = len({item["subject"] for item in train + val})
    return (
        f"{len(train) + len(val)} pairs from {subjects} subjects: {len(train)} for training, {len(val)} for validation "
        f"({len({item['subject'] for item in val})} subjects held out); empty masks "
        f"{sum(item['empty'] for item in train) / len(train):.0%} / {sum(item['empty'] for item in val) / len(val):.0%}"
    )


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
