"""Atomic writing (nerveseg/files.py): a disk that fills up keeps the previous file and leaves no temporary
file; written files and folders get the usual permissions; a lock ends with the process that took it, and what a
killed writer left is removed by the next write there."""

import contextlib
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import types

import pytest
import torch

from nerveseg import files
from nerveseg.checkpoint import read_torch_file, save_torch
from nerveseg.errors import UserError
from nerveseg.files import write_csv, write_json
from tests.helpers import NO_SPACE, ROOT, full_disk_opener

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


# %% CSV files that a spreadsheet opens


def test_texts_a_spreadsheet_would_run_as_formulas_are_written_as_text(tmp_path):
    rows = [{"name": name, "value": value} for name, value in (("=1+1", 1), ("+A1", -2.5), ("-2+3", "-3"),
                                                               ("@SUM(A1)", "1e-3"), ("\tx", ""), ("1_2", "a=b"))]
    write_csv(tmp_path / "out.csv", rows, ["name", "value"])
    assert (tmp_path / "out.csv").read_text().splitlines() == [
        "name,value", "'=1+1,1", "'+A1,-2.5", "'-2+3,-3", "'@SUM(A1),1e-3", "'\tx,", "1_2,a=b"]


# %% Locks that end with their taker, and what a killed writer left

TAKES_A_LOCK_AND_FORKS = """
import os, sys, time
from pathlib import Path
from nerveseg.files import FolderLock
lock = FolderLock(Path(sys.argv[1]), script="test.py")
worker = os.fork()
if worker == 0:  # a worker process (data_cleaning.py's, a DataLoader's) that outlives its parent
    print(os.getpid(), flush=True)  # the worker runs: what a fork does in it (forget_inherited_locks) is done
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_lock_ends_with_its_taker_even_where_a_forked_worker_lives_on(tmp_path):
    target = tmp_path / "out"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    taker = subprocess.Popen([sys.executable, "-c", TAKES_A_LOCK_AND_FORKS, str(target)], stdout=subprocess.PIPE,
                             text=True, env=environment)
    worker = int(taker.stdout.readline())
    try:
        with pytest.raises(UserError, match=rf"out is being written by another test.py run \(process {taker.pid}\)"):
            files.FolderLock(target, script="test.py")
        taker.kill()  # kill -9: no code of the taker runs
        taker.wait()
        assert os.path.exists(f"/proc/{worker}")  # the worker lives on
        files.FolderLock(target, script="test.py").release()  # and holds nothing
    finally:
        taker.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from nerveseg.files import atomic_write, building_folder
target = Path(sys.argv[1])
building = building_folder(target)
(building / "masks").mkdir()
with atomic_write(target.parent / "results.csv") as file:
    file.write("half of it")
    file.flush()
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(building.name, flush=True)
    sys.stdin.read()  # alive, writing, until the test closes its input
"""


def work_name(name: str) -> str:
    """A work file's or folder's name with its random part as *."""
    return re.sub(r"[a-z0-9_]{8}(\.tmp)?$", r"*\1", name)


@pytest.mark.slow
def test_what_a_killed_writer_left_is_removed_by_the_next_write_there_and_live_work_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "ABANDONED_AFTER_S", 0.0, raising=False)
    target = tmp_path / "out"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(target), "kill"], env=environment)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(path.name for path in tmp_path.iterdir())
    assert [work_name(name) for name in left] == [".out.building-*", ".results.csv.*.tmp"]
    (tmp_path / ".out.building-abcd1234").mkdir()  # left by an older version, which took no lock
    (tmp_path / ".out.old-4242").mkdir()  # a replaced folder whose deletion a kill cut short
    mine = [".out.notes", ".results.csv.mine.tmp", "out.building-abcd1234"]  # named alike, but not work folders
    for name in mine:
        (tmp_path / name).write_text("the user's")
    alive = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, str(target), "live"], env=environment,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live = alive.stdout.readline().strip()
        building = files.building_folder(target)
        with files.atomic_write(tmp_path / "results.csv") as file:
            file.write("all of it")
        hidden = sorted(path.name for path in tmp_path.iterdir() if path.name != "results.csv")
        assert [work_name(name) for name in hidden if name not in mine] == [
            ".out.building-*", ".out.building-*", ".results.csv.*.tmp"]  # the live run's, and ours
        assert {live, building.name} <= set(hidden) and set(mine) <= set(hidden)
        assert (tmp_path / "results.csv").read_text() == "all of it"
    finally:
        alive.communicate("")
    files.discard_building(building)


def test_file_names_that_are_not_utf8_or_reorder_the_text_are_written_as_they_read(tmp_path):
    names = [os.fsdecode(b"bad\xff\xfe"), "scan\u202egnp.exe", "plain é 中"]
    write_csv(tmp_path / "out.csv", [{"name": name} for name in names], ["name"])
    assert (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines() == [
        "name", "bad\\xff\\xfe", "scan\\u202egnp.exe", "plain é 中"]
    with files.atomic_write(tmp_path / "list.txt") as file:  # a list of names to read back: their own bytes
        file.write(names[0])
    assert (tmp_path / "list.txt").read_bytes() == b"bad\xff\xfe"


def test_a_folder_of_a_legal_long_name_gets_its_lock_and_work_folder(tmp_path):
    target = tmp_path / ("p" * 250)  # 250 bytes: legal; ".NAME.building-XXXXXXXX" would not be
    lock = files.FolderLock(target, script="predict.py")
    building = files.building_folder(target)
    (building / "mask.png").write_bytes(b"x")
    files.write_json(building / "a.json", {})
    with files.atomic_write(tmp_path / ("q" * 254)) as file:
        file.write("a file of a 254-byte name")
    files.swap_into_place(building, target)
    files.swap_into_place(files.building_folder(target), target)  # replacing it: its old name too
    lock.release()
    assert all(len(os.fsencode(path.name)) <= 255 for path in tmp_path.iterdir())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p" * 250, "q" * 254]


@pytest.mark.parametrize("output", [".", "..", "HERE"])
def test_an_output_that_is_the_current_folder_or_above_it_is_refused_at_once(output, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    target = tmp_path / "work" if output == "HERE" else files.Path(output)
    with pytest.raises(UserError, match=f"--output {re.escape(str(target))} is (above )?the folder predict.py runs "
                                        "in, which cannot be replaced; choose another --output"):
        files.check_replaceable(target, marker=".marker", reads=[], script="predict.py")
