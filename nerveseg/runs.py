"""train.py's run bookkeeping: checking its settings, and opening a run (new, or resumed where it stopped).

Kept out of train.py so that the script reads as the training it does. `check_settings` is a pure function
of the settings, tested with a table of cases (tests/test_runs.py).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

from nerveseg.checkpoint import read_torch_file
from nerveseg.errors import UserError

LAST_STATE_KEYS = {"model", "optimizer", "epoch", "history", "settings"}  # what last.pt holds
SYSTEM_SETTINGS = {"DEVICE", "NUM_WORKERS", "QUIET", "RESUME", "PICTURES", "TENSORBOARD"}  # a resume takes them anew
ADDED_SETTINGS = {"PRESENCE_WEIGHT": 0.0, "MIN_STEPS_PER_EPOCH": 1}  # what a run started before they existed used


def check_settings(settings: dict) -> None:
    """Refuse settings that cannot work, with a message that says what would (the UPPER_CASE settings of train.py)."""
    s = settings
    if s["BATCH_SIZE"] < 0:
        raise UserError(f"--batch-size must be 0 (automatic) or more, not {s['BATCH_SIZE']}")
    if min(s["VAL_BATCH_SIZE"], s["MAX_EPOCHS"], s["VAL_INTERVAL"], s["MIN_STEPS_PER_EPOCH"]) < 1:
        raise UserError("--val-batch-size, --max-epochs, --val-interval and --min-steps-per-epoch must be at least 1")
    if s["PRESENCE_WEIGHT"] < 0:
        raise UserError(f"--presence-weight must be 0 (no presence output) or more, not {s['PRESENCE_WEIGHT']}")
    if s["MICRO_BATCH_SIZE"] < 0:
        raise UserError(f"--micro-batch-size must be 0 (automatic) or more, not {s['MICRO_BATCH_SIZE']}")
    if (not 0 < s["LEARNING_RATE"] < math.inf or s["WEIGHT_DECAY"] < 0 or not 0 <= s["DROPOUT"] < 1
            or s["NUM_WORKERS"] < 0):
        raise UserError(
            f"--learning-rate must be above 0 (not {s['LEARNING_RATE']}), --weight-decay and --num-workers at least 0 "
            f"(not {s['WEIGHT_DECAY']} and {s['NUM_WORKERS']}), and --dropout from 0 up to 1 (not {s['DROPOUT']})"
        )
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


def check_output_folders(run_dir: Path, settings: dict) -> None:
    """Refuse now, not after hours of caching and training, an output folder that is a file."""
    folders = (("--runs-dir", run_dir), ("--model-path", Path(settings["MODEL_PATH"]).parent),
               ("--pictures", Path(settings["PICTURES"])))
    for option, folder in folders:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UserError(f"{folder} cannot be a folder: {blocker} is a file; choose another {option}")


@dataclass
class Run:
    """A training run: its folder, its settings, and (when resumed) the state of its last completed epoch."""

    folder: Path
    settings: dict
    state: dict | None = None


def open_run(settings: dict) -> Run:
    """A new run (RUNS_DIR/RUN_NAME, or the start time), or with RESUME the named (or latest) stopped run, which
    continues with its own settings; only the SYSTEM_SETTINGS come from this command line."""
    runs = Path(settings["RUNS_DIR"])
    name = settings["RUN_NAME"]
    if not settings["RESUME"]:
        folder = runs / (name or time.strftime("%Y%m%d-%H%M%S"))
        if (folder / "last.pt").exists():
            raise UserError(f"{folder} already holds a run; use --resume to continue it or another --run-name")
        return Run(folder, settings)
    candidates = [runs / name] if name else sorted(runs.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    last_paths = [p if p.name == "last.pt" else p / "last.pt" for p in candidates]
    if name and not last_paths[-1].is_file():
        raise UserError(
            f"--resume: {last_paths[-1]} does not exist: run {name} stopped before its first epoch ended, or "
            f"never started. Start it again without --resume: python train.py --run-name {name}"
        )
    if not last_paths:
        raise UserError(f"--resume found no interrupted run in {runs} (no */last.pt); start a run without --resume")
    state = read_torch_file(last_paths[-1])
    if not isinstance(state, dict) or not LAST_STATE_KEYS <= state.keys():
        raise UserError(f"{last_paths[-1]} is not the last.pt of a train.py run; start a run without --resume")
    resumed = {
        **ADDED_SETTINGS,
        **{key.upper(): tuple(value) if isinstance(value, list) else value for key, value in state["settings"].items()},
        **{key: settings[key] for key in SYSTEM_SETTINGS},
    }
    return Run(last_paths[-1].parent, resumed, state)
