"""The competition's metric: mean Dice over images, where an image with an empty truth scores 1 when the
prediction is empty too and 0 otherwise.

MONAI's DiceMetric leaves empty-truth images out by default (ignore_empty=True), which is not this
rule; compute_dice with ignore_empty=False is.
"""

from dataclasses import dataclass

import torch
from monai.metrics import compute_dice


def kaggle_dice(prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of binary masks shaped (batch, 1, height, width), by the Kaggle rule."""
    return compute_dice(prediction.float(), truth.float(), include_background=True, ignore_empty=False)[:, 0]


@dataclass
class DiceTally:
    """Sums of per-image Dice, overall and split by empty and non-empty truth, and how often "empty or not"
    was right; exact to reduce across ranks."""

    sum_empty: float = 0.0
    count_empty: int = 0
    sum_nonempty: float = 0.0
    count_nonempty: int = 0
    found_nonempty: int = 0  # non-empty truths whose prediction is not empty

    def add(self, dice: torch.Tensor, truth_is_empty: torch.Tensor, prediction_is_empty: torch.Tensor) -> None:
        """Add a batch of per-image scores."""
        truth_is_empty, prediction_is_empty = truth_is_empty.bool(), prediction_is_empty.bool()
        self.sum_empty += float(dice[truth_is_empty].sum())
        self.count_empty += int(truth_is_empty.sum())
        self.sum_nonempty += float(dice[~truth_is_empty].sum())
        self.count_nonempty += int((~truth_is_empty).sum())
        self.found_nonempty += int((~truth_is_empty & ~prediction_is_empty).sum())

    def as_tensor(self) -> torch.Tensor:
        """The five sums, for torch.distributed.all_reduce."""
        return torch.tensor(
            [self.sum_empty, self.count_empty, self.sum_nonempty, self.count_nonempty, self.found_nonempty],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "DiceTally":
        """The inverse of as_tensor."""
        a, b, c, d, e = values.tolist()
        return cls(a, int(b), c, int(d), int(e))

    def summary(self) -> dict[str, float | None]:
        """Mean Dice overall, on empty truths and on non-empty truths, and the presence accuracy (the share of
        images where "empty or not" is right; an empty truth scores 1 exactly when its prediction is empty).
        None where there are no such images."""
        count = self.count_empty + self.count_nonempty
        return {
            "dice": (self.sum_empty + self.sum_nonempty) / count if count else None,
            "dice_empty": self.sum_empty / self.count_empty if self.count_empty else None,
            "dice_nonempty": self.sum_nonempty / self.count_nonempty if self.count_nonempty else None,
            "presence_accuracy": (self.sum_empty + self.found_nonempty) / count if count else None,
            "images": count,
            "images_empty": self.count_empty,
        }


def describe_scores(scores: dict) -> str:
    """One line of a summary's figures; a group without images says so instead of showing a number."""

    def figure(key: str) -> str:
        return "none" if scores.get(key) is None else f"{scores[key]:.4f}"

    empty, images = scores["images_empty"], scores["images"]
    presence = "none" if scores.get("presence_accuracy") is None else f"{scores['presence_accuracy']:.1%}"
    empty_part = f"{figure('dice_empty')} on {empty}" if empty else "none"
    target_part = f"{figure('dice_nonempty')} on {images - empty}" if images - empty else "none"
    return (
        f"Dice {figure('dice')} (empty truths: {empty_part}, target: {target_part}; "
        f"presence right on {presence} of the images)"
    )
