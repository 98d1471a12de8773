"""From probabilities to masks at the original size, and choosing how on the validation subjects.

An image whose presence probability (the model's image-level output) is below a threshold gets an empty
mask. Otherwise its probability map is resized back to the image's own size, thresholded, optionally
reduced to its largest connected component (MONAI's get_largest_connected_component_mask), and emptied
when what is left is smaller than a minimum area: a stray blob on one of the many empty images scores 0.
"""

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import get_largest_connected_component_mask

from nerveseg.metrics import DiceTally, kaggle_dice

THRESHOLDS = tuple(np.round(np.arange(0.3, 0.81, 0.05), 2).tolist())
MIN_AREA_FRACTIONS = (0.0, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03)
# 0 means presence is not used: the only choice for a model without a presence output, never chosen for a model
# with one. On a validation set of a few subjects, letting the threshold and the minimum area replace the
# presence output fitted those subjects and lost on unseen patients (docs/results.md).
PRESENCE_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
UPSAMPLE_PIXELS = 2**24  # full-size pixels resized in one call (64 MiB of float32; a Kaggle batch of 64 is 15.6 M)


@dataclass(frozen=True)
class PostProcessing:
    """How probabilities become a mask. min_area_fraction is a share of the image's pixel count; an image
    whose presence probability is below presence_threshold gets an empty mask (0: presence not used)."""

    threshold: float = 0.5
    keep_largest: bool = False
    min_area_fraction: float = 0.0
    presence_threshold: float = 0.0

    def as_dict(self) -> dict:
        """For the checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: object) -> "PostProcessing":
        """The rule stored in a checkpoint or an ONNX file's metadata; ValueError says which field is unusable (a
        NaN threshold would empty every mask, a text one fail mid-run)."""
        if not isinstance(values, dict) or not values.keys() <= set(asdict(cls())):
            raise ValueError(f"expected the fields {', '.join(asdict(cls()))}, found {values!r}")
        for name, value in values.items():
            if name == "keep_largest" and not isinstance(value, bool):
                raise ValueError(f"keep_largest must be true or false, not {value!r}")
            if name != "keep_largest" and (isinstance(value, bool) or not isinstance(value, int | float)
                                           or not 0 <= value <= 1):
                raise ValueError(f"{name} must be a number from 0 to 1, not {value!r}")
        return cls(**values)


def upsample(
    probabilities: torch.Tensor, sizes: list[tuple[int, int]], *, max_pixels: int = UPSAMPLE_PIXELS
) -> Iterator[torch.Tensor]:
    """Each (1, h, w) map of a batch resized (bilinear) to its image's (height, width), on the batch's device, in
    the batch's order.

    Neighbouring maps of one size are resized together, in one call (much faster than one by one), up to
    `max_pixels` full-size pixels at a time: a batch of large images never holds all its full-size maps at once.
    """
    start = 0
    while start < len(sizes):
        height, width = sizes[start]
        end = start + 1
        while end < len(sizes) and sizes[end] == sizes[start] and (end - start + 1) * height * width <= max_pixels:
            end += 1
        yield from F.interpolate(probabilities[start:end].float(), size=sizes[start], mode="bilinear",
                                 align_corners=False)
        start = end


def binarize(probability: torch.Tensor, threshold: float, keep_largest: bool) -> np.ndarray:
    """Threshold a full-size (1, H, W) map into an (H, W) bool array; keep only the largest component if asked."""
    mask = (probability[0] > threshold).cpu().numpy()
    if keep_largest and mask.any():
        mask = get_largest_connected_component_mask(mask)  # the function behind KeepLargestConnectedComponent
    return mask


def to_mask(probability: torch.Tensor, presence: float, post: PostProcessing) -> np.ndarray:
    """The final (H, W) uint8 mask, 0 or 1, of a (1, H, W) probability map at its image's size and the image's
    presence probability (1.0 for a model without a presence output)."""
    if presence < post.presence_threshold:
        return np.zeros(probability.shape[-2:], np.uint8)
    mask = binarize(probability, post.threshold, post.keep_largest)
    if np.count_nonzero(mask) < post.min_area_fraction * mask.size:
        return np.zeros(mask.shape, np.uint8)
    return mask.astype(np.uint8)


def full_size_masks(probabilities: torch.Tensor, presences: list[float], sizes: list[tuple[int, int]],
                    rule: PostProcessing) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Each image of a batch at its own size, in the batch's order: its (1, H, W) probability map (on the batch's
    device) and its final mask by `rule`, from the batch's (N, 1, h, w) probabilities at the network's size."""
    for probability, presence in zip(upsample(probabilities, sizes), presences, strict=True):
        yield probability, to_mask(probability, presence, rule)


def tuning_scores(full: torch.Tensor, presence: float, truth: torch.Tensor, *, has_presence: bool) -> torch.Tensor:
    """One image's tuning scores for every (presence_threshold, keep_largest, threshold, min_area) choice: shape
    (5, P, 2, T, A), with TUNING_PLANES: its Dice, the square of its gain over the default rule, its Dice if its
    truth is empty (else 0), 1 where its truth has a target and its mask is not empty, and the squared gain if
    its truth is empty (else 0).

    `full` is the (1, H, W) probability map at the size of the (1, H, W) truth, `presence` the image's
    presence probability. Summed over images (and ranks and folds), this is what choose_postprocessing and
    metrics_of_rule need.
    """
    masks = torch.stack(
        [
            torch.from_numpy(binarize(full, threshold, keep_largest))
            for keep_largest in (False, True)
            for threshold in THRESHOLDS
        ]
    )[:, None]  # (2 x T, 1, H, W): one Dice call for all of them
    dice = kaggle_dice(masks, truth[None].expand_as(masks)).double()
    limits = torch.tensor(MIN_AREA_FRACTIONS, dtype=torch.float64) * truth.shape[-2] * truth.shape[-1]
    truth_is_empty = not truth.any()
    emptied = 1.0 if truth_is_empty else 0.0  # the score of a mask emptied by the minimum area
    areas = torch.count_nonzero(masks.flatten(1), dim=1)[:, None]
    big_enough = areas >= limits
    scores = torch.where(big_enough, dice[:, None], emptied).reshape(2, len(THRESHOLDS), len(MIN_AREA_FRACTIONS))
    found = (big_enough & (areas > 0)).double().reshape(scores.shape)
    judged_empty = (torch.tensor(PRESENCE_THRESHOLDS) > presence)[:, None, None, None]
    table = torch.where(judged_empty, emptied, scores[None])
    gain = table - table[default_index(has_presence=has_presence)]
    found = torch.where(judged_empty, 0.0, found[None]) * (not truth_is_empty)
    return torch.stack([table, gain**2, table * truth_is_empty, found, gain**2 * truth_is_empty])


TUNING_PLANES = ("dice", "squared_gain", "dice_of_empty_truths", "target_found", "squared_gain_of_empty_truths")


def default_postprocessing(*, has_presence: bool) -> PostProcessing:
    """The rule before any tuning: threshold 0.5, and presence 0.5 where the model has a presence output."""
    return PostProcessing(presence_threshold=0.5 if has_presence else 0.0)


def default_index(*, has_presence: bool) -> tuple[int, int, int, int]:
    """Where the default rule is in the tuning grid."""
    return rule_index(default_postprocessing(has_presence=has_presence))


def rule_index(rule: PostProcessing) -> tuple[int, int, int, int]:
    """Where a rule is in the tuning grid."""
    return (
        PRESENCE_THRESHOLDS.index(rule.presence_threshold),
        int(rule.keep_largest),
        THRESHOLDS.index(rule.threshold),
        MIN_AREA_FRACTIONS.index(rule.min_area_fraction),
    )


def choose_postprocessing(
    tuning: torch.Tensor, *, images: int, has_presence: bool, images_empty: int = 0, balanced: bool = False
) -> tuple[PostProcessing, float, float]:
    """The rule to use, from the summed tuning scores of `images` images; with (its sum, the default rule's sum).

    balanced: the rule is the best by the mean of the Dice of empty truths and of targets (`images_empty` of the
    images are empty), the Kaggle Dice of a test set where half of the images are empty, whatever the share in
    these images: the presence threshold then does not learn the training set's prior (docs/results.md: chosen
    by the training share, it called most empty images a target where training had few empty ones). Without
    (or where all images or none are empty), the best by Kaggle Dice on these images.

    The best rule replaces the default only where its mean gain per image is more than twice the gain's
    standard error: on the validation images of a few subjects, a rule picked among hundreds for a small gain
    fits those images, and measured on unseen patients it lost (docs/results.md). Ties go to the default, so
    the chosen rule never scores below it. A model with a presence output keeps using it (presence thresholds
    0.3-0.7); one without has only presence threshold 0.
    """
    balanced = balanced and 0 < images_empty < images
    sums, squared_gains = tuning[0], tuning[1]
    objective = sums
    if balanced:
        empty_sums = tuning[2]
        objective = empty_sums / (2 * images_empty) + (sums - empty_sums) / (2 * (images - images_empty))
    default = default_index(has_presence=has_presence)
    best = default
    for index in np.ndindex(*objective.shape):
        if (index[0] > 0) == has_presence and objective[index] > objective[best] + 1e-9:
            best = index
    if images > 1:
        if balanced:  # the gain of a mean over each half: the halves' variances, each over its count, weigh 1/4
            empty_gain, target_gain = gain_and_variance(
                float(empty_sums[best] - empty_sums[default]), float(tuning[4][best]), images_empty
            ), gain_and_variance(
                float(sums[best] - empty_sums[best] - sums[default] + empty_sums[default]),
                float(squared_gains[best] - tuning[4][best]), images - images_empty)
            gain = (empty_gain[0] + target_gain[0]) / 2
            error = math.sqrt((empty_gain[1] / images_empty + target_gain[1] / (images - images_empty)) / 4)
        else:
            gain, variance = gain_and_variance(float(sums[best] - sums[default]), float(squared_gains[best]), images)
            error = math.sqrt(variance / images)
        if gain <= 2 * error:
            best = default  # within the noise of these images
    p, k, t, a = best
    chosen = PostProcessing(THRESHOLDS[t], bool(k), MIN_AREA_FRACTIONS[a], PRESENCE_THRESHOLDS[p])
    return chosen, float(sums[best]), float(sums[default])


def gain_and_variance(gain_sum: float, squared_gain_sum: float, count: int) -> tuple[float, float]:
    """The mean gain per image and its sample variance, from the sums of the gains and of their squares (infinite
    for a single image: its gain could be all noise)."""
    if count < 2:
        return gain_sum / max(count, 1), math.inf
    gain = gain_sum / count
    return gain, max(squared_gain_sum / count - gain**2, 0.0) * count / (count - 1)


def metrics_of_rule(tuning: torch.Tensor, rule: PostProcessing, *, images: int, images_empty: int) -> dict:
    """The validation figures of `rule` (as DiceTally.summary, and the all-empty baseline), read from the summed
    tuning scores of `images` images, `images_empty` of them with an empty truth: no other pass over them."""
    dice, _, dice_of_empty, found = (float(plane[rule_index(rule)]) for plane in tuning[:4])
    tally = DiceTally(dice_of_empty, images_empty, dice - dice_of_empty, images - images_empty, round(found))
    return tally.summary() | {"all_empty_baseline": images_empty / max(images, 1)}
