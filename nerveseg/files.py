"""Safe file writing: a reader sees the old file or the complete new one, never half of one; a folder is
replaced only where the pipeline wrote it, never where it holds what the run reads; one run at a time writes it.
"""

import contextlib
import csv
import fcntl
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
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


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula


def spreadsheet_safe(value: Any) -> Any:
    """A text that a spreadsheet would run as a formula (a file named "=HYPERLINK(...).png") with a leading ' so
    that it shows as text (OWASP's advice for CSV injection); numbers, and texts that are numbers, as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write a CSV file atomically, one row per dict; texts that a spreadsheet would run are made plain text."""
    with atomic_write(path) as file:
        writer = csv.DictWriter(file, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)


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


# Replacing a folder: only one of ours, never one the run reads from, one run at a time ---------------------------


def check_can_be_folder(folder: Path, option: str) -> None:
    """Refuse now, not after the work, a folder that cannot be made because it or a folder above it is a file."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{folder} cannot be a folder: {blocker} is a file; choose another {option}")


def check_replaceable(target: Path, *, marker: str, reads: Iterable[str | Path], script: str,
                      option: str = "--output") -> None:
    """Refuse to (re)build the folder `target` where replacing it could lose files that `script` did not write.

    Refused: a folder that is, or holds, one of the paths the run `reads` (its source or input folder and files,
    compared resolved: through symbolic links too); a symbolic link (the folder it points to is named instead); a
    file; a folder that is not empty and lacks `marker`, the file that `script` leaves in every folder it writes.
    """
    resolved = os.path.realpath(target)
    for path, read in resolved_paths(reads):
        if read == resolved:
            raise UserError(f"{option} {target} is what {script} reads, and replacing it would delete your files; "
                            f"choose another {option}: a new or empty folder outside it")
        if read.startswith(resolved.rstrip(os.sep) + os.sep):
            raise UserError(f"{option} {target} holds {path}, which {script} reads, and replacing it would delete "
                            f"your files; choose another {option}: a new or empty folder outside it")
    if target.is_symlink():
        raise UserError(f"{target} is a symbolic link to {resolved}; pass {option} {resolved} itself")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a folder; choose another {option}")
    if target.exists() and not (target / marker).is_file() and any(target.iterdir()):
        raise UserError(f"{target} already holds files that {script} did not write, and it never replaces those; "
                        f"choose another {option} (a new or empty folder)")


def resolved_paths(paths: Iterable[str | Path]) -> Iterator[tuple[str | Path, str]]:
    """Each path with its resolved form (symbolic links followed), resolving each folder only once: the thousands
    of files of a few folders take milliseconds."""
    folders: dict[str, str] = {}
    for path in paths:
        folder, name = os.path.split(os.fspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder or ".")
        joined = os.path.join(folders[folder], name)
        yield path, os.path.realpath(joined) if name in ("", ".", "..") or os.path.islink(joined) else joined


class FolderLock:
    """An exclusive lock (fcntl) on .NAME.lock beside the folder `target` while this process writes it: another run
    that asks for it meanwhile is refused at once. Released by release(), or at the end of the process in any way
    (even kill -9: the kernel drops the lock; only then is a stale lock file left, which the next run reuses).
    Raises OSError where the lock file cannot be made."""

    def __init__(self, target: Path, *, script: str, option: str = "--output") -> None:
        path = target.parent / f".{target.name}.lock"
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (kept open: it holds the lock)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise UserError(f"{target} is being written by another {script} run"
                                f"{f' (process {holder})' if holder else ''}; wait for it to end, or choose another "
                                f"{option}") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break  # else the run before removed it as we opened it: lock the new one
            handle.close()
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.release = weakref.finalize(self, remove_lock, path, handle)  # at the latest when the process ends


def remove_lock(path: Path, handle: IO) -> None:
    """Remove a lock file while holding its lock, then release it (the order that keeps two runs out)."""
    with contextlib.suppress(OSError):
        path.unlink()
    handle.close()
