"""The fault matrix: each way a stage can fail gives a message that names the file and the fix, a non-zero
exit where the stage cannot go on, no traceback for an expected error, and leaves the originals
byte-identical (sha256 of every file before and after).

Cases already covered elsewhere are not repeated here: damaged pairs, 0/1 masks, unsafe archives and an
output holding another clean (test_cleaning.py); bad batch and image sizes and SIGINT + resume
(test_training.py); missing, truncated and foreign checkpoints, unreadable images and an output folder of
user files (test_predict.py).
"""

import concurrent.futures
import csv
import errno
import gc
import io
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image, ImageFilter

from nerveseg import files
from nerveseg.checkpoint import load_checkpoint, make_checkpoint, read_torch_file, save_torch
from nerveseg.cleaning import CleaningOptions, clean_download
from nerveseg.errors import UserError
from nerveseg.files import write_csv, write_json
from nerveseg.inference import OutputFolder
from nerveseg.model import build_model, model_config
from nerveseg.postprocess import PostProcessing
from nerveseg.sources import find_download
from tests.helpers import FAST_TRAINING, ROOT, read_metrics, run_script, tree_hashes

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def sys_is_unwritable() -> bool:
    """Tests run as root, for whom permissions do not stop a write; /sys refuses new folders even to root."""
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys").is_dir()
    return False


SYS_IS_UNWRITABLE = sys_is_unwritable()
needs_unwritable_sys = pytest.mark.skipif(not SYS_IS_UNWRITABLE, reason="/sys is absent or writable here")


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 1, `script: error: ...` naming each fragment, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert ": error: " in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes free: writes past that fail with ENOSPC, as a full disk does."""

    def __init__(self, fd: int, room: int) -> None:
        super().__init__(fd, "w")
        self.room = room

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, NO_SPACE)
        data = memoryview(data).cast("B")[: self.room]
        self.room -= len(data)
        return super().write(data)


def full_disk_opener(room: int):
    """A replacement for os.fdopen (as atomic_write calls it) whose files sit on a full disk."""

    def fdopen(fd: int, mode: str = "r", **kwargs) -> io.IOBase:
        buffered = io.BufferedWriter(FullDisk(fd, room))
        return buffered if "b" in mode else io.TextIOWrapper(buffered, **kwargs)

    return fdopen


# %% Stage 1: data_cleaning.py


def save_tiff(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, compression="tiff_lzw")


@pytest.fixture(scope="module")
def damaged_clean(tiny_download, tmp_path_factory) -> types.SimpleNamespace:
    """A copy of the tiny download with several new problems at once, cleaned normally and with --strict."""
    download, planted = tiny_download
    where = tmp_path_factory.mktemp("damaged")
    source = where / "download"
    shutil.copytree(download, source)
    train = source / "train"
    assert not {"3_2", "4_4", "2_3", "3_3"} & {name for pair in planted for name in pair}
    # a 16-bit image (mode I;16): its values would be misread as 8-bit
    pixels = np.asarray(Image.open(train / "3_2.tif")).astype(np.uint16) * 257
    Image.fromarray(pixels).save(train / "3_2.tif")
    # a mask drawn with anti-aliased (grey) edges: which side of the edge is nerve would be a guess
    mask = Image.open(train / "4_4_mask.tif")
    assert np.asarray(mask).any()
    mask.filter(ImageFilter.GaussianBlur(1.5)).save(train / "4_4_mask.tif", compression="tiff_lzw")
    # names that do not follow <subject>_<n>
    bad_names = ["abc.tif", "1-7.tif", "1_7_extra.tif", "x_1_mask.tif"]
    for name in bad_names:
        shutil.copyfile(train / "1_1.tif", train / name)
    # the same ids in train/ and in train.zip: 2_3 with different content, 3_3 (and its mask) identical
    changed = np.asarray(Image.open(train / "2_3.tif")).copy()
    changed[0, 0] ^= 0xFF
    buffer = io.BytesIO()
    Image.fromarray(changed).save(buffer, format="TIFF")
    with zipfile.ZipFile(source / "train.zip", "w") as archive:
        archive.writestr("train/2_3.tif", buffer.getvalue())
        archive.write(train / "3_3.tif", "train/3_3.tif")
        archive.write(train / "3_3_mask.tif", "train/3_3_mask.tif")
    before = tree_hashes(source)
    output = where / "clean"
    result = run_script("data_cleaning.py", "--source", str(source), "--output", str(output), "--quiet", cwd=where)
    strict = run_script(
        "data_cleaning.py", "--source", str(source), "--output", str(where / "strict"), "--strict", "--quiet", cwd=where
    )
    with open(output / "manifest.csv", newline="") as file:
        manifest = {row["id"]: row for row in csv.DictReader(file)}
    return types.SimpleNamespace(
        source=source,
        output=output,
        result=result,
        strict=strict,
        manifest=manifest,
        bad_names=bad_names,
        unchanged=tree_hashes(source) == before,
        where=where,
    )


def assert_skipped(damaged: types.SimpleNamespace, row_id: str, *reasons: str) -> None:
    """The id is in the manifest as not kept, for these reasons, reported on stderr, and not copied."""
    assert damaged.result.returncode == 0, damaged.result.stderr
    row = damaged.manifest[row_id]
    assert row["kept"] == "0", row
    for reason in reasons:
        assert reason in row["reason"], row["reason"]
        assert reason in damaged.result.stderr and reason in damaged.strict.stderr
    assert not (damaged.output / "images" / f"{row_id}.tif").exists()
    assert damaged.unchanged, "the originals were modified"


def test_a_16_bit_image_is_skipped_with_its_reason(damaged_clean):
    assert_skipped(damaged_clean, "3_2", "3_2.tif is mode I;16, expected 8-bit grayscale (L)")


def test_a_mask_with_anti_aliased_edges_is_refused_not_guessed(damaged_clean):
    assert_skipped(damaged_clean, "4_4", "4_4_mask.tif: mask is not binary (values [0, ", "expected 0/255")


def test_names_that_do_not_follow_subject_n_are_skipped(damaged_clean):
    for name in damaged_clean.bad_names:
        assert_skipped(damaged_clean, name, f"train/{name}: name is not <subject>_<n>.tif")
        assert damaged_clean.manifest[name]["subject"] == ""


def test_an_id_in_two_places_with_different_content_is_skipped(damaged_clean):
    zipped = f"{damaged_clean.source / 'train.zip'}:train/2_3.tif"
    assert_skipped(damaged_clean, "2_3", "2_3.tif was found 2 times with different content", zipped, "keep only")


def test_an_id_in_two_places_with_the_same_content_is_kept_once(damaged_clean):
    row = damaged_clean.manifest["3_3"]
    assert row["kept"] == "1" and row["reason"] == "", row
    for folder, suffix in (("images", ""), ("masks", "_mask")):
        copy = (damaged_clean.output / folder / "3_3.tif").read_bytes()
        assert copy == (damaged_clean.source / "train" / f"3_3{suffix}.tif").read_bytes()
    assert damaged_clean.unchanged


def test_strict_stops_on_these_problems_and_writes_nothing(damaged_clean):
    assert_user_error(damaged_clean.strict, "--strict: 7 problem(s)", "mode I;16", "not binary", "different content")
    assert not (damaged_clean.where / "strict").exists()
    assert not list(damaged_clean.where.glob(".strict.building-*"))
    assert damaged_clean.unchanged


def test_an_output_that_cannot_be_a_folder_is_refused(tiny_download, tmp_path):
    source = tiny_download[0]
    before = tree_hashes(source)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    under = run_script("data_cleaning.py", "--source", str(source), "--output", str(blocker / "clean"), cwd=tmp_path)
    assert_user_error(under, f"cannot write into {blocker}", "choose --output in a writable folder")
    itself = run_script("data_cleaning.py", "--source", str(source), "--output", str(blocker), cwd=tmp_path)
    assert_user_error(itself, f"{blocker} is a file, not a folder; choose another --output")
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    if SYS_IS_UNWRITABLE:  # a folder that even root cannot write into, like a read-only mount
        refused = run_script(
            "data_cleaning.py", "--source", str(source), "--output", "/sys/nerveseg-clean", cwd=tmp_path
        )
        assert_user_error(refused, "cannot write into /sys: ", "choose --output in a writable folder")
    assert tree_hashes(source) == before


def test_a_full_disk_while_cleaning_keeps_the_previous_clean(tiny_download, tmp_path, monkeypatch):
    source, output = tiny_download[0], tmp_path / "clean"
    before_source = tree_hashes(source)
    download = find_download(source, tmp_path)
    clean_download(download, output, CleaningOptions(workers=1, quiet=True), overwrite=False)
    before = tree_hashes(output)
    real_write_bytes, calls = Path.write_bytes, []

    def write_bytes_until_full(path: Path, data: bytes) -> int:
        calls.append(path)
        if len(calls) < 5:
            return real_write_bytes(path, data)
        real_write_bytes(path, data[: len(data) // 2])  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "write_bytes", write_bytes_until_full)
    with pytest.raises(UserError) as caught:  # other options: the clean is redone over the previous one
        clean_download(download, output, CleaningOptions(duplicates="keep", workers=1, quiet=True), overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 5 and calls[-1].is_relative_to(tmp_path)
    message = str(caught.value)
    assert f"cleaning stopped: {NO_SPACE}; {output} was left as it was" in message and "Free some space" in message
    assert tree_hashes(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"], "a partial copy was left behind"
    assert tree_hashes(source) == before_source


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
    """A 3-epoch run stopped by SIGTERM (a job scheduler's stop) soon after epoch 1. Do not modify it."""
    work = tmp_path_factory.mktemp("sigterm")
    data_hashes = tree_hashes(train_clean)
    process = start_training(work, "--run-name", "term", data=train_clean)
    output = wait_for(process, 1)
    epoch_seconds = float(re.search(r", ([\d.]+) s$", output.rstrip())[1])
    time.sleep(max(epoch_seconds / 4, 0.02))  # inside epoch 2, on a fast machine or a slow one
    process.send_signal(signal.SIGTERM)
    output += process.communicate(timeout=120)[0]
    stopped = re.search(r"interrupted in epoch (\d+)", output)
    return types.SimpleNamespace(
        work=work,
        run=work / "runs" / "term",
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
    """The SIGTERM run resumed, stopped by SIGTERM again while it publishes the model, and resumed again."""
    work = copy_run(sigterm_run, tmp_path_factory.mktemp("sigterm-resumed"))
    process = start_training(work, "--resume", "--run-name", "term")
    output = wait_for(process, 3)
    process.send_signal(signal.SIGTERM)  # all epochs done: now choosing the post-processing and saving
    output += process.communicate(timeout=120)[0]
    second = types.SimpleNamespace(returncode=process.returncode, output=output)
    second.last_epoch = read_torch_file(work / "runs" / "term" / "last.pt")["epoch"]
    final = run_script("train.py", "--resume", "--run-name", "term", "--quiet", cwd=work)
    return types.SimpleNamespace(work=work, run=work / "runs" / "term", second=second, final=final)


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


def test_sigterm_saves_the_last_epoch_and_resume_finishes_the_run(sigterm_run, sigterm_resumed):
    assert sigterm_run.returncode == 130 and "Traceback" not in sigterm_run.output, sigterm_run.output
    assert sigterm_run.epoch and sigterm_run.epoch >= 2, sigterm_run.output
    assert "Continue with: python train.py --resume --run-name term" in sigterm_run.output
    state = read_torch_file(sigterm_run.run / "last.pt")
    assert state["epoch"] == sigterm_run.epoch - 1 == len(read_metrics(sigterm_run.run))
    assert not list(sigterm_run.run.glob(".*.tmp")) and not (sigterm_run.work / "2D_Nerve_Segmentation.pt").exists()
    second = sigterm_resumed.second
    if second.returncode != 0:  # the signal came while the model was published (else it had just finished)
        assert second.returncode in (130, -signal.SIGINT), second.output
        # after the last epoch's line: "train.py: interrupted" (publishing), or still inside the epoch loop
        stopped = ("train.py: interrupted", "interrupted in epoch 3; the last completed epoch is saved")
        assert any(text in second.output for text in stopped) and "Traceback" not in second.output, second.output
        assert second.last_epoch == 3
    final = sigterm_resumed.final
    assert final.returncode == 0, final.stderr
    assert "resuming" in final.stdout and "after epoch 3 of 3" in final.stdout
    assert [row["epoch"] for row in read_metrics(sigterm_resumed.run)] == ["1", "2", "3"]
    model, checkpoint = load_checkpoint(sigterm_resumed.work / "2D_Nerve_Segmentation.pt")
    assert 1 <= checkpoint["epoch"] <= 3 and model(torch.zeros(1, 1, 64, 96))[0].shape == (1, 1, 64, 96)
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
    # Loaded by Python at start-up (PYTHONPATH): simulates a GPU running out of memory in the training step.
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


def test_a_manifest_that_lists_a_missing_file_stops_training(stopped_runs):
    case = stopped_runs["missing file"]
    data = case.work / "data"
    assert_user_error(
        case.result,
        f"{data / 'manifest.csv'} lists {data / 'images' / '2_3.tif'}, which is missing; run data_cleaning.py again",
    )
    assert case.after == case.before and not (case.work / "runs").exists()


def test_one_subject_is_too_few_for_a_split_by_subject(stopped_runs):
    case = stopped_runs["one subject"]
    assert_user_error(
        case.result, "only 1 subject in the data: a split by subject needs at least 2", "(python data_cleaning.py)"
    )
    assert case.after == case.before and not (case.work / "runs").exists()


def test_settings_that_cannot_work_are_refused_before_any_work(stopped_runs):
    """The script's side of the settings checks (their cases: tests/test_runs.py): one line, no traceback."""
    case = stopped_runs["learning rate 0"]
    assert_user_error(case.result, "--learning-rate must be above 0 (not 0.0)")
    assert case.after == case.before and not (case.work / "runs").exists()


def test_a_model_path_under_a_file_is_refused_before_training(stopped_runs):
    case = stopped_runs["model path"]
    blocker = case.work / "a_file"
    assert_user_error(case.result, f"{blocker} cannot be a folder: {blocker} is a file; choose another --model-path")
    assert blocker.read_text() == "not a folder" and not (case.work / "runs").exists()
    assert case.after == case.before


@needs_unwritable_sys
def test_a_runs_dir_that_cannot_be_made_is_refused(stopped_runs):
    case = stopped_runs["runs dir"]
    assert_user_error(case.result, "cannot make the run folder /sys/nerveseg-runs/", "choose another --runs-dir")
    assert not list(case.work.iterdir()) and case.after == case.before


def test_a_loss_that_becomes_nan_in_the_first_epoch_stops_and_says_so(stopped_runs):
    case = stopped_runs["nan in epoch 1"]
    assert_user_error(
        case.result, "the training loss became nan in epoch 1; no epoch was completed, so nothing was saved"
    )
    assert "lower --learning-rate (now 1e+30)" in case.result.stderr
    assert sorted(p.name for p in (case.work / "runs" / "nan").iterdir()) == ["settings.json"]
    assert not (case.work / "2D_Nerve_Segmentation.pt").exists() and case.after == case.before


def test_resume_with_nothing_to_resume_says_to_start_again(stopped_runs):
    """What a run killed before its first epoch ended leaves: no last.pt (the kill test then starts afresh)."""
    case = stopped_runs["nothing to resume"]
    assert_user_error(
        case.result,
        f"--resume: {Path('runs/never/last.pt')} does not exist: run never stopped before its first epoch ended, "
        "or never started. Start it again without --resume: python train.py --run-name never",
    )
    assert not list(case.work.iterdir())


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


# %% Checkpoint readers (predict.py, train.py --resume)


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A valid (untrained) checkpoint of a small network: enough for what is tested here."""
    config = model_config((4, 8), (2,), 0, 0.0)
    checkpoint = make_checkpoint(
        build_model(config),
        model_config=config,
        preprocessing={"image_size": [32, 48]},
        postprocessing=PostProcessing(presence_threshold=0.5).as_dict(),
        settings={},
        epoch=1,
        metrics={"dice": 0.5},
    )
    path = tmp_path / "model.pt"
    save_torch(path, checkpoint)
    load_checkpoint(path)
    return path


def test_a_checkpoint_from_before_the_presence_output_still_predicts(tmp_path):
    """Version 1 (a plain MONAI UNet, no presence rule) loads as a model without presence: nothing is emptied
    by presence, and the masks are those of its own rule."""
    from monai.networks.nets import UNet

    config = {key: value for key, value in model_config((4, 8), (2,), 0, 0.0).items() if key != "presence"}
    old_model = UNet(**config)
    old = {
        "format": "nerveseg-unet",
        "version": 1,
        "model_config": config,
        "state_dict": old_model.state_dict(),
        "preprocessing": {"image_size": [32, 48]},
        "postprocessing": {"threshold": 0.5, "keep_largest": False, "min_area_fraction": 0.0},
        "settings": {},
        "epoch": 3,
        "metrics": {"dice": 0.5},
    }
    save_torch(tmp_path / "v1.pt", old)
    model, checkpoint = load_checkpoint(tmp_path / "v1.pt")
    images = torch.rand(2, 1, 32, 48)
    mask_logits, presence_logits = model(images)
    assert presence_logits is None and model.presence_head is None
    torch.testing.assert_close(mask_logits, old_model.eval()(images))
    assert PostProcessing(**checkpoint["postprocessing"]).presence_threshold == 0.0


def edit_checkpoint(path: Path, edit) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    edited = path.with_name("edited.pt")
    torch.save(checkpoint, edited)
    return edited


CHECKPOINT_EDITS = {
    "other channels": (
        lambda c: c["model_config"].update(channels=[8, 16]),
        "does not match the model it describes (Error(s) in loading state_dict for PresenceUNet:; size mismatch for "
        "model.0.conv.weight",
    ),
    "other depth": (lambda c: c["model_config"].update(channels=[4, 8, 16]), "the length of `strides` should equal"),
    "other outputs": (lambda c: c["model_config"].update(out_channels=2), "size mismatch"),
    "image size not a multiple": (
        lambda c: c["preprocessing"].update(image_size=[33, 48]),
        "its image size [33, 48] does not suit its network (height and width must be multiples of 2)",
    ),
    "image size zero": (lambda c: c["preprocessing"].update(image_size=[0, 48]), "must be multiples of 2"),
    "no preprocessing": (lambda c: c.pop("preprocessing"), "lacks preprocessing"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_EDITS))
def test_a_checkpoint_of_another_architecture_or_image_size_is_refused(case, small_checkpoint):
    edit, message = CHECKPOINT_EDITS[case]
    edited = edit_checkpoint(small_checkpoint, edit)
    before = edited.read_bytes()
    with pytest.raises(UserError) as caught:
        load_checkpoint(edited)
    assert message in str(caught.value) and str(edited) in str(caught.value)
    assert "edited" in str(caught.value) and "train.py" in str(caught.value)
    assert edited.read_bytes() == before


class RunsCode:
    """Unpickling this creates the file `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(small_checkpoint, tmp_path):
    def malicious(marker: Path, name: str) -> Path:
        return edit_checkpoint(small_checkpoint, lambda c: c.update(payload=RunsCode(marker))).rename(tmp_path / name)

    control = malicious(tmp_path / "control-marker", "control.pt")
    torch.load(control, weights_only=False)  # an unsafe load runs the payload: the test file is really malicious
    assert (tmp_path / "control-marker").exists()
    marker = tmp_path / "marker"
    evil = malicious(marker, "evil.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(images / "1.png")
    before = tree_hashes(tmp_path)
    refusal = "holds Python objects that safe loading refuses (weights_only=True, it refers to io.open), so it"
    result = run_script(
        "predict.py",
        *("--checkpoint", str(evil), "--input", str(images), "--output", str(tmp_path / "out"), "--quiet"),
        cwd=tmp_path,
    )
    assert_user_error(result, f"{evil} {refusal}", "nothing in it was run", "Only use checkpoints written by train.py")
    run = tmp_path / "runs" / "evil"  # train.py --resume reads last.pt with the same reader
    run.mkdir(parents=True)
    shutil.copyfile(evil, run / "last.pt")
    with pytest.raises(UserError, match=re.escape(refusal)):
        read_torch_file(run / "last.pt")
    shutil.rmtree(tmp_path / "runs")
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


# %% A disk that fills up while writing


WRITERS = {
    "json": (lambda path: write_json(path, {"values": list(range(3000))})),
    "csv": (lambda path: write_csv(path, [{"a": i, "b": i * i} for i in range(3000)], ["a", "b"])),
    "checkpoint": (lambda path: save_torch(path, {"weights": torch.arange(20000.0)})),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("room", [0, 1000, 9000])
def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary_file(writer, room, tmp_path, monkeypatch):
    target = tmp_path / f"out.{writer}"
    target.write_bytes(b"the previous, complete file")
    monkeypatch.setattr(files, "os", types.SimpleNamespace(**{**vars(os), "fdopen": full_disk_opener(room)}))
    with pytest.raises(UserError) as caught:
        WRITERS[writer](target)
    assert str(caught.value) == f"cannot write {target}: {NO_SPACE}; {target} was left as it was"
    assert target.read_bytes() == b"the previous, complete file"
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "a temporary file was left behind"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_folders_get_the_usual_permissions(umask, tmp_path):
    """Not mkstemp's 0600 and mkdtemp's 0700: others in a shared project can read the results."""
    previous = os.umask(umask)
    try:
        for name, write in WRITERS.items():
            write(tmp_path / f"out.{name}")
        folder = files.building_folder(tmp_path / "clean")
    finally:
        os.umask(previous)
    for name in WRITERS:
        assert stat.S_IMODE((tmp_path / f"out.{name}").stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_a_full_disk_at_fsync_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_torch(target, {"epoch": 1})

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(files, "os", types.SimpleNamespace(**{**vars(os), "fsync": fsync}))
    with pytest.raises(UserError, match=f"cannot write {re.escape(str(target))}: {NO_SPACE}"):
        save_torch(target, {"epoch": 2})
    assert read_torch_file(target) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("room", [0, 5000])
def test_a_full_disk_while_predicting_keeps_the_previous_predictions(room, tmp_path, monkeypatch):
    target = tmp_path / "predictions"
    mask = np.random.default_rng(0).random((420, 580)) > 0.5  # compresses badly: many writes
    first = OutputFolder(target)
    first.write_mask("1", mask)
    write_csv(first.building / "submission.csv", [{"img": "1", "pixels": "1 2"}], ["img", "pixels"])
    first.finish()
    before = tree_hashes(target)
    second = OutputFolder(target)
    second.write_mask("1", mask)
    real_open = PIL.Image.builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_open(file, mode, *args, **kwargs)
        return io.BufferedWriter(FullDisk(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), room))

    monkeypatch.setattr(PIL.Image, "builtins", types.SimpleNamespace(open=open_on_a_full_disk))
    with pytest.raises(UserError) as caught:
        second.write_mask("2", mask)
    monkeypatch.undo()
    path = second.building / "masks" / "2.png"
    assert str(caught.value) == f"cannot write {path}: {NO_SPACE}; nothing was changed in {target}"
    assert sorted(p.name for p in (second.building / "masks").iterdir()) == ["1.png"], "a half-written mask is left"
    del second, caught  # the run stops here; its unfinished folder goes with it
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]
    assert tree_hashes(target) == before


def test_a_predict_output_that_cannot_be_a_folder_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"{re.escape(str(blocker))} is a file, not a folder; choose another --output"):
        OutputFolder(blocker)
    with pytest.raises(UserError, match=f"cannot write into {re.escape(str(blocker))}: .*; choose another --output"):
        OutputFolder(blocker / "predictions")
    if SYS_IS_UNWRITABLE:
        with pytest.raises(UserError, match="cannot write into /sys: .*; choose another --output"):
            OutputFolder(Path("/sys/nerveseg-predictions"))
    assert blocker.read_text() == "not a folder" and [p.name for p in tmp_path.iterdir()] == ["a_file"]
