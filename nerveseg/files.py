"""Atomic file writing: a reader sees the old file or the complete new one, never half of one."""

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nerveseg.errors import UserError


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any error the temporary file is removed and `path` keeps its previous content. A full disk
    or a read-only folder becomes a UserError that names the file. The file gets the permissions that
    open() would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; choose a writable folder") from None
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path}: {error.strerror}; {path} was left as it was") from None
        raise


def write_json(path: str | Path, value: Any) -> None:
    """Write a JSON file atomically."""
    with atomic_write(path) as file:
        json.dump(value, file, indent=2)
        file.write("\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write a CSV file atomically, one row per dict."""
    with atomic_write(path) as file:
        writer = csv.DictWriter(file, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def building_folder(target: Path) -> Path:
    """A new empty folder beside `target` to build it in (see swap_into_place), with the permissions that
    mkdir would give it (0777 less the umask), not mkdtemp's private 0700. Raises OSError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    building.chmod(0o777 & ~current_umask())
    return building


def swap_into_place(building: Path, target: Path) -> None:
    """Replace the folder `target` by the finished folder `building`; the old one is deleted only after."""
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, retired)
    os.replace(building, target)
    shutil.rmtree(retired, ignore_errors=True)
