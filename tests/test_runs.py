"""train.py's settings checks and run opening (nerveseg/training/runs.py), without starting train.py."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from nerveseg.checkpoint import ADDED_SETTINGS, FORMAT, save_torch
from nerveseg.errors import UserError
from nerveseg.postprocess import TUNING_PLANES
from nerveseg.settings import parse_settings, script_defaults, script_namespace
from nerveseg.training.runs import (
    check_output_folders,
    check_settings,
    completed_fold,
    open_run,
    prepare_run_folder,
)
from tests.helpers import ROOT

DEFAULTS = script_defaults(ROOT / "train.py")


@pytest.fixture(scope="module")
def train_settings() -> dict:
    """train.py's globals as its settings block leaves them (its defaults and declarations)."""
    return script_namespace(ROOT / "train.py")

REFUSED = [  # (options given to train.py, the message): each setting alone, as its declaration says
    (["--folds", "0"], "--folds must be at least 1, not 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 0, not -1"),
    (["--max-epochs", "0"], "--max-epochs must be at least 1, not 0"),
    (["--val-interval", "0"], "--val-interval must be at least 1, not 0"),
    (["--min-steps-per-epoch", "0"], "--min-steps-per-epoch must be at least 1, not 0"),
    (["--presence-weight", "-0.5"], "--presence-weight must be at least 0, not -0.5"),
    (["--micro-batch-size", "-1"], "--micro-batch-size must be at least 0, not -1"),
    (["--learning-rate", "0"], "--learning-rate must be above 0, not 0.0"),
    (["--learning-rate", "inf"], "--learning-rate takes a number, not 'inf'"),
    (["--weight-decay=-1e-5"], "--weight-decay must be at least 0, not -1e-05"),
    (["--dropout", "1"], "--dropout must be at least 0 and below 1, not 1.0"),
    (["--num-workers", "-1"], "--num-workers must be at least 0, not -1"),
    (["--model", "vnet"], "--model takes one of unet, unetplusplus, attentionunet, segresnet, dynunet, efficientnet"),
    (["--presence-signal", "mask"], "--presence-signal takes one of head, head+mask, not 'mask'"),
    (["--augmentation", "heavy"], "--augmentation takes one of light, nnunet, not 'heavy'"),
    (["--target-share", "1.5"], "--target-share must be at least 0 and at most 1, not 1.5"),
]
NOT_TOGETHER = [  # (settings changed from the defaults, the message): settings that cannot work together
    ({"CHANNELS": (16, 32, 64)}, "--channels needs one value more than --strides (one per UNet level), not 3 and 4"),
    ({"STRIDES": ()}, "--channels needs one value more than --strides"),
    ({"IMAGE_HEIGHT": 100}, "must be multiples of 16 (the product of the strides), not 100x176"),
    ({"IMAGE_WIDTH": 8}, "not 128x8"),
    ({"STRIDES": (2, 2, 2, 3), "IMAGE_HEIGHT": 96}, "must be multiples of 24"),
    ({"IMAGE_HEIGHT": 16000, "IMAGE_WIDTH": 16000}, "--image-height, --image-width and --decoder-channels ask for more "
     "memory than any model here may (an input of 16000x16000 with channels [8, 16, 32, 64, 128] holds 4,480 million"),
    ({"MODEL": "unet", "IMAGE_HEIGHT": 16000, "IMAGE_WIDTH": 16000}, "--image-height, --image-width and --channels "
     "ask for more memory than any model here may (an input of 16000x16000 with channels [16, 32, 64, 128, 256] holds "
     "8,448 million"),
]


@pytest.mark.parametrize(("argv", "message"), REFUSED)
def test_settings_that_cannot_work_are_refused_with_what_would(train_settings, argv, message):
    with pytest.raises(UserError) as refused:
        parse_settings(train_settings, argv=argv)
    assert message in str(refused.value)


@pytest.mark.parametrize(("changed", "message"), NOT_TOGETHER)
def test_settings_that_cannot_work_together_are_refused_with_what_would(changed, message):
    with pytest.raises(UserError) as refused:
        check_settings({**DEFAULTS, **changed})
    assert message in str(refused.value)


@pytest.mark.parametrize(("argv", "changed"), [
    ([], {}),
    (["--batch-size", "0", "--micro-batch-size", "0"], {"BATCH_SIZE": 0, "MICRO_BATCH_SIZE": 0}),
    (["--presence-weight", "0"], {"PRESENCE_WEIGHT": 0.0}),
    (["--strides", "2,2,2", "--channels", "8,16,32,64", "--image-height", "8"],
     {"STRIDES": (2, 2, 2), "CHANNELS": (8, 16, 32, 64), "IMAGE_HEIGHT": 8}),
    (["--image-height", "1024", "--image-width", "1024"], {"IMAGE_HEIGHT": 1024, "IMAGE_WIDTH": 1024}),  # in bounds
])
def test_settings_that_work_pass(train_settings, argv, changed):
    resolved = parse_settings(train_settings, argv=argv)
    assert resolved == {**DEFAULTS, **changed}
    check_settings(resolved)


def test_an_output_folder_under_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    settings = {**DEFAULTS, "MODEL_PATH": str(tmp_path / "a_file" / "model.pt"), "PICTURES": str(tmp_path / "p")}
    with pytest.raises(UserError, match="is a file; choose another --model-path"):
        check_output_folders(tmp_path / "runs" / "x", settings)
    check_output_folders(tmp_path / "runs" / "x", {**settings, "MODEL_PATH": str(tmp_path / "model.pt")})


def test_a_new_run_gets_its_folder_and_never_takes_over_an_old_one(tmp_path):
    settings = {**DEFAULTS, "RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": "a"}
    run = open_run(settings)
    assert run.folder == tmp_path / "runs" / "a" and run.state is None and run.settings is settings
    run.folder.mkdir(parents=True)
    torch.save({}, run.folder / "last.pt")
    with pytest.raises(UserError, match="already holds a run; use --resume"):
        open_run(settings)


def test_resume_takes_the_runs_own_settings_but_the_system_ones_from_now(tmp_path):
    runs = tmp_path / "runs"
    old_settings = {key.lower(): list(value) if isinstance(value, tuple) else value for key, value in DEFAULTS.items()
                    if key.lower() not in ADDED_SETTINGS}  # a run started before these settings existed
    old_settings |= {"max_epochs": 7, "channels": [8, 16, 32, 64, 128], "quiet": False, "device": "cuda"}
    for name in ("first", "second"):
        (runs / name).mkdir(parents=True)
        torch.save({"model": {}, "optimizer": {}, "epoch": 3, "history": [], "settings": old_settings},
                   runs / name / "last.pt")
    now = {**DEFAULTS, "RUNS_DIR": str(runs), "RESUME": True, "QUIET": True, "DEVICE": "cpu", "MAX_EPOCHS": 99}
    run = open_run(now)  # the latest run
    assert run.folder == runs / "second" and run.state["epoch"] == 3
    assert run.settings["MAX_EPOCHS"] == 7 and run.settings["CHANNELS"] == (8, 16, 32, 64, 128)
    assert run.settings["QUIET"] is True and run.settings["DEVICE"] == "cpu"
    assert run.settings["PRESENCE_WEIGHT"] == 0.0 and run.settings["MIN_STEPS_PER_EPOCH"] == 1
    assert open_run({**now, "RUN_NAME": "first"}).folder == runs / "first"


def test_a_cross_validation_resumes_from_its_latest_fold_and_is_never_taken_over(tmp_path):
    runs = tmp_path / "runs"
    settings = {key.lower(): list(value) if isinstance(value, tuple) else value for key, value in DEFAULTS.items()}
    for fold, epoch in ((1, 4), (2, 1)):
        (runs / "cv" / f"fold-{fold}").mkdir(parents=True)
        torch.save({"model": {}, "optimizer": {}, "epoch": epoch, "history": [], "settings": settings | {"folds": 3}},
                   runs / "cv" / f"fold-{fold}" / "last.pt")
    now = {**DEFAULTS, "RUNS_DIR": str(runs), "RESUME": True}
    for run in (open_run(now), open_run({**now, "RUN_NAME": "cv"})):
        assert run.folder == runs / "cv" and run.settings["FOLDS"] == 3 and run.state["epoch"] == 1
    with pytest.raises(UserError, match="already holds a run; use --resume"):
        open_run({**DEFAULTS, "RUNS_DIR": str(runs), "RUN_NAME": "cv"})


@pytest.mark.parametrize(("prepare", "name", "message"), [
    (lambda runs: None, "", "found no interrupted run in"),
    (lambda runs: None, "never", "run never stopped before its first epoch ended, or never started"),
    (lambda runs: (runs / "bad").mkdir(parents=True) or torch.save([1, 2], runs / "bad" / "last.pt"), "bad",
     "is not the last.pt of a train.py run"),
])
def test_resume_with_nothing_to_resume_says_what_to_do(prepare, name, message, tmp_path):
    prepare(tmp_path / "runs")
    with pytest.raises(UserError, match=message):
        open_run({**DEFAULTS, "RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": name, "RESUME": True})


@pytest.mark.parametrize("name", ["../..", "a/b", "..", ".", "/tmp/x"])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(name, tmp_path):
    with pytest.raises(UserError, match="--run-name must be a plain folder name"):
        open_run({**DEFAULTS, "RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": name})
    assert not list(tmp_path.iterdir())


def prepare(run) -> Path:
    return prepare_run_folder(run, settings_json={"run": "settings"}, model_path=run.folder / "model.pt")


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda pattern: "20261201-120000")
    settings = {**DEFAULTS, "RUNS_DIR": str(tmp_path / "runs")}
    first, second, third = open_run(settings), open_run(settings), open_run(settings)  # all before any folder is made
    folders = [prepare(run) for run in (first, second, third)]
    assert [folder.name for folder in folders] == ["20261201-120000", "20261201-120000-2", "20261201-120000-3"]
    assert all(json.loads((folder / "settings.json").read_text()) == {"run": "settings"} for folder in folders)


def test_a_named_run_that_another_process_is_writing_is_refused(tmp_path):
    settings = {**DEFAULTS, "RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": "a"}
    first, second = open_run(settings), open_run(settings)  # the second starts while the first has no epoch yet
    prepare(first)
    with pytest.raises(UserError, match=r"runs/a is being written by another train.py run \(process \d+\); wait for it "
                                        "to end, or choose another --run-name"):
        prepare(second)
    first.lock.release()  # the first run ended before completing an epoch: its name may be started again
    again = open_run(settings)
    assert prepare(again) == tmp_path / "runs" / "a"
    torch.save({}, tmp_path / "runs" / "a" / "last.pt")
    later = open_run({**settings, "RUN_NAME": ""})  # a resume of it
    later.state, later.folder = {}, tmp_path / "runs" / "a"
    with pytest.raises(UserError, match="is being written by another train.py run"):
        prepare(later)


def save_last_state(folder: Path, *, epoch: int, max_epochs: int) -> None:
    folder.mkdir(parents=True)
    settings = {key.lower(): list(value) if isinstance(value, tuple) else value for key, value in DEFAULTS.items()}
    torch.save({"model": {}, "optimizer": {}, "epoch": epoch, "history": [], "settings": settings | {
        "max_epochs": max_epochs}}, folder / "last.pt")


def test_resume_honours_max_epochs_given_on_its_command_line(tmp_path, monkeypatch):
    save_last_state(tmp_path / "runs" / "r", epoch=3, max_epochs=5)
    now = {**DEFAULTS, "RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": "r", "RESUME": True, "MAX_EPOCHS": 8}
    monkeypatch.setattr(sys, "argv", ["train.py", "--resume", "--run-name", "r"])
    assert open_run(now).settings["MAX_EPOCHS"] == 5  # not given: the run ends as it planned
    for given in (["--max-epochs", "8"], ["--max-epochs=8"]):
        monkeypatch.setattr(sys, "argv", ["train.py", "--resume", *given])
        assert open_run(now).settings["MAX_EPOCHS"] == 8
    with pytest.raises(UserError, match="--max-epochs 2: .*runs/r has completed 3 epochs already; give at least 3"):
        open_run({**now, "MAX_EPOCHS": 2})


def test_a_model_path_that_is_not_a_model_of_ours_is_refused(tmp_path):
    settings = {**DEFAULTS, "PICTURES": str(tmp_path / "p")}
    thesis = tmp_path / "thesis.pdf"
    thesis.write_bytes(b"%PDF-1.7 years of work")
    with pytest.raises(UserError, match="thesis.pdf is a file that train.py did not write, and the model would"):
        check_output_folders(tmp_path / "runs" / "x", {**settings, "MODEL_PATH": str(thesis)})
    with pytest.raises(UserError, match="is a folder; name the file to write"):
        check_output_folders(tmp_path / "runs" / "x", {**settings, "MODEL_PATH": str(tmp_path)})
    assert thesis.read_bytes() == b"%PDF-1.7 years of work"
    ours = tmp_path / "model.pt"
    save_torch(ours, {"format": FORMAT, "version": 3})
    check_output_folders(tmp_path / "runs" / "x", {**settings, "MODEL_PATH": str(ours)})  # an earlier model: replaced
    check_output_folders(tmp_path / "runs" / "x", {**settings, "MODEL_PATH": str(tmp_path / "new.pt")})


def test_a_completed_fold_is_kept_only_when_its_validation_has_todays_tuning_planes(tmp_path):
    """A resumed cross-validation keeps a fold validated by this version, and validates again one whose
    validation.pt predates a tuning plane (so the rule is never chosen from a plane that is missing)."""
    best = {"format": FORMAT, "epoch": 3}
    save_torch(tmp_path / "best.pt", best)
    assert completed_fold(tmp_path) is None  # no validation.pt: the fold did not complete
    planes = torch.zeros(len(TUNING_PLANES), 2, 2)
    save_torch(tmp_path / "validation.pt", {"plain": planes})
    kept = completed_fold(tmp_path)
    assert kept is not None and kept[0]["epoch"] == 3 and kept[1]["plain"].shape[0] == len(TUNING_PLANES)
    save_torch(tmp_path / "validation.pt", {"plain": planes[:-1]})
    assert completed_fold(tmp_path) is None
