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
    """Sums of per-image Dice, overall and split by empty and non-empty truth; exact to reduce across ranks."""

    sum_empty: float = 0.0
    count_empty: int = 0
    sum_nonempty: float = 0.0
    count_nonempty: int = 0

    def add(self, dice: torch.Tensor, truth_is_empty: torch.Tensor) -> None:
        """Add a batch of per-image scores."""
        truth_is_empty = truth_is_empty.bool()
        self.sum_empty += float(dice[truth_is_empty].sum())
        self.count_empty += int(truth_is_empty.sum())
        self.sum_nonempty += float(dice[~truth_is_empty].sum())
        self.count_nonempty += int((~truth_is_empty).sum())

    def as_tensor(self) -> torch.Tensor:
        """The four sums, for torch.distributed.all_reduce."""
        return torch.tensor(
            [self.sum_empty, self.count_empty, self.sum_nonempty, self.count_nonempty], dtype=torch.float64
        )

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "DiceTally":
        """The inverse of as_tensor."""
        a, b, c, d = values.tolist()
        return cls(a, int(b), c, int(d))

    def summary(self) -> dict[str, float]:
        """Mean Dice overall, on empty truths and on non-empty truths (NaN where there are none)."""
        count = self.count_empty + self.count_nonempty
        nan = float("nan")
        return {
            "dice": (self.sum_empty + self.sum_nonempty) / count if count else nan,
            "dice_empty": self.sum_empty / self.count_empty if self.count_empty else nan,
            "dice_nonempty": self.sum_nonempty / self.count_nonempty if self.count_nonempty else nan,
            "images": count,
        }
