"""Pictures worth looking at: training curves, and predictions drawn over the ultrasound."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on servers with no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from nerveseg.files import atomic_write, name_text  # noqa: E402

PREDICTION_COLOUR, TRUTH_COLOUR = "#ff3b30", "#34c759"


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    """Write a figure as PNG, atomically, and close it."""
    with atomic_write(path, "wb") as file:
        figure.savefig(file, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_training_curves(rows: list[dict], path: str | Path) -> None:
    """Loss (training and validation) and validation Dice per epoch, from the metrics CSV rows."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in rows]
    loss_axis.plot(epochs, [row["train_loss"] for row in rows], label="training loss")
    validated = [row for row in rows if row.get("val_dice") not in ("", None)]
    val_epochs = [row["epoch"] for row in validated]
    loss_axis.plot(val_epochs, [row["val_loss"] for row in validated], "o-", label="validation loss")
    loss_axis.set(xlabel="epoch", ylabel="loss (Dice + cross-entropy + presence)", title="Loss")
    loss_axis.legend()
    for key, label in (
        ("val_dice", "all images"),
        ("val_dice_nonempty", "target present"),
        ("val_dice_empty", "empty truth"),
        ("val_presence_accuracy", "presence right (share)"),
    ):
        points = [(row["epoch"], row[key]) for row in validated if row.get(key) not in ("", None)]  # "": none
        if points:
            dice_axis.plot(*zip(*points, strict=True), "o-", label=label)
    if validated:
        dice_axis.axhline(
            validated[0]["all_empty_baseline"], color="grey", linestyle="--", label="baseline: predict every mask empty"
        )
    dice_axis.set(xlabel="epoch", ylabel="Kaggle Dice (validation subjects)", title="Validation Dice", ylim=(0, 1))
    dice_axis.legend(loc="lower right")
    save_figure(figure, path)


def plot_cross_validation(summary: dict, path: str | Path) -> None:
    """Each fold's validation Dice (raw and post-processed; empty truths and targets apart), the mean ± sd over
    the folds as a band, and the all-empty baseline, from crossval.cross_validation_summary."""
    folds = summary["folds"]
    positions = np.arange(len(folds))
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(folds) + 3), 4.5))
    bars = (("raw", "Dice, threshold 0.5", "#b0b8c4"), ("postprocessed", "Dice, chosen rule", "#1f77b4"))
    for offset, (kind, label, colour) in zip((-0.2, 0.2), bars, strict=True):
        axis.bar(positions + offset, [fold[kind]["dice"] for fold in folds], width=0.4, color=colour, label=label)
    for key, marker, label in (("dice_empty", "s", "empty truths"), ("dice_nonempty", "^", "with a target")):
        values = [fold["postprocessed"][key] for fold in folds]
        if any(value is not None for value in values):
            axis.plot(positions + 0.2, [np.nan if v is None else v for v in values], marker, color="black",
                      markeredgecolor="white", linestyle="none", label=f"chosen rule: {label}")
    mean, sd = summary["mean"]["postprocessed"]["dice"], summary["sd"]["postprocessed"]["dice"]
    axis.axhspan(mean - sd, mean + sd, color="#1f77b4", alpha=0.12)
    axis.axhline(mean, color="#1f77b4", label=f"mean {mean:.3f} ± {sd:.3f}")
    baseline = summary["pooled"]["postprocessed"]["all_empty_baseline"]
    axis.axhline(baseline, color="grey", linestyle="--", label=f"baseline: every mask empty ({baseline:.3f})")
    axis.set_xticks(positions, [f"fold {fold['fold']}\n{fold['raw']['images']} images" for fold in folds])
    axis.set(ylabel="Kaggle Dice (validation subjects)", ylim=(0, 1.05),
             title=f"Cross-validation: {len(folds)} folds, each validated on subjects its model never saw")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=3, frameon=False)
    save_figure(figure, path)


def plot_predictions(examples: list[dict], path: str | Path, title: str) -> None:
    """One row per example: the ultrasound, and the same image with the predicted outline (and the truth's).

    Each example is {"id", "image" (H, W) uint8, "prediction" (H, W) 0/1, optional "truth" (H, W) 0/1,
    optional "dice"}.
    """
    figure, axes = plt.subplots(len(examples), 2, figsize=(10, 3.6 * len(examples)), squeeze=False)
    for (left, right), example in zip(axes, examples, strict=True):
        for axis in (left, right):
            axis.imshow(example["image"], cmap="gray", vmin=0, vmax=255)
            axis.set_axis_off()
        left.set_title(f"{name_text(example['id'])}: ultrasound")
        handles = []
        for key, colour, label in (("truth", TRUTH_COLOUR, "truth"), ("prediction", PREDICTION_COLOUR, "prediction")):
            mask = example.get(key)
            if mask is not None:
                if np.any(mask):
                    right.contour(mask, levels=[0.5], colors=colour, linewidths=2)
                empty = "" if np.any(mask) else " (empty)"
                handles.append(Line2D([], [], color=colour, linewidth=2, label=f"{label}{empty}"))
        score = f", Dice {example['dice']:.2f}" if example.get("dice") is not None else ""
        right.set_title(f"{name_text(example['id'])}: outline{score}")
        right.legend(handles=handles, loc="lower right", fontsize=9)
    figure.suptitle(title)
    save_figure(figure, path)
