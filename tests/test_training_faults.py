"""Stage 2's faults: SIGTERM and SIGKILL at any point (resume reaches the same end), settings and data
that cannot work, a loss that diverges, a GPU out of memory, a checkpoint write cut short. Each gives a
message that names the file and the fix, no traceback, and leaves the data and the last good state as
they were."""

import concurrent.futures
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg import progress
from nerveseg.checkpoint import load_checkpoint, read_torch_file, save_torch
from nerveseg.data import read_manifest
from nerveseg.distributed import Process
from nerveseg.errors import UserError
from nerveseg.files import write_csv
from nerveseg.model import build_model, model_config
from nerveseg.training.evaluation import evaluate
from nerveseg.training.steps import SegmentationLoss
from nerveseg.transforms import collate_keep_sizes, load_transforms
from tests.helpers import (
    FAST_TRAINING,
    ROOT,
    SYS_IS_UNWRITABLE,
    assert_user_error,
    needs_unwritable_sys,
    read_metrics,
    run_script,
    tree_hashes,
)

# %% Stage 2: train.py


def copy_clean(train_clean: Path, where: Path) -> Path:
    data = where / "data"
    shutil.copytree(train_clean, data)
    return data


def rewrite_manifest(data: Path, keep) -> None:
    """Set kept=0 on the manifest rows for which keep(row) is false."""
    lines = (data / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        values = line.split(",")
        row = dict(zip(header, values, strict=False))
        if row["kept"] == "1" and not keep(row):
            values[header.index("kept")] = "0"
        rows.append(",".join(values))
    (data / "manifest.csv").write_text("\n".join([lines[0], *rows]) + "\n")


def train_args(data: Path, *args: str) -> list[str]:
    return ["--data-dir", str(data), "--max-epochs", "3", *FAST_TRAINING, *args]


EPOCH_LINE = re.compile(r"^epoch +(\d+)/3:")


def start_training(work: Path, *args: str, data: Path | None = None) -> subprocess.Popen:
    """train.py in the background (3 epochs of FAST_TRAINING, or --resume: the run's own settings)."""
    settings = ["--data-dir", str(data), "--max-epochs", "3", *FAST_TRAINING] if data else ["--quiet"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *settings, *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    watchdog = threading.Timer(300, process.kill)  # a hung run fails the test instead of hanging it
    watchdog.daemon = True
    watchdog.start()
    return process


def wait_for(process: subprocess.Popen, event: str | int) -> str:
    """Read the output up to a line holding `event`, or an epoch line of epoch `event` or later (0: the next one).

    A run that never prints such a line is read to its end."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        epoch = EPOCH_LINE.match(line)
        if (epoch and isinstance(event, int) and int(epoch[1]) >= event) or (isinstance(event, str) and event in line):
            break
    return "".join(lines)


@pytest.fixture(scope="module")
def sigterm_run(train_clean, tmp_path_factory) -> types.SimpleNamespace:
    """A 3-epoch run stopped by SIGTERM (a job scheduler's stop) soon after epoch 1, and beside it the same run
    uninterrupted (`reference`). Do not modify them."""
    work = tmp_path_factory.mktemp("sigterm")
    data_hashes = tree_hashes(train_clean)
    reference_work = tmp_path_factory.mktemp("uninterrupted")
    reference = start_training(reference_work, "--run-name", "term", data=train_clean)
    process = start_training(work, "--run-name", "term", data=train_clean)
    output = wait_for(process, 1)
    time.sleep(0.05)  # early in epoch 2 (epoch 1's time includes building the cache: no guide to epoch 2's)
    process.send_signal(signal.SIGTERM)
    output += process.communicate(timeout=120)[0]
    reference.communicate(timeout=300)
    stopped = re.search(r"interrupted in epoch (\d+)", output)
    assert reference.returncode == 0
    return types.SimpleNamespace(
        work=work,
        run=work / "runs" / "term",
        reference=reference_work / "runs" / "term",
        returncode=process.returncode,
        output=output,
        epoch=int(stopped[1]) if stopped else None,
        data_unchanged=tree_hashes(train_clean) == data_hashes,
    )


def copy_run(sigterm_run: types.SimpleNamespace, where: Path) -> Path:
    work = where / "work"
    shutil.copytree(sigterm_run.work, work)
    return work


@pytest.fixture(scope="module")
def sigterm_resumed(sigterm_run, tmp_path_factory) -> types.SimpleNamespace:
    """The SIGTERM run resumed, stopped by SIGTERM again when it starts to publish the model (all epochs and the
    fold's validation done), and resumed again."""
    work = copy_run(sigterm_run, tmp_path_factory.mktemp("sigterm-resumed"))
    (work.parent / "sitecustomize.py").write_text(FAULTS)
    environment = {"PYTHONPATH": f"{work.parent}{os.pathsep}{ROOT}", "FAULT": "sigterm-publishing"}
    second = run_script("train.py", "--resume", "--run-name", "term", "--quiet", cwd=work, env=environment)
    second.last_epoch = read_torch_file(work / "runs" / "term" / "last.pt")["epoch"]
    second.published = (work / "2D_Nerve_Segmentation.pt").exists()
    final = run_script("train.py", "--resume", "--run-name", "term", "--quiet", cwd=work)
    return types.SimpleNamespace(work=work, run=work / "runs" / "term", second=second, final=final)


@pytest.mark.slow
def test_a_run_started_before_the_presence_output_resumes_as_it_started(sigterm_run, tmp_path):
    """A last.pt and best.pt of the previous version (no presence head, no presence_weight or
    min_steps_per_epoch setting) finish as a model without presence, in one-pass epochs."""
    work = copy_run(sigterm_run, tmp_path)
    run = work / "runs" / "term"
    state = torch.load(run / "last.pt", weights_only=True)
    head = [name for name in state["model"] if name.startswith("presence_head.")]
    assert len(head) == 2  # the last two parameters, registered after the UNet's
    for name in head:
        del state["model"][name]
    kept = len(state["optimizer"]["param_groups"][0]["params"]) - 2
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:kept]
    state["optimizer"]["state"] = {i: v for i, v in state["optimizer"]["state"].items() if i < kept}
    for key in ("presence_weight", "min_steps_per_epoch"):
        del state["settings"][key]
    torch.save(state, run / "last.pt")
    best = torch.load(run / "best.pt", weights_only=True)
    best["state_dict"] = {k: v for k, v in best["state_dict"].items() if not k.startswith("presence_head.")}
    del best["model_config"]["presence"]
    best["postprocessing"].pop("presence_threshold")
    best["version"] = 1
    torch.save(best, run / "best.pt")
    result = run_script("train.py", "--resume", "--run-name", "term", "--quiet", cwd=work)
    assert result.returncode == 0, result.stderr
    model, checkpoint = load_checkpoint(work / "2D_Nerve_Segmentation.pt")
    assert model.presence_head is None and checkpoint["postprocessing"]["presence_threshold"] == 0.0
    assert read_torch_file(run / "last.pt")["epoch"] == 3


@pytest.mark.slow
def test_sigterm_saves_the_last_epoch_and_resume_finishes_the_run(sigterm_run, sigterm_resumed):
    assert sigterm_run.returncode == 130 and "Traceback" not in sigterm_run.output, sigterm_run.output
    assert sigterm_run.epoch and sigterm_run.epoch >= 2, sigterm_run.output
    assert "Continue with: python train.py --resume --run-name term" in sigterm_run.output
    state = read_torch_file(sigterm_run.run / "last.pt")
    assert state["epoch"] == sigterm_run.epoch - 1 == len(read_metrics(sigterm_run.run))
    assert not list(sigterm_run.run.glob(".*.tmp")) and not (sigterm_run.work / "2D_Nerve_Segmentation.pt").exists()
    second = sigterm_resumed.second  # stopped when it began to publish: "train.py: interrupted", nothing written
    assert second.returncode in (130, -signal.SIGINT), (second.returncode, second.stdout, second.stderr)
    assert "train.py: interrupted" in second.stderr and "Traceback" not in second.stderr, second.stderr
    assert second.last_epoch == 3 and not second.published
    final = sigterm_resumed.final
    assert final.returncode == 0, final.stderr
    assert "resuming" in final.stdout and "completed before: kept" in final.stdout
    assert [row["epoch"] for row in read_metrics(sigterm_resumed.run)] == ["1", "2", "3"]
    model, checkpoint = load_checkpoint(sigterm_resumed.work / "2D_Nerve_Segmentation.pt")
    assert 1 <= checkpoint["epoch"] <= 3 and model(torch.zeros(1, 1, 64, 96))[0].shape == (1, 1, 64, 96)
    # stopped and resumed twice, the run ends as the same run uninterrupted: the same epochs and weights
    keys = ("epoch", "train_loss", "val_loss", "val_dice", "lr")
    runs = (sigterm_resumed.run, sigterm_run.reference)
    rows = [[{k: r[k] for k in keys} for r in read_metrics(run)] for run in runs]
    assert rows[0] == rows[1]
    weights = [read_torch_file(run / "last.pt")["model"] for run in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert sigterm_run.data_unchanged


def set_learning_rate(last: Path, value: float) -> None:
    """Edit a last.pt so that the resumed run continues at this learning rate."""
    state = torch.load(last, weights_only=True)
    state["settings"]["learning_rate"] = value
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = value
    state["scheduler"]["base_lrs"] = [value]
    torch.save(state, last)


FAULTS = textwrap.dedent("""
    # Loaded by Python at start-up (PYTHONPATH): simulates a GPU running out of memory in the training step, or
    # sends SIGTERM (a job scheduler's stop) to train.py when it starts to publish the model.
    import os
    if os.environ.get("FAULT") == "cuda-oom":
        import monai.losses
        import torch

        real_forward = monai.losses.DiceCELoss.forward

        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled():  # a training step, not validation
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            return real_forward(self, *args, **kwargs)

        monai.losses.DiceCELoss.forward = forward
    if os.environ.get("FAULT") == "sigterm-publishing":
        import signal

        import nerveseg.training.runs

        real_publish = nerveseg.training.runs.publish

        def publish(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
            return real_publish(*args, **kwargs)

        nerveseg.training.runs.publish = publish
""")


@pytest.fixture(scope="module")
def stopped_runs(train_clean, sigterm_run, tmp_path_factory) -> dict[str, types.SimpleNamespace]:
    """The train.py runs that must stop with an error, each in its own folder, run two at a time: each spends
    most of its few seconds importing torch, so on two cores a pair takes little longer than one."""
    cases = {}

    def add(name: str, work: Path, args: list[str], watched: Path, env: dict | None = None) -> None:
        cases[name] = types.SimpleNamespace(work=work, args=args, watched=watched, env=env, before=tree_hashes(watched))

    def folder(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    work = folder("missing-file")
    data = copy_clean(train_clean, work)
    (data / "images" / "2_3.tif").unlink()
    add("missing file", work, train_args(data), data)
    work = folder("one-subject")
    data = copy_clean(train_clean, work)
    rewrite_manifest(data, lambda row: row["subject"] == "1")
    add("one subject", work, train_args(data), data)
    add("learning rate 0", folder("lr-0"), train_args(train_clean, "--learning-rate", "0"), train_clean)
    work = folder("model-path")
    (work / "a_file").write_text("not a folder")
    add("model path", work, train_args(train_clean, "--model-path", str(work / "a_file" / "model.pt")), train_clean)
    if SYS_IS_UNWRITABLE:
        add("runs dir", folder("runs-dir"), train_args(train_clean, "--runs-dir", "/sys/nerveseg-runs"), train_clean)
    add(
        "nan in epoch 1",
        folder("nan"),
        train_args(train_clean, "--learning-rate", "1e30", "--run-name", "nan"),
        train_clean,
    )
    add("nothing to resume", folder("no-resume"), ["--resume", "--run-name", "never", "--quiet"], train_clean)
    work = copy_run(sigterm_run, folder("nan-later"))
    set_learning_rate(work / "runs" / "term" / "last.pt", 1e30)  # a real divergence, from the next epoch on
    add("nan later", work, ["--resume", "--run-name", "term", "--quiet"], work / "runs" / "term")
    work = copy_run(sigterm_run, folder("cuda-oom"))
    (work.parent / "sitecustomize.py").write_text(FAULTS)
    environment = {"PYTHONPATH": f"{work.parent}{os.pathsep}{ROOT}", "FAULT": "cuda-oom"}
    add("cuda oom", work, ["--resume", "--run-name", "term", "--quiet"], work / "runs" / "term", environment)
    data_before = tree_hashes(train_clean)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {
            name: pool.submit(
                run_script, "train.py", *c.args, cwd=c.work, env={"OMP_NUM_THREADS": "1", **(c.env or {})}
            )
            for name, c in cases.items()
        }
        for name, job in jobs.items():
            cases[name].result = job.result()
    for case in cases.values():
        case.after = tree_hashes(case.watched)
        case.data_unchanged = tree_hashes(train_clean) == data_before
    return cases


@pytest.mark.slow
def test_a_manifest_that_lists_a_missing_file_stops_training(stopped_runs):
    case = stopped_runs["missing file"]
    data = case.work / "data"
    assert_user_error(
        case.result,
        f"{data / 'manifest.csv'} lists {data / 'images' / '2_3.tif'}, which is missing; run data_cleaning.py again",
    )
    assert case.after == case.before and not (case.work / "runs").exists()


@pytest.mark.slow
def test_one_subject_is_too_few_for_a_split_by_subject(stopped_runs):
    case = stopped_runs["one subject"]
    assert_user_error(
        case.result, "only 1 subject in the data: a split by subject needs at least 2", "(python data_cleaning.py)"
    )
    assert case.after == case.before and not (case.work / "runs").exists()


@pytest.mark.slow
def test_settings_that_cannot_work_are_refused_before_any_work(stopped_runs):
    """The script's side of the settings checks (their cases: tests/test_runs.py): one line, no traceback."""
    case = stopped_runs["learning rate 0"]
    assert_user_error(case.result, "--learning-rate must be above 0, not 0.0")
    assert case.after == case.before and not (case.work / "runs").exists()


@pytest.mark.slow
def test_a_model_path_under_a_file_is_refused_before_training(stopped_runs):
    case = stopped_runs["model path"]
    blocker = case.work / "a_file"
    assert_user_error(case.result, f"{blocker} cannot be a folder: {blocker} is a file; choose another --model-path")
    assert blocker.read_text() == "not a folder" and not (case.work / "runs").exists()
    assert case.after == case.before


@pytest.mark.slow
@needs_unwritable_sys
def test_a_runs_dir_that_cannot_be_made_is_refused(stopped_runs):
    case = stopped_runs["runs dir"]
    assert_user_error(case.result, "cannot make the run folder /sys/nerveseg-runs/", "choose another --runs-dir")
    assert not list(case.work.iterdir()) and case.after == case.before


@pytest.mark.slow
def test_a_loss_that_becomes_nan_in_the_first_epoch_stops_and_says_so(stopped_runs):
    case = stopped_runs["nan in epoch 1"]
    assert_user_error(
        case.result, "the training loss became nan in epoch 1; no epoch was completed, so nothing was saved"
    )
    assert "lower --learning-rate (now 1e+30)" in case.result.stderr
    assert sorted(p.name for p in (case.work / "runs" / "nan").iterdir()) == ["settings.json"]
    assert not (case.work / "2D_Nerve_Segmentation.pt").exists() and case.after == case.before


@pytest.mark.slow
def test_resume_with_nothing_to_resume_says_to_start_again(stopped_runs):
    """What a run killed before its first epoch ended leaves: no last.pt (the kill test then starts afresh)."""
    case = stopped_runs["nothing to resume"]
    assert_user_error(
        case.result,
        f"--resume: {Path('runs/never/last.pt')} does not exist: run never stopped before its first epoch ended, "
        "or never started. Start it again without --resume: python train.py --run-name never",
    )
    assert not list(case.work.iterdir())


@pytest.mark.slow
def test_a_loss_that_becomes_nan_later_keeps_the_last_good_checkpoint(stopped_runs, sigterm_run):
    case, good = stopped_runs["nan later"], sigterm_run.epoch - 1
    assert_user_error(
        case.result,
        f"the training loss became nan in epoch {good + 1}; the last good state is {Path('runs/term/last.pt')} "
        f"(epoch {good}). Start a new run with a lower --learning-rate",
    )
    for name in ("last.pt", "best.pt"):
        assert case.after[name] == case.before[name], f"{name} changed"
    assert read_torch_file(case.watched / "last.pt")["epoch"] == good
    _, best = load_checkpoint(case.watched / "best.pt")
    assert best["epoch"] <= good and not (case.work / "2D_Nerve_Segmentation.pt").exists()
    assert case.data_unchanged


@pytest.mark.slow
def test_cuda_out_of_memory_stops_with_advice_and_keeps_the_last_epoch(stopped_runs, sigterm_run):
    """No GPU is needed: the error torch raises on a GPU is raised by the training step itself."""
    case, good = stopped_runs["cuda oom"], sigterm_run.epoch - 1
    assert_user_error(
        case.result,
        f"the GPU ran out of memory in epoch {good + 1}; start a new run with a smaller --micro-batch-size (now 8; "
        f"the same steps in slices), --batch-size (now 8) or image size (now 64x96); {Path('runs/term/last.pt')} "
        f"keeps epoch {good}",
    )
    assert case.after["last.pt"] == case.before["last.pt"]
    assert read_torch_file(case.watched / "last.pt")["epoch"] == good and case.data_unchanged


# SIGKILL at seeded random points spread over a run: (what to wait for, the range of the extra delay in s).
# None: the start (importing, caching); a text: its line; 0: the next epoch line the process prints.
KILL_POINTS = [(None, (0.5, 3.0)), ("training on", (0.0, 0.8)), (0, (0.0, 0.8)), (0, (0.0, 0.8)), (0, (0.0, 0.3))]


@pytest.mark.slow
def test_a_run_killed_at_random_points_resumes_to_the_same_end(train_clean, sigterm_resumed, tmp_path):
    data_before = tree_hashes(train_clean)
    rng = random.Random(20240611)
    run = tmp_path / "runs" / "chain"
    killed = []
    for event, (low, high) in KILL_POINTS:
        resume = (run / "last.pt").exists()  # else killed before epoch 1 ended: start again
        process = (
            start_training(tmp_path, "--resume", "--run-name", "chain")
            if resume
            else start_training(tmp_path, "--run-name", "chain", data=train_clean)
        )
        if event is not None:
            wait_for(process, event)
        delay = rng.uniform(low, high)
        time.sleep(delay)
        landed = process.poll() is None
        if landed:
            process.kill()  # SIGKILL: no handler runs, whatever it was writing is cut short
        output = process.communicate(timeout=60)[0]
        left = [  # each loads: never half-written, but the previous file or the new one, whole
            f"{name} of epoch {read_torch_file(run / name)['epoch']}"
            for name in ("last.pt", "best.pt")
            if (run / name).exists()
        ]
        if not landed:  # the run finished first (a fast machine): only its last steps can be left
            assert process.returncode == 0 and read_torch_file(run / "last.pt")["epoch"] == 3, output
            break
        killed.append([event, round(delay, 2), *left])
    print("kills (where, delay in s, what was left):", killed)
    assert len(killed) >= 3, f"the run ended before most kills; these landed: {killed}"
    cut_short = tmp_path / ".2D_Nerve_Segmentation.pt.x1y2z3.tmp"  # what a kill while publishing leaves
    cut_short.write_bytes(b"half a checkpoint")
    (tmp_path / ".notes.tmp").write_text("not ours")
    final = run_script("train.py", "--resume", "--run-name", "chain", "--quiet", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert not cut_short.exists() and (tmp_path / ".notes.tmp").read_text() == "not ours"
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2", "3"]
    assert read_torch_file(run / "last.pt")["epoch"] == 3 and not list(run.glob(".*.tmp"))
    model, checkpoint = load_checkpoint(tmp_path / "2D_Nerve_Segmentation.pt")
    assert model(torch.zeros(1, 1, 64, 96))[0].shape == (1, 1, 64, 96)
    # the same as the run stopped by SIGTERM twice: resuming is exact, however the run was stopped
    keys = ("epoch", "train_loss", "val_loss", "val_dice", "lr")
    assert [{k: r[k] for k in keys} for r in read_metrics(run)] == [
        {k: r[k] for k in keys} for r in read_metrics(sigterm_resumed.run)
    ]
    reference = load_checkpoint(sigterm_resumed.work / "2D_Nerve_Segmentation.pt")[1]
    assert checkpoint["epoch"] == reference["epoch"] and checkpoint["postprocessing"] == reference["postprocessing"]
    assert all(torch.equal(checkpoint["state_dict"][k], reference["state_dict"][k]) for k in checkpoint["state_dict"])
    assert tree_hashes(train_clean) == data_before


def generation(number: int) -> dict:
    """A checkpoint-like value whose every tensor says which write it came from."""
    return {"generation": number, "weights": {f"w{i}": torch.full((2048,), float(number)) for i in range(48)}}


def write_generations_slowly(path: Path, first: int, report: int) -> None:
    """In a forked child: save generation after generation through save_torch, each write slowed down."""
    real_save = torch.save

    class SlowFile:
        def __init__(self, file) -> None:
            self.file = file

        def write(self, data) -> int:
            time.sleep(0.002)
            return self.file.write(data)

        def flush(self) -> None:
            self.file.flush()

    torch.save = lambda value, file: real_save(value, SlowFile(file))
    number = first
    while True:
        save_torch(path, generation(number))
        os.write(report, f"{number}\n".encode())
        number += 1


def test_a_checkpoint_write_killed_by_sigkill_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "last.pt"
    save_torch(path, generation(0))
    size, current, cut_short = path.stat().st_size, 0, 0
    rng = random.Random(11)
    for _ in range(8):
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(reader)
                write_generations_slowly(path, current + 1, writer)
            finally:
                os._exit(1)
        os.close(writer)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(reader) as pipe:
            completed = [int(line) for line in pipe.read().split()]
        state = read_torch_file(path)  # loads: never a half-written file
        number = state["generation"]
        assert number in (completed[-1] if completed else current, (completed[-1] if completed else current) + 1)
        assert all(torch.equal(w, torch.full((2048,), float(number))) for w in state["weights"].values())
        leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
        cut_short += any(p.stat().st_size < size for p in leftovers)  # killed in the middle of a write
        for leftover in leftovers:
            leftover.unlink()
        current = number
    assert cut_short >= 4, "too few kills landed inside a write to show anything"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_training_data_whose_masks_are_all_empty_is_refused(train_clean, tmp_path):
    """A model trained on it finds nothing and still scores Dice 1.0 on such images: not published."""
    data = copy_clean(train_clean, tmp_path)
    with open(data / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["mask_area"] = "0"
    write_csv(data / "manifest.csv", rows, list(rows[0]))
    with pytest.raises(UserError, match=r"manifest.csv: all \d+ training masks are empty, so a model would learn to"):
        read_manifest(data)


@pytest.mark.slow
def test_resume_with_more_max_epochs_trains_on_to_them(sigterm_run, tmp_path):
    """--max-epochs on the command line of --resume is honoured (and recorded), not silently ignored: the learning
    rate then follows the cosine to zero at the new last epoch."""
    work = copy_run(sigterm_run, tmp_path)
    result = run_script("train.py", "--resume", "--run-name", "term", "--max-epochs", "4", "--quiet", cwd=work)
    assert result.returncode == 0, result.stderr
    run = work / "runs" / "term"
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"] and float(rows[-1]["lr"]) < float(rows[2]["lr"])
    assert json.loads((run / "settings.json").read_text())["max_epochs"] == 4
    assert read_torch_file(run / "last.pt")["settings"]["max_epochs"] == 4


def test_validation_says_where_it_is_when_its_output_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    """After the last epoch, validation with test-time augmentation and the rule's grid takes minutes: a line at
    least every LINE_EVERY seconds (here every batch), where a bar would not show (capsys: not a terminal)."""
    items = []
    for number in range(4):
        image, mask = tmp_path / f"{number}.png", tmp_path / f"{number}_mask.png"
        Image.fromarray(np.full((40, 60), 30 * number, np.uint8)).save(image)
        Image.fromarray(np.zeros((40, 60), np.uint8)).save(mask)
        items.append({"image": str(image), "label": str(mask)})
    dataset = monai.data.Dataset(items, load_transforms((32, 48), with_label=True, keep_full_label=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_keep_sizes)
    config = model_config((4, 8), (2,), 0, 0.0)
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    evaluate(build_model(config), loader, SegmentationLoss(0.5), Process(0, 1, torch.device("cpu")), amp=False,
             tune=True, quiet=False)
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r", \d+ s$", "", line) for line in lines] == ["validation: batch 1 of 2", "validation: batch 2 of 2"]
    evaluate(build_model(config), loader, SegmentationLoss(0.5), Process(0, 1, torch.device("cpu")), amp=False,
             quiet=True)
    assert capsys.readouterr().err == ""  # --quiet
