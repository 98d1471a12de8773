"""Atomic writing (nerveseg/files.py): a disk that fills up keeps the previous file and leaves no temporary
file; written files and folders get the usual permissions."""

import errno
import os
import re
import stat
import types

import pytest
import torch

from nerveseg import files
from nerveseg.checkpoint import read_torch_file, save_torch
from nerveseg.errors import UserError
from nerveseg.files import write_csv, write_json
from tests.helpers import NO_SPACE, full_disk_opener

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
