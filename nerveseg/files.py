"""Safe file writing: a reader sees the old file or the complete new one, never half of one; a folder is
replaced only where the pipeline wrote it, never where it holds what the run reads; one run at a time writes it;
what a killed run left half-written is removed by the next run that writes there.
"""

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
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
    open() would give it (0666 less the umask), not mkstemp's private 0600. A text file is UTF-8, and a
    file name that is not UTF-8 is written as its own bytes (a reader gets it back with errors="surrogateescape").
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(path.parent, re.escape(f".{hidden_stem(path)}.") + RANDOM_PART + r"\.tmp")
        handle, temporary = tempfile.mkstemp(prefix=f".{hidden_stem(path)}.", suffix=".tmp", dir=path.parent)
        lock = lock_work(temporary)  # tells a later run that this file is being written, until this process ends
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; choose a writable folder") from None
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        text = {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(handle, mode, **({} if "b" in mode else text)) as file:
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
    finally:
        drop_lock(lock)


def write_json(path: str | Path, value: Any) -> None:
    """Write a JSON file atomically."""
    with atomic_write(path) as file:
        json.dump(value, file, indent=2)
        file.write("\n")


def hidden_stem(path: Path) -> str:
    """What the names of the hidden files and folders beside `path` start with (.NAME.lock, .NAME.building-*,
    ...): its name, or where that leaves too little of the 255 bytes a file name may have, the name's first
    characters and a hash of it."""
    name = os.fsencode(path.name)
    if len(name) <= 200:
        return path.name
    return f"{os.fsdecode(name[:100]).rstrip()}-{hashlib.sha256(name).hexdigest()[:16]}"


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def name_text(name: str | Path) -> str:
    """A file name as text to show (in a report, a table, a message): the bytes of a name that is not UTF-8 as
    \\xff, and the controls that reorder the text around them ("scan<right-to-left override>gnp.exe.png" shows as
    "scanexe.png") as \\u202e, so that the name reads as it is."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(f"\\u{ord(character):04x}" if character in BIDI_CONTROLS else character for character in text)


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
    """Write a CSV file atomically, one row per dict; texts that a spreadsheet would run are made plain text, and
    file names show as they are (see name_text)."""
    with atomic_write(path) as file:
        writer = csv.DictWriter(file, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: spreadsheet_safe(name_text(value) if isinstance(value, str) else value)
                          for key, value in row.items()} for row in rows)


def building_folder(target: Path) -> Path:
    """A new empty folder beside `target` to build it in (see swap_into_place), with the permissions that
    mkdir would give it (0777 less the umask), not mkdtemp's private 0700; locked while this process builds it.
    The building and retired folders of `target` that a killed run left are removed first. Raises OSError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent, re.escape(f".{hidden_stem(target)}.") + rf"(building-{RANDOM_PART}|old-\d+)")
    building = Path(tempfile.mkdtemp(prefix=f".{hidden_stem(target)}.building-", dir=target.parent))
    building_locks[building] = lock_work(building)
    building.chmod(0o777 & ~current_umask())
    return building


def swap_into_place(building: Path, target: Path) -> None:
    """Replace the folder `target` by the finished folder `building`; the old one is deleted only after."""
    retired = target.parent / f".{hidden_stem(target)}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, retired)
    os.replace(building, target)
    drop_lock(building_locks.pop(building, None))
    shutil.rmtree(retired, ignore_errors=True)


def discard_building(building: Path) -> None:
    """Delete an unfinished building folder (a run that failed or was stopped)."""
    shutil.rmtree(building, ignore_errors=True)
    drop_lock(building_locks.pop(building, None))


# Locks that end with the process that took them, and what a killed run left ------------------------------------

RANDOM_PART = "[a-z0-9_]{8}"  # the random part of tempfile's names
ABANDONED_AFTER_S = 1.0  # younger work files are left alone: their run may not have locked them yet
held_locks: set[int] = set()  # the descriptors of the locks this process holds (see take_lock)
building_locks: dict[Path, int | None] = {}  # each building folder of this process, with its lock


def take_lock(path: str | Path) -> int | None:
    """Lock the file or folder `path` (fcntl, exclusive) without waiting: the open descriptor that holds the lock,
    or None where another process holds it. Raises OSError where `path` cannot be opened.

    The lock is this process's alone: a forked child (a worker of data_cleaning.py, a reader of predict.py) closes
    its copy of the descriptor at once (forget_inherited_locks), so it never outlives its taker; the kernel drops
    it when the taker ends in any way, kill -9 included. That is how a later run tells a run's work from a dead
    run's leftovers, and why a lock never stops a later run after its taker died."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    except BaseException:
        os.close(descriptor)
        raise
    held_locks.add(descriptor)
    return descriptor


def lock_work(path: str | Path) -> int | None:
    """take_lock on a work file or folder this process has just made; None on a file system without locks (some
    network mounts), where the work is written all the same, but what a kill leaves there is not tidied."""
    try:
        return take_lock(path)
    except OSError:
        return None


def drop_lock(descriptor: int | None) -> None:
    """Release a lock of take_lock (None: none was taken)."""
    if descriptor in held_locks:
        held_locks.discard(descriptor)
        os.close(descriptor)


def forget_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors, leaving the locks to the parent."""
    for descriptor in held_locks:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    held_locks.clear()
    building_locks.clear()


os.register_at_fork(after_in_child=forget_inherited_locks)


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Remove the work files and folders in `folder` named like `pattern` (a regular expression) that a run killed
    while writing them left: those whose lock no process holds (see take_lock)."""
    for entry in os.scandir(folder):
        if not re.fullmatch(pattern, entry.name) or entry.is_symlink():
            continue
        try:
            if time.time() - entry.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            lock = take_lock(entry.path)
        except OSError:
            continue
        if lock is not None:
            try:
                if entry.is_dir():
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
            finally:
                drop_lock(lock)


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
    check_not_current_folder(target, script=script, option=option)
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


def check_not_current_folder(target: Path, *, script: str, option: str = "--output") -> None:
    """Refuse, before any work, a folder to (re)build that is the one the script runs in (--output .) or above it:
    it cannot be swapped for the new one."""
    resolved, here = os.path.realpath(target), os.getcwd()
    if here == resolved or here.startswith(resolved.rstrip(os.sep) + os.sep):
        raise UserError(f"{option} {target} is {'' if here == resolved else 'above '}the folder {script} runs in, "
                        f"which cannot be replaced; choose another {option}: a new folder such as {option} "
                        f"{script.removesuffix('.py')}-output")


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
    """An exclusive lock on .NAME.lock beside the folder `target` while this process writes it (take_lock): another
    run that asks for it meanwhile is refused at once. Released by release(), or when this process ends in any way
    (even kill -9: the kernel drops the lock, and no worker process keeps it; only then is a stale lock file left,
    which the next run reuses). Raises OSError where the lock file cannot be made."""

    def __init__(self, target: Path, *, script: str, option: str = "--output") -> None:
        path = target.parent / f".{hidden_stem(target)}.lock"
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666))
            lock = take_lock(path)
            if lock is None:
                holder = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
                raise UserError(f"{target} is being written by another {script} run"
                                f"{f' (process {holder})' if holder.isdecimal() else ''}; wait for it to end, or "
                                f"choose another {option}")
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(lock).st_ino:
                    break  # else the run before removed it as we opened it: lock the new one
            drop_lock(lock)
        with open(path, "w", encoding="utf-8") as file:  # the process named to a run refused meanwhile
            file.write(f"{os.getpid()}\n")
        self.release = weakref.finalize(self, remove_lock, path, lock, os.getpid())  # at the latest at the end


def remove_lock(path: Path, lock: int, owner: int) -> None:
    """Remove a lock file while holding its lock, then release it (the order that keeps two runs out); only in the
    process that took it (not in a forked child that ends)."""
    if os.getpid() == owner:
        with contextlib.suppress(OSError):
            path.unlink()
        drop_lock(lock)
