"""train.py's run bookkeeping: checking its settings, opening a run (new, or resumed where it stopped), the
files of each epoch and fold, and publishing the model.

Kept out of train.py so that the script reads as the training it does. `check_settings` is a pure function
of the settings, tested with a table of cases (tests/test_runs.py).
"""

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nerveseg.checkpoint import (
    ensemble_checkpoint,
    is_checkpoint,
    make_checkpoint,
    read_torch_file,
    save_torch,
    upgrade,
)
from nerveseg.distributed import Process
from nerveseg.errors import UserError
from nerveseg.files import FolderLock, check_can_be_folder, write_csv, write_json
from nerveseg.metrics import describe_scores
from nerveseg.model import NETWORKS, network_channels
from nerveseg.network_bounds import check_network_request
from nerveseg.pictures import plot_cross_validation, plot_training_curves
from nerveseg.postprocess import TUNING_PLANES, PostProcessing
from nerveseg.training.crossval import MIN_TTA_GAIN, describe_cross_validation

LAST_STATE_KEYS = {"model", "optimizer", "epoch", "history", "settings"}  # what last.pt holds
SYSTEM_SETTINGS = {"DEVICE", "NUM_WORKERS", "QUIET", "RESUME", "PICTURES", "TENSORBOARD"}  # a resume takes them anew
RESUME_CAN_CHANGE = {"MAX_EPOCHS"}  # a resume takes them from its command line where given there (recorded)


def check_settings(settings: dict) -> None:
    """Refuse settings that cannot work together, with a message that says what would (each setting alone is
    checked by the parser, against its declaration in train.py's settings block)."""
    s = settings
    if not s["STRIDES"] or len(s["CHANNELS"]) != len(s["STRIDES"]) + 1:
        raise UserError(
            f"--channels needs one value more than --strides (one per UNet level), not {len(s['CHANNELS'])} and "
            f"{len(s['STRIDES'])}; for example --channels 16,32,64,128,256 --strides 2,2,2,2"
        )
    multiple = math.prod(s["STRIDES"])
    height, width = s["IMAGE_HEIGHT"], s["IMAGE_WIDTH"]
    if height % multiple or width % multiple or min(height, width) < multiple:
        raise UserError(
            f"--image-height and --image-width must be multiples of {multiple} (the product of the "
            f"strides), not {height}x{width}; for example 128x176 or 224x304"
        )
    model = s.get("MODEL", "unet")
    channels = network_channels(model, s["CHANNELS"], s.get("DECODER_CHANNELS", ()))
    option = "--decoder-channels" if NETWORKS[model].encoder else "--channels"
    config = {"model": model, "channels": list(channels), "strides": list(s["STRIDES"]),
              "num_res_units": s.get("NUM_RES_UNITS", 0)}
    try:
        check_network_request(config, [height, width])  # the bound that predict.py holds a checkpoint to
    except ValueError as error:
        raise UserError(f"--image-height, --image-width and {option} ask for more memory than any model here may "
                        f"({error})") from None


def check_output_folders(run_dir: Path, settings: dict) -> None:
    """Refuse now, not after hours of caching and training, an output folder that is a file, and a --model-path
    that is something other than a model of ours: a folder, or a file that the published model would replace."""
    model_path = Path(settings["MODEL_PATH"])
    folders = (("--runs-dir", run_dir), ("--model-path", model_path.parent), ("--pictures", Path(settings["PICTURES"])))
    for option, folder in folders:
        check_can_be_folder(folder, option)
    if model_path.is_dir():
        raise UserError(f"--model-path {model_path} is a folder; name the file to write, for example "
                        f"{model_path / '2D_Nerve_Segmentation.pt'}")
    if model_path.exists() and not is_checkpoint(model_path):
        raise UserError(f"--model-path {model_path} is a file that train.py did not write, and the model would replace "
                        "it; choose another --model-path (a new file, or a model of an earlier run)")


@dataclass
class Run:
    """A training run: its folder, its settings, (when resumed) the state of its last completed epoch, and the lock
    on its folder while this process writes it (see prepare_run_folder)."""

    folder: Path
    settings: dict
    state: dict | None = None
    lock: FolderLock | None = None


def check_run_name(name: str, runs: Path) -> None:
    """A run's name is a plain folder name, made in --runs-dir: no path, no "..", that would write elsewhere."""
    if name and (Path(name).name != name or name in (".", "..")):
        raise UserError(f"--run-name must be a plain folder name (no / and not . or ..), not {name!r}: the run's "
                        f"folder is made in --runs-dir ({runs}); to write elsewhere, choose --runs-dir")


def given_on_command_line(option: str, argv: list[str] | None = None) -> bool:
    """Whether the command line (sys.argv) names `option` ("--max-epochs 5" or "--max-epochs=5")."""
    return any(arg == option or arg.startswith(f"{option}=") for arg in (sys.argv[1:] if argv is None else argv))


def open_run(settings: dict) -> Run:
    """A new run (RUNS_DIR/RUN_NAME, or the start time), or with RESUME the named (or latest) stopped run, which
    continues with its own settings; only the SYSTEM_SETTINGS come from this command line. The state is the
    run's latest last.pt (of its latest fold, with --folds)."""
    runs = Path(settings["RUNS_DIR"])
    name = settings["RUN_NAME"]
    check_run_name(name, runs)
    if not settings["RESUME"]:
        folder = runs / (name or time.strftime("%Y%m%d-%H%M%S"))  # a default name taken: see prepare_run_folder
        if name and last_states(folder):
            raise UserError(f"{folder} already holds a run; use --resume to continue it or another --run-name")
        return Run(folder, settings)
    last_paths = last_states(runs / name) if name else sorted(
        [*runs.glob("*/last.pt"), *runs.glob("*/fold-*/last.pt")], key=lambda p: p.stat().st_mtime
    )
    if name and not last_paths:
        raise UserError(
            f"--resume: {runs / name / 'last.pt'} does not exist: run {name} stopped before its first epoch ended, "
            f"or never started. Start it again without --resume: python train.py --run-name {name}"
        )
    if not last_paths:
        raise UserError(f"--resume found no interrupted run in {runs} (no */last.pt); start a run without --resume")
    state = read_torch_file(last_paths[-1])
    if not isinstance(state, dict) or not LAST_STATE_KEYS <= state.keys():
        raise UserError(f"{last_paths[-1]} is not the last.pt of a train.py run; start a run without --resume")
    state = upgrade(state)  # what a run of an earlier version lacks (nerveseg/checkpoint.py)
    resumed = {
        **{key.upper(): tuple(value) if isinstance(value, list) else value for key, value in state["settings"].items()},
        **{key: settings[key] for key in SYSTEM_SETTINGS},
    }
    folder = last_paths[-1].parent
    for key in RESUME_CAN_CHANGE:
        if given_on_command_line(f"--{key.lower().replace('_', '-')}"):
            resumed[key] = settings[key]
    if resumed["MAX_EPOCHS"] < state["epoch"]:
        raise UserError(f"--max-epochs {resumed['MAX_EPOCHS']}: {folder} has completed {state['epoch']} epochs "
                        f"already; give at least {state['epoch']}, or leave --max-epochs out to end as the run planned")
    return Run(folder.parent if folder.name.startswith("fold-") else folder, resumed, state)


def last_states(run_dir: Path) -> list[Path]:
    """The last.pt files of a run (one per fold that has completed an epoch, with --folds), oldest first."""
    found = [*run_dir.glob("last.pt"), *run_dir.glob("fold-*/last.pt")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def fold_folder(run_dir: Path, fold: int, folds: int) -> Path:
    """Where a fold writes its checkpoints and metrics: the run's folder itself without --folds, else fold-<k>/."""
    return run_dir if folds == 1 else run_dir / f"fold-{fold}"


def fold_name(fold: int, folds: int) -> str:
    """How the messages of a fold begin: "fold 2 of 5, " (nothing without --folds)."""
    return f"fold {fold} of {folds}, " if folds > 1 else ""


def completed_fold(fold_dir: Path) -> tuple[dict, dict] | None:
    """A fold that a resumed run completed before (it has a validation.pt): its best model and its validation.
    A validation of an earlier version (fewer tuning planes) is not kept: the fold is validated again."""
    if not (fold_dir / "validation.pt").is_file():
        return None
    validation = read_torch_file(fold_dir / "validation.pt")
    if validation["plain"].shape[0] != len(TUNING_PLANES):
        return None
    return read_torch_file(fold_dir / "best.pt"), validation


def restore(fold_dir: Path, *, resumed: bool, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
            scaler: object) -> tuple[int, list[dict], dict | None]:
    """Put a fold of a resumed run back where its last.pt left it: the weights, the optimiser, the schedule, the
    loss scaler and the random state. Returns the last completed epoch, the history of the epochs and the best
    model so far: 0, [] and None for a new run, or a fold that had not completed an epoch."""
    state = read_torch_file(fold_dir / "last.pt") if resumed and (fold_dir / "last.pt").is_file() else None
    if state is None:
        return 0, [], None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    best = read_torch_file(fold_dir / "best.pt") if (fold_dir / "best.pt").exists() else None
    return state["epoch"], state["history"], best


# The run's files and messages ----------------------------------------------------------------------------------
METRICS_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_dice_empty", "val_dice_nonempty",
                   "val_presence_accuracy", "all_empty_baseline", "lr", "train_seconds", "seconds"]
VALIDATION_COLUMNS = ("loss", "dice", "dice_empty", "dice_nonempty", "presence_accuracy", "all_empty_baseline")


def prepare_run_folder(run: Run, *, settings_json: dict, model_path: Path) -> Path:
    """Make the run's folder, lock it while this process writes it, write its settings.json, and return it.

    A new run's folder is its own: one with a default (time-stamped) name is made exclusively, a suffix added where
    another run took the name (-2, -3, ...); a named one that another run is writing now, or that holds a run, is
    refused (a named folder left by a run stopped before its first epoch ended is started again). A second
    --resume of a run being trained is refused too. For a resumed run, remove what a write cut short by a kill
    left (.NAME.*.tmp).
    """
    try:
        if run.state is None and not run.settings["RUN_NAME"]:
            run.folder = unique_folder(run.folder)
        run.lock = FolderLock(run.folder, script="train.py", option="--run-name")
        run.folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot make the run folder {run.folder}: {error.strerror}; choose another --runs-dir"
        ) from None
    if run.state is None and last_states(run.folder):  # another run made it since open_run looked
        raise UserError(f"{run.folder} already holds a run; use --resume to continue it or another --run-name")
    write_json(run.folder / "settings.json", settings_json)
    if run.state is not None:
        for stale in [*run.folder.rglob(".*.tmp"), *model_path.parent.glob(f".{model_path.name}.*.tmp")]:
            stale.unlink(missing_ok=True)
    return run.folder


def unique_folder(folder: Path) -> Path:
    """Make `folder`, or where it exists `folder`-2, -3, ...: a new folder that no other process can also get."""
    candidate, number = folder, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            number += 1
            candidate = folder.with_name(f"{folder.name}-{number}")


def prepare_fold_folder(fold_dir: Path, *, history: list[dict]) -> None:
    """Make a fold's folder; for a resumed fold, bring metrics.csv in line with last.pt (a kill may leave it a
    row ahead)."""
    fold_dir.mkdir(exist_ok=True)
    if history:
        write_csv(fold_dir / "metrics.csv", history, METRICS_COLUMNS)


def validation_row(metrics: dict) -> dict:
    """The validation figures of a metrics.csv row (blank where the validation subjects have no such images)."""
    return {f"val_{key}" if key != "all_empty_baseline" else key: "" if metrics[key] is None else round(metrics[key], 5)
            for key in VALIDATION_COLUMNS}


def last_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, scaler: object, *, epoch: int,
               history: list[dict], settings: dict) -> dict:
    """last.pt: everything --resume needs to go on after `epoch` as if the run had never stopped."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "settings": settings,
            "rng": {"torch": torch.get_rng_state()}}


def best_so_far(best: dict | None, model: nn.Module, metrics: dict, *, epoch: int, record: dict, fold_dir: Path,
                save: bool) -> dict:
    """`best` (a checkpoint), or this epoch's model where its validation Dice is higher: its checkpoint, with
    `record` (model_config, preprocessing, postprocessing, settings), saved as best.pt where `save`."""
    if best is not None and metrics["dice"] <= best["metrics"]["dice"]:
        return best
    best = make_checkpoint(model, **record, epoch=epoch, metrics=metrics)
    if save:
        save_torch(fold_dir / "best.pt", best)
    return best


def save_epoch(fold_dir: Path, state: dict) -> None:
    """After each epoch: last.pt (last_state), and metrics.csv and curves.png from its history."""
    save_torch(fold_dir / "last.pt", state)
    write_csv(fold_dir / "metrics.csv", state["history"], METRICS_COLUMNS)
    plot_training_curves(state["history"], fold_dir / "curves.png")


def training_line(process: Process, *, steps: int, batch_size: int, micro_batch: int, fold_dir: Path,
                  tensorboard_dir: Path | None) -> str:
    """What a fold's training does, in a line: where, how many steps of how many images, where it writes."""
    passes = f" ({micro_batch} images a pass)" if micro_batch < batch_size else ""
    board = f" (tensorboard --logdir {tensorboard_dir})" if tensorboard_dir else ""
    return (f"training on {process.device} x {process.world_size}, {steps} steps of {batch_size} per epoch{passes}; "
            f"writing {fold_dir}{board}")


def epoch_line(row: dict, max_epochs: int, metrics: dict | None) -> str:
    """One epoch in a line: the training loss, the validation figures where it was validated, the time."""
    validation = (f", val loss {row['val_loss']:.4f}, {describe_scores(metrics)}; all-empty baseline "
                  f"{row['all_empty_baseline']:.3f}" if metrics is not None else "")
    seconds = f"{row['seconds']:.1f} s"
    return f"epoch {row['epoch']:3d}/{max_epochs}: train loss {row['train_loss']:.4f}{validation}, {seconds}"


def check_finite(train_loss: float, *, epoch: int, fold_dir: Path, learning_rate: float) -> None:
    """Stop (diverged) when the training loss is no longer a number."""
    if not math.isfinite(train_loss):
        raise diverged(train_loss, epoch, fold_dir, learning_rate)


def diverged(train_loss: float, epoch: int, run_dir: Path, learning_rate: float) -> UserError:
    """The error for a loss that is no longer a number."""
    kept = (f"the last good state is {run_dir / 'last.pt'} (epoch {epoch - 1})" if epoch > 1
            else "no epoch was completed, so nothing was saved")
    return UserError(f"the training loss became {train_loss} in epoch {epoch}; {kept}. Start a new run with a lower "
                     f"--learning-rate (now {learning_rate:g}), or turn off --amp")


def out_of_memory(epoch: int, run_dir: Path, *, micro_batch: int, batch_size: int, image_size: tuple) -> UserError:
    """The error for a GPU that ran out of memory."""
    return UserError(
        f"the GPU ran out of memory in epoch {epoch}; start a new run with a smaller --micro-batch-size (now "
        f"{micro_batch}; the same steps in slices), --batch-size (now {batch_size}) or image size (now "
        f"{image_size[0]}x{image_size[1]})" + (f"; {run_dir / 'last.pt'} keeps epoch {epoch - 1}" if epoch > 1 else "")
    )


def interrupted(epoch: int, run_dir: Path, *, fold: str = "") -> str:
    """What to do after Ctrl-C (or SIGTERM) in `epoch` (of `fold`, with --folds: "fold 2 of 5, ")."""
    if last_states(run_dir):
        saved = f"each completed epoch and fold is saved in {run_dir}" if fold else (
            f"the last completed epoch is saved in {run_dir / 'last.pt'}")
        return (f"\ninterrupted in {fold}epoch {epoch}; {saved}. Continue with: python train.py --resume --run-name "
                f"{run_dir.name}")
    return (f"\ninterrupted in {fold}epoch {epoch}, before any epoch was completed: nothing to resume. "
            f"Start again with: python train.py --run-name {run_dir.name}")


def result_summary(best_epoch: int, default_metrics: dict, tuned_metrics: dict, post: PostProcessing, *,
                   default_rule: PostProcessing, tta_dice: dict, use_tta: bool) -> str:
    """The end of training in words: the best epoch's validation Dice with the default and the chosen rule, and
    whether test-time augmentation is used."""
    presence_rule = f"presence below {post.presence_threshold} means empty, " if post.presence_threshold else ""
    kept_default = ("the default: no other rule gained clearly more than the noise of these images; "
                    if post == default_rule else "")
    default_presence = f", presence {default_rule.presence_threshold}" if default_rule.presence_threshold else ""
    return (
        f"best epoch {best_epoch}, on the {default_metrics['images']} validation images:\n"
        f"  default rule (threshold {default_rule.threshold}{default_presence}): {describe_scores(default_metrics)}\n"
        f"  chosen post-processing ({kept_default}{presence_rule}threshold {post.threshold}, largest component "
        f"{'on' if post.keep_largest else 'off'}, minimum area {post.min_area_fraction:.2%} of the image"
        f"{', with test-time augmentation' if use_tta else ''}): {describe_scores(tuned_metrics)}\n"
        f"  test-time augmentation {'on' if use_tta else 'off'}: Dice {tta_dice['tta']:.4f} with it, "
        f"{tta_dice['plain']:.4f} without (on only when it gains more than {MIN_TTA_GAIN}); "
        f"all-empty baseline {tuned_metrics['all_empty_baseline']:.4f}."
    )


# Publishing the model ------------------------------------------------------------------------------------------
def published_model(members: list[dict], summary: dict, *, rule: PostProcessing, tta: dict) -> dict:
    """What --model-path receives, with the post-processing `rule` and the test-time augmentation record `tta`
    chosen on validation: the best model of the one split (its figures with the default and the chosen rule
    added), or with --folds the ensemble of the fold models (members: each fold's best checkpoint)."""
    if len(members) > 1:
        return ensemble_checkpoint(members, postprocessing=rule.as_dict(), tta=tta,
                                   metrics={"cross_validation": summary})
    pooled = summary["pooled"]
    figures = {"dice_raw": pooled["raw"]["dice"], "dice_postprocessed": pooled["postprocessed"]["dice"],
               "default_rule": pooled["raw"], "postprocessed": pooled["postprocessed"]}
    return members[0] | {"postprocessing": rule.as_dict(), "tta": tta, "metrics": members[0]["metrics"] | figures}


def publish(checkpoint: dict, summary: dict, *, run_dir: Path, model_path: str, pictures: Path) -> None:
    """Write the published model to `model_path`, and into the run's folder summary.json and the pictures (also
    drawn in `pictures`): one split's training curves (and its model, as best.pt), or the cross-validation's."""
    save_torch(model_path, checkpoint)
    cross_validated = "ensemble" in checkpoint
    if cross_validated:
        plot_cross_validation(summary, run_dir / "cross_validation.png")
        plot_cross_validation(summary, pictures / "cross_validation.png")
    else:
        save_torch(run_dir / "best.pt", checkpoint)
        plot_training_curves(read_torch_file(run_dir / "last.pt")["history"], pictures / "training_curves.png")
    write_json(run_dir / "summary.json", {
        "folds": len(summary["folds"]),
        "best_epochs": [fold["best_epoch"] for fold in summary["folds"]],
        "metrics": summary if cross_validated else checkpoint["metrics"],
        "postprocessing": checkpoint["postprocessing"],
        "test_time_augmentation": checkpoint["tta"],
        "model_path": model_path,
    })


def describe_result(checkpoint: dict, summary: dict, *, default_rule: PostProcessing) -> str:
    """The end of training in words: result_summary for one split, the cross-validation's table for --folds."""
    tta = checkpoint["tta"]
    if "ensemble" in checkpoint:
        return describe_cross_validation(summary, tta_dice=tta["validation_dice"], use_tta=tta["use"])
    pooled = summary["pooled"]
    return result_summary(checkpoint["epoch"], pooled["raw"], pooled["postprocessed"],
                          PostProcessing(**checkpoint["postprocessing"]), default_rule=default_rule,
                          tta_dice=tta["validation_dice"], use_tta=tta["use"])
