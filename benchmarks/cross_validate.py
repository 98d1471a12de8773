"""Compare settings of train.py by cross-validation on clean folders, and on their held-out subjects.

    python benchmarks/cross_validate.py --data /tmp/peers/bus --work /tmp/levers/bus --variant defaults
    python benchmarks/cross_validate.py --data /tmp/peers/bus --work /tmp/levers/bus --variant balance \
        -- --presence-balance true
    python benchmarks/cross_validate.py --table /tmp/levers/bus /tmp/levers/usgra

Each variant is `train.py --folds FOLDS --max-epochs EPOCHS` with the options after `--`, then predict.py (the
fold models' ensemble) on the held-out subjects of `data_cleaning.py --hold-out`. Kept in WORK/VARIANT/result.json
(a variant already there is skipped). Recorded: the pooled out-of-fold figures of every training subject with
the default rule (threshold 0.5, presence 0.5: what a one-split run without a tuned rule does) and with the rule
chosen on them; the held-out Kaggle Dice, empty truths and targets separately, the all-empty baseline; and the
held-out Dice re-weighted to other shares of empty truths (--mixes), for test sets whose prior differs from
training's. Time is CPU time of train.py and its children.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from conversion import held_out_items  # noqa: E402
from nnunet import timed  # noqa: E402

from nerveseg.checkpoint import load_checkpoint, read_torch_file  # noqa: E402
from nerveseg.data import read_manifest  # noqa: E402
from nerveseg.errors import exit_on_user_error  # noqa: E402
from nerveseg.files import write_json  # noqa: E402
from nerveseg.postprocess import (  # noqa: E402
    choose_postprocessing,
    default_index,
    rule_index,
    tuning_scores,
    upsample,
)
from nerveseg.training.evaluation import presence_probabilities  # noqa: E402
from nerveseg.transforms import collate_keep_sizes, load_transforms, network_input, unpack_mask  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a clean folder of data_cleaning.py --hold-out")
    parser.add_argument("--work", type=Path, help="folder for the variants' runs and results")
    parser.add_argument("--variant", help="the name of this variant (its folder in WORK)")
    parser.add_argument("--folds", type=int, default=3, help="train.py --folds")
    parser.add_argument("--epochs", type=int, default=10, help="train.py --max-epochs")
    parser.add_argument("--mixes", default="0.23,0.49", help="shares of empty truths to re-weight the held-out Dice to")
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these WORK folders and stop")
    parser.add_argument("--policies", action="store_true", help="with --table: the ways to choose the rule")
    parser.add_argument("options", nargs="*", help="train.py options for this variant (after --)")
    arguments = parser.parse_args()
    if not arguments.table and not (arguments.data and arguments.work and arguments.variant):
        parser.error("give --data, --work and --variant (or --table)")
    return arguments


def held_out_scores(images_csv: Path, data: Path, mixes: list[float]) -> dict:
    """predict.py's per-image Dice on the held-out subjects: all, empty truths, targets, and re-weighted."""
    with open(data / "manifest.csv", newline="", encoding="utf-8") as file:
        empty = {row["id"]: int(row["mask_area"]) == 0 for row in csv.DictReader(file) if row["split"] == "held-out"}
    with open(images_csv, newline="", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if row["dice"]]
    dice = {kind: [float(r["dice"]) for r in rows if empty[r["img"]] is kind] for kind in (True, False)}
    found = sum(int(r["mask_area"]) > 0 for r in rows if not empty[r["img"]])

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    scores = {"images": len(rows), "images_empty": len(dice[True]), "dice": mean(dice[True] + dice[False]),
              "dice_empty": mean(dice[True]), "dice_nonempty": mean(dice[False]),
              "empty_left_empty": sum(d == 1.0 for d in dice[True]), "targets_found": found,
              "all_empty_baseline": len(dice[True]) / len(rows)}
    if dice[True] and dice[False]:
        scores["mixes"] = reweighted(scores["dice_empty"], scores["dice_nonempty"], mixes)
    return scores


def per_image_scores(model: torch.nn.Module, items: list[dict], image_size: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's tuning scores (postprocess.tuning_scores: every rule's Dice, ...), shape (N, 5, P, 2, T, A),
    and whether its truth is empty (N,); without test-time augmentation."""
    dataset = Dataset(items, load_transforms(image_size, with_label=True, keep_full_label=True))
    scores, empty = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=32, collate_fn=collate_keep_sizes):
            mask_logits, presence_logits = model(network_input(batch["image"]))
            sizes = [tuple(size.tolist()) for size in batch["original_size"]]
            full_size = upsample(torch.sigmoid(mask_logits.float()), sizes)
            for probability, presence, bits, size in zip(full_size, presence_probabilities(presence_logits, len(sizes)),
                                                         batch["full_label"], sizes, strict=True):
                truth = unpack_mask(bits, size)
                scores.append(tuning_scores(probability, presence, truth, has_presence=True))
                empty.append(not truth.any())
    return torch.stack(scores), torch.tensor(empty)


def choose(scores: torch.Tensor, empty: torch.Tensor, *, balanced: bool, gate: bool) -> tuple[int, ...]:
    """The rule (its index in the tuning grid) that scores best on these images: by Kaggle Dice, or (balanced) by
    the mean of the Dice of empty truths and of targets; with gate, train.py's own choice
    (postprocess.choose_postprocessing: the default unless the gain beats twice its standard error)."""
    images, images_empty = len(empty), int(empty.sum())
    if gate:
        return rule_index(choose_postprocessing(scores.sum(0), images=images, images_empty=images_empty,
                                                has_presence=True, balanced=balanced)[0])
    dice = scores[:, 0]
    weights = torch.ones(images, dtype=torch.float64) / images
    if balanced and 0 < images_empty < images:
        weights = torch.where(empty, 0.5 / images_empty, 0.5 / (images - images_empty)).double()
    objective = torch.einsum("n,n...->...", weights, dice)
    objective[0] = -1  # presence threshold 0: presence not used
    best = tuple(int(i) for i in np.unravel_index(int(torch.argmax(objective)), objective.shape))
    default = default_index(has_presence=True)
    return default if objective[best] <= objective[default] + 1e-9 else best  # ties go to the default


def reweighted(dice_empty: float, dice_nonempty: float, mixes: list[float]) -> dict:
    """The Dice of a test set with these shares of empty truths: share x empty truths' Dice + rest x targets'."""
    return {f"{m:.2f}": m * dice_empty + (1 - m) * dice_nonempty for m in mixes}


def figures(scores: torch.Tensor, empty: torch.Tensor, rule: tuple[int, ...], mixes: list[float]) -> dict:
    """Kaggle Dice of a rule, of empty truths and of targets, and re-weighted to other shares of empty truths."""
    dice = scores[(slice(None), 0, *rule)]
    result = {"dice": float(dice.mean()), "dice_empty": float(dice[empty].mean()) if empty.any() else None,
              "dice_nonempty": float(dice[~empty].mean()) if (~empty).any() else None}
    if empty.any() and (~empty).any():
        result["mixes"] = reweighted(result["dice_empty"], result["dice_nonempty"], mixes)
    return result


def rule_policies(folder: Path, data: Path, mixes: list[float]) -> dict:
    """Ways to choose the presence rule, each scored on the held-out subjects: per fold (as a one-split run,
    train.py --folds 1, would: the fold's model, the rule chosen on its own validation subjects; the mean over
    the folds) and for the ensemble (the rule chosen on all folds' validation images pooled)."""
    run = next((folder / "runs").iterdir())
    by_subject = {}
    for item in read_manifest(data):
        by_subject.setdefault(item["subject"], []).append(item)
    held_items = held_out_items(data)
    policies = {"default": None, "kaggle, gate": (False, True), "balanced, gate (today)": (True, True),
                "kaggle": (False, False), "balanced": (True, False)}
    per_fold, pooled_scores, pooled_empty = {name: [] for name in policies}, [], []
    for fold, path in enumerate(sorted(run.glob("*/validation.pt")), start=1):
        subjects = read_torch_file(path)["subjects"]
        model, checkpoint = load_checkpoint(folder / "model.pt", fold=fold)
        size = checkpoint["preprocessing"]["image_size"]
        val_scores, val_empty = per_image_scores(model, [i for s in subjects for i in by_subject[s]], size)
        held_scores, held_empty = per_image_scores(model, held_items, size)
        pooled_scores.append(val_scores)
        pooled_empty.append(val_empty)
        for name, policy in policies.items():
            rule = default_index(has_presence=True) if policy is None else choose(
                val_scores, val_empty, balanced=policy[0], gate=policy[1])
            per_fold[name].append(figures(held_scores, held_empty, rule, mixes) | {"rule": rule})
    model, checkpoint = load_checkpoint(folder / "model.pt")
    held_scores, held_empty = per_image_scores(model, held_items, checkpoint["preprocessing"]["image_size"])
    pooled_scores, pooled_empty = torch.cat(pooled_scores), torch.cat(pooled_empty)
    ensemble = {}
    for name, policy in policies.items():
        rule = default_index(has_presence=True) if policy is None else choose(
            pooled_scores, pooled_empty, balanced=policy[0], gate=policy[1])
        ensemble[name] = figures(held_scores, held_empty, rule, mixes) | {
            "rule": rule, "out_of_fold": figures(pooled_scores, pooled_empty, rule, mixes)}
    return {"per_fold": per_fold, "ensemble": ensemble}


def run_variant(arguments: argparse.Namespace) -> dict:
    """Train the variant by cross-validation, predict the held-out subjects, score both."""
    folder = arguments.work / arguments.variant
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.pt"
    common = ["--pictures", str(folder / "Images")]
    training = timed([sys.executable, "train.py", "--data-dir", str(arguments.data), "--folds", str(arguments.folds),
                      "--max-epochs", str(arguments.epochs), "--runs-dir", str(folder / "runs"), "--model-path",
                      str(model), "--tensorboard", "false", *common, *arguments.options], folder / "train.log")
    held_out = arguments.data / "held-out"
    prediction = timed([sys.executable, "predict.py", "--checkpoint", str(model), "--input",
                        str(held_out / "images"), "--masks", str(held_out / "masks"),
                        "--output", str(folder / "predictions"), "--submission", "false", "--report", "false",
                        "--num-workers", "0", *common], folder / "predict.log")
    run = next((folder / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    mixes = [float(m) for m in arguments.mixes.split(",")]
    return {"variant": arguments.variant, "options": arguments.options, "data": str(arguments.data),
            "folds": arguments.folds, "epochs": arguments.epochs, "training": training, "prediction": prediction,
            "cross_validation": summary["metrics"]["pooled"], "rule": summary["postprocessing"],
            "tta": summary["test_time_augmentation"],
            "held_out": held_out_scores(folder / "predictions" / "images.csv", arguments.data, mixes),
            "policies": rule_policies(folder, arguments.data, mixes)}


def table(works: list[Path]) -> str:
    """One markdown row a variant and data set: pooled out-of-fold Dice (default rule, chosen rule, its empty
    truths and targets), then the held-out figures."""
    lines = ["| data | variant | OOF Dice, default rule | OOF Dice, chosen rule (empty / targets) | OOF all-empty "
             "| held-out Dice (empty left empty / targets found) | held-out all-empty | re-weighted | CPU min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for work in works:
        for path in sorted(work.glob("*/result.json")):
            r = json.loads(path.read_text(encoding="utf-8"))
            raw, post, held = r["cross_validation"]["raw"], r["cross_validation"]["postprocessed"], r["held_out"]

            def f(value: float | None) -> str:
                return "-" if value is None else f"{value:.3f}"

            mixes = ", ".join(f"{k}: {f(v)}" for k, v in held.get("mixes", {}).items())
            lines.append(
                f"| {work.name} | {r['variant']} {' '.join(r['options'])} | {f(raw['dice'])} | {f(post['dice'])} "
                f"({f(post['dice_empty'])} / {f(post['dice_nonempty'])}) | {f(raw['all_empty_baseline'])} "
                f"| {f(held['dice'])} ({held['empty_left_empty']} of {held['images_empty']} / "
                f"{held['targets_found']} of {held['images'] - held['images_empty']}, {f(held['dice_nonempty'])}) "
                f"| {f(held['all_empty_baseline'])} | {mixes} | {r['training']['cpu_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def policy_table(works: list[Path]) -> str:
    """One markdown row a variant, data set and way of choosing the rule: the held-out figures of one split
    (the mean over the folds' models, each with the rule chosen on its own validation subjects) and of the
    ensemble (the rule chosen on all folds pooled)."""

    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["| data | variant | rule chosen by | one split: held-out Dice (empty / targets) | re-weighted "
             "| ensemble: held-out Dice (empty / targets) | re-weighted |", "|---|---|---|---|---|---|---|"]
    for work in works:
        for path in sorted(work.glob("*/result.json")):
            r = json.loads(path.read_text(encoding="utf-8"))
            for name, folds in r.get("policies", {}).get("per_fold", {}).items():
                mean = {key: None if folds[0][key] is None else sum(x[key] for x in folds) / len(folds)
                        for key in ("dice", "dice_empty", "dice_nonempty")}
                mixes = {k: sum(x["mixes"][k] for x in folds) / len(folds) for k in folds[0].get("mixes", {})}
                ensemble = r["policies"]["ensemble"][name]
                lines.append(
                    f"| {work.name} | {r['variant']} | {name} | {f(mean['dice'])} ({f(mean['dice_empty'])} / "
                    f"{f(mean['dice_nonempty'])}) | {', '.join(f'{k}: {f(v)}' for k, v in mixes.items())} "
                    f"| {f(ensemble['dice'])} ({f(ensemble['dice_empty'])} / {f(ensemble['dice_nonempty'])}) "
                    f"| {', '.join(f'{k}: {f(v)}' for k, v in ensemble.get('mixes', {}).items())} |")
    return "\n".join(lines)


def main() -> None:
    """Run one variant, or print the table."""
    arguments = parse_arguments()
    if arguments.table:
        print(policy_table(arguments.table) if arguments.policies else table(arguments.table))
        return
    result_path = arguments.work / arguments.variant / "result.json"
    if result_path.is_file():
        print(f"kept from before: {result_path}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
        if "policies" not in result:  # written before the rules were compared
            mixes = [float(m) for m in arguments.mixes.split(",")]
            write_json(result_path, result | {"policies": rule_policies(result_path.parent, arguments.data, mixes)})
    else:
        write_json(result_path, run_variant(arguments))
    print(table([arguments.work]))


if __name__ == "__main__":
    exit_on_user_error("benchmarks/cross_validate.py")
    main()
