"""What train.py decides on validation, and reports: each fold's validation predictions (by the best model of
the fold, with and without test-time augmentation) are kept as summed tuning scores; the post-processing,
the presence rule and whether to use test-time augmentation are chosen on all folds' scores pooled, as
nnU-Net chooses its post-processing on the pooled out-of-fold predictions. With one fold (the default) the
same code chooses on the one validation split.
"""

import statistics

import torch
from torch import nn

from nerveseg.distributed import Process
from nerveseg.ensemble import TestTimeAugmentation
from nerveseg.postprocess import PostProcessing, choose_postprocessing, metrics_of_rule
from nerveseg.training.evaluation import evaluate

# Test-time augmentation runs the model once per view (5 by default): it is used only when the pooled validation
# Dice gains more than this with it.
MIN_TTA_GAIN = 0.005
FIGURES = ("dice", "dice_empty", "dice_nonempty", "presence_accuracy")


def fold_validation(fold: int, *, best_epoch: int, val_items: list[dict], plain: torch.Tensor,
                    augmented: torch.Tensor) -> dict:
    """What a fold leaves for the pooled choice (its validation.pt): its subjects, image counts, and the summed
    tuning scores of its best model without ("plain") and with ("tta") test-time augmentation."""
    return {
        "fold": fold,
        "best_epoch": best_epoch,
        "subjects": sorted({item["subject"] for item in val_items}),
        "images": len(val_items),
        "images_empty": sum(item["empty"] for item in val_items),
        "plain": plain,
        "tta": augmented,
    }


def validate_fold(model: nn.Module, loader: torch.utils.data.DataLoader, loss_function: nn.Module, process: Process,
                  *, fold: int, best: dict, val_items: list[dict], tta: dict, amp: bool, quiet: bool) -> dict:
    """The fold's best model (`best`, loaded into `model`) on its validation subjects, without and with test-time
    augmentation (`tta`: zoom, shift, flip): its fold_validation, on which the post-processing and the
    augmentation are chosen."""
    model.load_state_dict(best["state_dict"])
    _, plain = evaluate(model, loader, loss_function, process, amp=amp, tune=True, quiet=quiet)
    size = tuple(best["preprocessing"]["image_size"])
    augmented_model = TestTimeAugmentation(model, size=size, **tta)
    _, augmented = evaluate(augmented_model, loader, loss_function, process, amp=amp, tune=True, quiet=quiet)
    return fold_validation(fold, best_epoch=best["epoch"], val_items=val_items, plain=plain, augmented=augmented)


def choose_on_validation(validations: list[dict], *, has_presence: bool, balanced: bool
                         ) -> tuple[PostProcessing, bool, dict]:
    """The post-processing rule (balanced: as if half of the images were empty, see choose_postprocessing) and
    whether to use test-time augmentation, chosen on all folds pooled; with the pooled Dice of the best rule
    without and with augmentation."""
    images = sum(v["images"] for v in validations)
    empty = sum(v["images_empty"] for v in validations)
    rules, dice = {}, {}
    for view in ("plain", "tta"):
        pooled = sum(v[view] for v in validations)
        rules[view] = choose_postprocessing(pooled, images=images, images_empty=empty, has_presence=has_presence,
                                            balanced=balanced)[0]
        dice[view] = metrics_of_rule(pooled, rules[view], images=images, images_empty=empty)["dice"]
    use_tta = dice["tta"] - dice["plain"] > MIN_TTA_GAIN
    return rules["tta" if use_tta else "plain"], use_tta, dice


def cross_validation_summary(validations: list[dict], *, rule: PostProcessing, use_tta: bool,
                             default_rule: PostProcessing) -> dict:
    """Each fold's validation figures with the default rule ("raw") and the chosen one ("postprocessed"), their
    mean and standard deviation over the folds, and the figures of all folds' images pooled."""
    view = "tta" if use_tta else "plain"
    folds = [
        {
            "fold": v["fold"],
            "best_epoch": v["best_epoch"],
            "subjects": v["subjects"],
            "raw": metrics_of_rule(v["plain"], default_rule, images=v["images"], images_empty=v["images_empty"]),
            "postprocessed": metrics_of_rule(v[view], rule, images=v["images"], images_empty=v["images_empty"]),
        }
        for v in validations
    ]
    images, empty = sum(v["images"] for v in validations), sum(v["images_empty"] for v in validations)
    summary = {"folds": folds, "mean": {}, "sd": {}}
    for kind in ("raw", "postprocessed"):
        for statistic, function in (("mean", statistics.mean), ("sd", spread)):
            summary[statistic][kind] = {
                key: function(values) if (values := [f[kind][key] for f in folds if f[kind][key] is not None])
                else None
                for key in FIGURES
            }
    summary["pooled"] = {
        "raw": metrics_of_rule(sum(v["plain"] for v in validations), default_rule, images=images, images_empty=empty),
        "postprocessed": metrics_of_rule(sum(v[view] for v in validations), rule, images=images, images_empty=empty),
    }
    return summary


def spread(values: list[float]) -> float:
    """The sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def describe_cross_validation(summary: dict, *, tta_dice: dict, use_tta: bool) -> str:
    """The summary as a table of lines, for the end of train.py --folds."""

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    def figures(raw: dict, post: dict) -> str:
        values = (raw["dice"], post["dice"], post["dice_empty"], post["dice_nonempty"], post["presence_accuracy"])
        return "".join(f"{figure(value):>11}" for value in values)

    lines = [f"cross-validation over {len(summary['folds'])} folds, each validated on subjects its model never saw "
             "(raw: threshold 0.5; post: the rule chosen on all folds pooled, and its empty truths, targets and "
             "presence):",
             f"{'fold':>6}{'images':>8}{'empty':>7}{'epoch':>7}{'Dice raw':>11}{'Dice post':>11}{'empty':>11}"
             f"{'target':>11}{'presence':>11}"]
    for fold in summary["folds"]:
        raw, post = fold["raw"], fold["postprocessed"]
        lines.append(f"{fold['fold']:>6}{raw['images']:>8}{raw['images_empty']:>7}{fold['best_epoch']:>7}"
                     + figures(raw, post))
    for statistic in ("mean", "sd"):
        row = summary[statistic]
        lines.append(f"{statistic:>6}{'':>22}" + figures(row["raw"], row["postprocessed"]))
    pooled = summary["pooled"]
    lines.append(f"{'pooled':>6}{pooled['raw']['images']:>8}{pooled['raw']['images_empty']:>7}{'':>7}"
                 + figures(pooled["raw"], pooled["postprocessed"])
                 + f"   (all-empty baseline {pooled['raw']['all_empty_baseline']:.4f})")
    lines.append(f"test-time augmentation {'on' if use_tta else 'off'}: pooled Dice {tta_dice['tta']:.4f} with it, "
                 f"{tta_dice['plain']:.4f} without (on only when it gains more than {MIN_TTA_GAIN})")
    return "\n".join(lines)
