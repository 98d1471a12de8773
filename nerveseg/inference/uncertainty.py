"""How sure the model is of each image: one "uncertainty" figure from 0 (sure) to 1, and whether it means something.

Where several predictions are averaged (the fold models of an ensemble, the views of test-time augmentation),
the figure is how much they disagree: the mean over the members of 1 - Dice (Kaggle rule) between a member's
own mask (its threshold and presence rule) and the averaged one. For one model, it is the larger of two doubts:
how close the presence probability is to its threshold (1 at the threshold, 0 at 0 or 1), and the share of the
mask's candidate pixels (those above the threshold less NEAR) whose probability lies within NEAR of the
threshold. Both are computed at the network's size, before the maps are resized back.

`uncertainty_check` measures it on images with truths: how many of the most uncertain tenth are wrong (Dice
below 0.5) against the rest, and the area under the ROC curve of the figure as a predictor of a wrong image.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nerveseg.ensemble import Ensemble, TestTimeAugmentation
from nerveseg.metrics import kaggle_dice
from nerveseg.postprocess import PostProcessing

NEAR = 0.2  # a pixel whose probability is within this of the mask threshold is a doubtful one
WRONG_BELOW = 0.5  # an image whose Dice is below this is a wrong one


class MemberOutputs:
    """Records, during the predictor's forward pass, each member's mask and presence verdict, mapped back to the
    image's frame: the fold models of an Ensemble, the views of TestTimeAugmentation (of each fold model when
    both). Forward hooks, so the averaged outputs are computed exactly as without them. Without members (one
    model, or an ONNX graph, whose ensemble was fixed at export) `members` is 0."""

    def __init__(self, predictor: object, post: PostProcessing) -> None:
        model = getattr(predictor, "model", None)
        self.post, self.recorded = post, []
        tta = model if isinstance(model, TestTimeAugmentation) else None
        inner = tta.model if tta is not None else model
        folds = list(inner.members) if isinstance(inner, Ensemble) else [inner]
        self.augmentation, self.folds = tta, len(folds)
        count = self.folds * (len(tta.views) if tta is not None else 1)
        self.members = count if model is not None and count > 1 else 0
        if self.members:
            for fold in {id(fold): fold for fold in folds}.values():  # a model listed twice is called twice
                fold.register_forward_hook(self.record)

    def record(self, module: nn.Module, inputs: tuple, outputs: tuple) -> None:
        """One member's outputs for a batch: its mask at the threshold (in the image's frame) and where it saw."""
        view = len(self.recorded) // self.folds if self.augmentation is not None else 0
        mask_logits, presence_logits = outputs
        probability = torch.sigmoid(mask_logits.float())
        seen = torch.ones_like(probability, dtype=torch.bool)
        if view > 0:  # a shifted or zoomed view: back to the image's frame; only where it showed the image counts
            back = self.augmentation.back_grids[view - 1].expand(probability.shape[0], -1, -1, -1)
            probability = F.grid_sample(probability, back, mode="bilinear", padding_mode="zeros", align_corners=False)
            seen = F.grid_sample(torch.ones_like(probability), back, align_corners=False) > 0.99
        mask = probability > self.post.threshold
        if presence_logits is not None:
            absent = torch.sigmoid(presence_logits.float()) < self.post.presence_threshold
            mask = mask & ~absent.view(-1, 1, 1, 1)
        self.recorded.append((mask, seen))

    def uncertainty(self, probabilities: torch.Tensor, presences: list[float]) -> list[float]:
        """Each image's figure, from the batch's averaged (N, 1, h, w) probabilities and presences at the network's
        size; the members' records of this batch are used up."""
        if not self.members:
            return [single_model_uncertainty(map_, presence, self.post) for map_, presence in
                    zip(probabilities, presences, strict=True)]
        consensus = probabilities.float() > self.post.threshold
        absent = torch.tensor(presences, device=consensus.device) < self.post.presence_threshold
        consensus = consensus & ~absent.view(-1, 1, 1, 1)
        disagreement = torch.stack([1 - kaggle_dice(mask & seen, consensus & seen) for mask, seen in self.recorded])
        self.recorded = []
        return disagreement.mean(0).tolist()


def single_model_uncertainty(probability: torch.Tensor, presence: float, post: PostProcessing) -> float:
    """One model's doubt about one image: the larger of the presence probability's closeness to its threshold
    and the share of doubtful pixels among the candidate ones (see the module's docstring); when the presence
    rule empties the mask, only the first counts."""
    threshold = post.presence_threshold
    presence_doubt = 0.0
    if threshold > 0:
        presence_doubt = 1 - abs(presence - threshold) / (threshold if presence < threshold else 1 - threshold)
        if presence < threshold:
            return max(presence_doubt, 0.0)
    candidates = probability > post.threshold - NEAR
    doubtful = candidates & (probability < post.threshold + NEAR)
    count = int(candidates.sum())
    pixel_doubt = int(doubtful.sum()) / count if count else 0.0
    return max(presence_doubt, pixel_doubt, 0.0)


def roc_auc(scores: list[float], positives: list[bool]) -> float | None:
    """The area under the ROC curve: the chance that a positive scores above a negative (ties count half).
    None without both kinds."""
    ranked = sorted(zip(scores, positives, strict=True))
    count_positive = sum(positives)
    count_negative = len(ranked) - count_positive
    if not count_positive or not count_negative:
        return None
    rank_sum, start = 0.0, 0  # mid-ranks (1-based) of the positives, ties sharing their mean rank
    while start < len(ranked):
        end = start
        while end < len(ranked) and ranked[end][0] == ranked[start][0]:
            end += 1
        rank_sum += (start + end + 1) / 2 * sum(positive for _, positive in ranked[start:end])
        start = end
    return (rank_sum - count_positive * (count_positive + 1) / 2) / (count_positive * count_negative)


def uncertainty_check(uncertainties: list[float], dices: list[float]) -> dict | None:
    """Whether the figure tells the wrong images (Dice below WRONG_BELOW) apart, on images with truths: the
    share of wrong ones among the most uncertain tenth (at least one image) and among the rest, and the AUC.
    None for fewer than 10 images."""
    if len(dices) < 10:
        return None
    order = sorted(range(len(dices)), key=lambda i: -uncertainties[i])
    top = order[: max(1, len(order) // 10)]
    rest = order[len(top):]
    wrong = [dice < WRONG_BELOW for dice in dices]
    return {
        "images": len(dices),
        "top_tenth": len(top),
        "wrong_in_top_tenth": sum(wrong[i] for i in top) / len(top),
        "wrong_in_rest": sum(wrong[i] for i in rest) / len(rest),
        "wrong": sum(wrong) / len(wrong),
        "auc": roc_auc(uncertainties, wrong),
    }


def describe_check(check: dict) -> str:
    """uncertainty_check's figures in words."""
    auc = "none (no wrong image, or all wrong)" if check["auc"] is None else f"{check['auc']:.3f}"
    return (f"{check['wrong_in_top_tenth']:.0%} of the most uncertain tenth ({check['top_tenth']} "
            f"images) have a Dice below {WRONG_BELOW}, {check['wrong_in_rest']:.0%} of the rest; AUC {auc}")
