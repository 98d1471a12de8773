"""Side by side with nnU-Net v2: both systems trained on the same split of a clean folder, at the same input size,
predict the same held-out subjects, scored by the same Kaggle Dice.

    python data_cleaning.py --source ../shared/data/bus-uclm --output /tmp/peers/bus \\
        --subjects '^(?P<subject>[A-Z]{4})_' --hold-out 0.25
    python benchmarks/peers/nnunet.py --data /tmp/peers/bus --work /tmp/peers/bus-work --dataset-id 501 \\
        --name BusUclm --epochs 10 --nnunet-python /tmp/nnunet-venv/bin/python

Steps, each kept in WORK and skipped when run again (delete WORK to start over):
 1. train.py's split (its VAL_FRACTION and SEED) and the held-out subjects of data_cleaning.py --hold-out are
    written as an nnU-Net raw dataset at train.py's IMAGE_HEIGHT x IMAGE_WIDTH (conversion.py), with
    splits_final.json holding that one split (nnU-Net's 5-fold cross-validation is not used).
 2. Ours: train.py --max-epochs EPOCHS, defaults otherwise; predict.py on the held-out images.
 3. nnU-Net plans and preprocesses its 2d configuration (nnunet_worker.py, run by --nnunet-python).
 4. nnU-Net at the same CPU time as ours: epochs a quarter as long as in step 5; after the first, the trainer
    sets the number of epochs to what the rest of our run's CPU time buys, and stretches its poly schedule to it.
 5. nnU-Net at the same number of training images seen as ours (EPOCHS epochs; iterations per epoch so that
    epochs x iterations x its batch reaches ours). Validation iterations are a fifth of the training ones (its
    default 50:250), in both budgets.
 6. With --nnunet-defaults (meant for a GPU, --device cuda): nnU-Net's own 1000 epochs of 250 iterations.
Each nnU-Net model predicts the held-out images; its target probability is resized bilinearly to each image's
size (as predict.py does for ours) and thresholded at 0.5.

Time is process CPU time (user + system, of the step's processes and their children, from getrusage), beside the
wall clock: on a shared machine CPU time grows little with other people's load, wall time does. nnU-Net augments
in its training process (nnUNet_n_proc_DA=0), as train.py does, so that all its CPU time is counted and limited
the same way. The table goes to WORK/results.md and WORK/results.json.
"""

import argparse
import functools
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conversion import (
    dataset_folder_name,
    held_out_items,
    probabilities_to_mask,
    read_binary_mask,
    read_json,
    score,
    training_split,
    write_raw_dataset,
    write_splits,
)

from nerveseg.errors import exit_on_user_error
from nerveseg.files import atomic_write, write_json
from nerveseg.settings import script_defaults
from nerveseg.training.steps import epoch_plan

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("nnunet_worker.py")
TRAIN = script_defaults(ROOT / "train.py")
VAL_SHARE = 50 / 250  # nnU-Net's validation iterations per training iteration (its defaults)


def parse_arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a clean folder of data_cleaning.py --hold-out")
    parser.add_argument("--work", type=Path, required=True, help="folder for nnU-Net's data, the runs and the table")
    parser.add_argument("--dataset-id", type=int, default=501, help="nnU-Net's dataset number (1-999)")
    parser.add_argument("--name", default="Peers", help="nnU-Net's dataset name (letters and digits)")
    parser.add_argument("--epochs", type=int, default=10, help="train.py --max-epochs, and nnU-Net's epochs")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs train.py and predict.py")
    parser.add_argument("--nnunet-python", default=sys.executable,
                        help="the Python that has nnunetv2 (pip install -r benchmarks/peers/requirements.txt)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both systems")
    parser.add_argument("--nnunet-defaults", action="store_true",
                        help="also train nnU-Net with its own defaults, 1000 x 250 iterations (for a GPU)")
    arguments = parser.parse_args()
    if not arguments.name.isalnum():
        parser.error(f"--name is letters and digits only, not {arguments.name!r}")
    return arguments


def timed(command: list[str], log: Path, *, env: dict | None = None) -> dict:
    """Run a command (output to `log`); its wall time and CPU time (user + system of it and its children)."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    print(f"  {' '.join(command[:3])} ... (log: {log})", flush=True)
    with open(log, "w", encoding="utf-8") as output:
        finished = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if finished.returncode != 0:
        sys.exit(f"{command[1]} failed (exit {finished.returncode}); the end of {log}:\n"
                 + "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-30:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def once(path: Path, step) -> dict:
    """The result of a step: read from `path` when an earlier run wrote it, else computed and written there."""
    if path.is_file():
        print(f"  kept from before: {path}")
        return read_json(path)
    result = step()
    write_json(path, result)
    return result


def images_seen_by_ours(train_items: list[dict], epochs: int) -> int:
    """Training images train.py's default run passes through the network: epochs x steps x batch."""
    return epochs * epoch_plan(len(train_items), batch_size=TRAIN["BATCH_SIZE"],
                               min_steps=TRAIN["MIN_STEPS_PER_EPOCH"])[1]


def run_ours(arguments: argparse.Namespace, work: Path, test_items: list[dict], images_seen: int) -> dict:
    """train.py with --max-epochs, then predict.py on the held-out images; scored."""
    folder = work / "ours"
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.pt"
    common = ["--pictures", str(folder / "Images"), "--device", arguments.device]
    training = timed([arguments.python, "train.py", "--data-dir", str(arguments.data), "--max-epochs",
                      str(arguments.epochs), "--runs-dir", str(folder / "runs"), "--model-path", str(model),
                      "--tensorboard", "false", *common], folder / "train.log")
    prediction = timed([arguments.python, "predict.py", "--checkpoint", str(model), "--input",
                        str(arguments.data / "held-out" / "images"), "--output", str(folder / "predictions"),
                        "--submission", "false", *common], folder / "predict.log")
    masks = {item["id"]: read_binary_mask(folder / "predictions" / "masks" / f"{item['id']}.png")
             for item in test_items}
    return {"system": "ours", "budget": f"train.py --max-epochs {arguments.epochs}", "images_seen": images_seen,
            "training": training, "prediction": prediction, "scores": score(masks, test_items)}


def nnunet_environment(work: Path, results: Path) -> dict:
    """nnU-Net's folders (it reads them when imported), and no torch.compile (nnU-Net skips it on the CPU anyway)."""
    return os.environ | {
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(results),
        "nnUNet_compile": "false",
        "nnUNet_n_proc_DA": "0",
    }


def run_nnunet(arguments: argparse.Namespace, work: Path, test_items: list[dict], *, budget: str, epochs: int,
               iterations: int, cpu_seconds: float = 0.0) -> dict:
    """Train nnU-Net (fold 0: train.py's split) for epochs x iterations (or what cpu_seconds buys), predict the
    held-out images, score."""
    folder = work / "nnunet" / budget
    folder.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work, folder / "results")
    worker = [arguments.nnunet_python, str(WORKER)]
    dataset = ["--dataset", str(arguments.dataset_id), "--device", arguments.device]
    val_iterations = max(1, round(iterations * VAL_SHARE))
    training = timed([*worker, "train", *dataset, "--epochs", str(epochs), "--iterations", str(iterations),
                      "--val-iterations", str(val_iterations), "--cpu-seconds", str(cpu_seconds),
                      "--report", str(folder / "train.json")],
                     folder / "train.log", env=env)
    trained = read_json(folder / "train.json")
    prediction = timed([*worker, "predict", *dataset, "--output", str(folder / "predictions"),
                        "--report", str(folder / "predict.json")], folder / "predict.log", env=env)
    masks = {}
    for item in test_items:
        with np.load(folder / "predictions" / f"{item['id']}.npz") as saved:
            masks[item["id"]] = probabilities_to_mask(saved["probabilities"], read_binary_mask(item["label"]).shape)
    return {"system": "nnU-Net v2", "budget": budget, "images_seen": trained["images_seen"],
            "epochs": trained["epochs"], "iterations_per_epoch": iterations, "val_iterations_per_epoch": val_iterations,
            "epoch_cpu_seconds": trained["epoch_cpu_seconds"],
            "training": training, "prediction": prediction, "scores": score(masks, test_items)}


def table(rows: list[dict], plan: dict, machine: str) -> str:
    """The results as a Markdown table, with the plan nnU-Net chose and the all-empty baseline."""
    first = rows[0]["scores"]
    lines = [
        f"Held-out images: {first['images']}, {first['images_empty']} with an empty truth; all-empty baseline "
        f"{first['all_empty_baseline']:.3f}. Machine: {machine}.",
        f"nnU-Net's plan: {plan['network']}, {plan['stages']} stages, {plan['features'][0]}-{plan['features'][-1]} "
        f"features, {plan['parameters'] / 1e6:.1f} M parameters, batch {plan['batch_size']}, patch "
        f"{'x'.join(map(str, plan['patch_size']))}, deep supervision.",
        "",
        "| system | budget | Dice | empty truths left empty (Dice) | targets found (Dice on targets) "
        "| training CPU time | training wall time | images seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["scores"]
        targets = s["images"] - s["images_empty"]
        empty = (f"{s['empty_left_empty']} of {s['images_empty']} ({s['dice_empty']:.3f})"
                 if s["images_empty"] else "none")
        found = f"{s['targets_found']} of {targets} ({s['dice_nonempty']:.3f})" if targets else "none"
        budget = row["budget"] if row["system"] == "ours" else (
            f"{row['budget']}: {row['epochs']} x {row['iterations_per_epoch']} iterations")
        lines.append(
            f"| {row['system']} | {budget} | {s['dice']:.3f} | {empty} | {found} | "
            f"{row['training']['cpu_seconds'] / 60:.1f} min | {row['training']['wall_seconds'] / 60:.1f} min | "
            f"{row['images_seen']:,} |"
        )
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    """The CPU model and core count."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown"
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    """The steps of the module's docstring."""
    arguments = parse_arguments()
    sys.stdout.reconfigure(line_buffering=True)  # each step's line shows at once in a log file
    work = arguments.work.resolve()
    arguments.data = arguments.data.resolve()
    work.mkdir(parents=True, exist_ok=True)
    image_size = (TRAIN["IMAGE_HEIGHT"], TRAIN["IMAGE_WIDTH"])
    train_items, val_items = training_split(arguments.data, val_fraction=TRAIN["VAL_FRACTION"], seed=TRAIN["SEED"])
    test_items = held_out_items(arguments.data)
    name = dataset_folder_name(arguments.dataset_id, arguments.name)
    print(f"{len(train_items)} training, {len(val_items)} validation, {len(test_items)} held-out images; "
          f"{image_size[0]}x{image_size[1]}")

    print("1. nnU-Net's raw dataset and the split")
    if not (work / "nnUNet_raw" / name / "dataset.json").is_file():
        write_raw_dataset(work / "nnUNet_raw", arguments.dataset_id, arguments.name, train_items=train_items,
                          val_items=val_items, test_items=test_items, image_size=image_size)
    print("2. ours")
    ours = once(work / "ours.json",
                lambda: run_ours(arguments, work, test_items, images_seen_by_ours(train_items, arguments.epochs)))
    print("3. nnU-Net plans and preprocesses")
    # its planner sets torch's threads to nnUNet_n_proc_DA, which must not be 0 there
    plan_env = nnunet_environment(work, work / "nnunet") | {"nnUNet_n_proc_DA": str(os.cpu_count() or 1)}

    def plan() -> dict:
        planning = timed([arguments.nnunet_python, str(WORKER), "plan", "--dataset", str(arguments.dataset_id),
                          "--report", str(work / "plan-report.json")], work / "plan.log", env=plan_env)
        return read_json(work / "plan-report.json") | {"planning": planning}

    plan_record = once(work / "plan.json", plan)
    write_splits(work / "nnUNet_preprocessed" / name, train_items, val_items)
    batch = plan_record["batch_size"]
    print(f"   plan: {plan_record}")

    iterations = math.ceil(ours["images_seen"] / (arguments.epochs * batch))  # per epoch, for the same images
    budgets = [  # (step, result file, budget, epochs, iterations per epoch, CPU seconds)
        ("4. nnU-Net, the same CPU time", "nnunet-same-time.json", "same CPU time", 1000,
         max(1, round(iterations / 4)), ours["training"]["cpu_seconds"]),
        ("5. nnU-Net, the same images seen", "nnunet-same-images.json", "same images seen", arguments.epochs,
         iterations, 0.0),
    ]
    if arguments.nnunet_defaults:
        budgets.append(("6. nnU-Net, its own defaults", "nnunet-defaults.json", "nnU-Net's defaults", 1000, 250, 0.0))
    rows = [ours]
    for step, result_file, budget, epochs, per_epoch, cpu_seconds in budgets:
        print(step)
        rows.append(once(work / result_file, functools.partial(
            run_nnunet, arguments, work, test_items, budget=budget, epochs=epochs, iterations=per_epoch,
            cpu_seconds=cpu_seconds)))
        write_results(work, rows, plan_record)  # after every step: a stopped run keeps its table so far


def write_results(work: Path, rows: list[dict], plan_record: dict) -> None:
    """WORK/results.md and results.json, and the table printed."""
    text = table(rows, plan_record, machine_line())
    with atomic_write(work / "results.md") as file:
        file.write(text)
    write_json(work / "results.json", {"plan": plan_record, "rows": rows, "machine": machine_line()})
    print(text)

if __name__ == "__main__":
    exit_on_user_error("benchmarks/peers/nnunet.py")
    main()
