"""What the tests share besides fixtures: paths, the real data's whereabouts, a script runner, hashes."""

import csv
import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from nerveseg.checkpoint import make_checkpoint, save_torch
from nerveseg.model import build_model, model_config
from nerveseg.postprocess import PostProcessing

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
KAGGLE_SAMPLE = SHARED_DATA / "kaggle-sample"
USGRA = SHARED_DATA / "usgra-kaggle"
needs_kaggle_sample = pytest.mark.skipif(not KAGGLE_SAMPLE.is_dir(), reason="../shared/data/kaggle-sample is absent")


def run_script(
    script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, in `cwd`; capture its output."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below a folder, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_metrics(run: Path) -> list[dict]:
    """The rows of a training run's metrics.csv."""
    with open(run / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


FAST_TRAINING = (
    "--model",
    "unet",  # the network from scratch: 2.6 times lighter than the default (tests/test_encoders.py trains that)
    "--image-height",
    "64",
    "--image-width",
    "96",
    "--batch-size",
    "8",
    "--val-batch-size",
    "16",
    "--min-steps-per-epoch",
    "1",  # an epoch is one pass over the few training images (the rule for small sets is tested on its own)
    "--quiet",
)


# Faults: what an expected error looks like, and a disk that fills up -------------------------------------
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


# A run stopped by a signal mid-way ------------------------------------------------------------------------
SLOW_READS = textwrap.dedent("""
    # Loaded by Python at start-up (PYTHONPATH): every image opened takes a while, so a signal lands mid-run.
    import time
    import PIL.Image

    real_open = PIL.Image.open

    def slow_open(*args, **kwargs):
        time.sleep(0.1)
        return real_open(*args, **kwargs)

    PIL.Image.open = slow_open
""")


def stop_when_building(script: str, args: list[str], where: Path, building: str, stop: int) -> tuple[str, list]:
    """Run a script with slow image reads, send it `stop` (SIGTERM or SIGINT) once its hidden building folder
    exists; return its stderr and what it left beside the output."""
    (where / "slow").mkdir()
    (where / "slow" / "sitecustomize.py").write_text(SLOW_READS)
    environment = {**os.environ, "PYTHONPATH": f"{where / 'slow'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal's Ctrl-C reaches a script: with its default handling, whatever the test process
    # inherited (a pytest-xdist worker may run with SIGINT ignored, and a child would inherit that)
    process = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=where, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(where.glob(building)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()
    time.sleep(0.3)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    return stderr, sorted(p.name for p in where.iterdir() if p.name.startswith("."))


def write_small_checkpoint(path: Path, **fields) -> Path:
    """An untrained checkpoint of a small network (32x48 images) at `path`: the scripts run in seconds with it.
    `fields` replace the checkpoint's records (metrics, postprocessing, ...)."""
    config = model_config((4, 8), (2,), 0, 0.0)
    records = {"preprocessing": {"image_size": [32, 48]}, "postprocessing": PostProcessing().as_dict(),
               "settings": {}, "epoch": 1, "metrics": {}} | fields
    save_torch(path, make_checkpoint(build_model(config), model_config=config, **records))
    return path
