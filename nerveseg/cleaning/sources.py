"""Finding the files of a Kaggle download, in any of the forms it comes in, without extracting it.

Accepted forms (under one source folder, or a zip file given directly):
- the zip the Kaggle CLI saves (``ultrasound-nerve-segmentation.zip``), holding ``train/`` and ``test/``
  folders or inner ``train.zip`` / ``test.zip`` archives;
- the unzipped folders ``train/`` and ``test/``, or the inner ``train.zip`` and ``test.zip`` themselves;
- ``train_masks.csv`` and ``sample_submission.csv``, plain or as ``.csv.zip``.

Archives are read in place: no entry name is ever used as a path to write to. An archive holding an
absolute path, a ``..`` component or a symbolic link is refused as a whole. A file read whole into memory (an
image or a CSV, in an archive or not) is bounded before it is read: by its size (--max-member-mb), and, for an
archive member, by how much it expands (MAX_COMPRESSION_RATIO), both checked in the archive's headers and again
while decompressing, since headers can lie.
"""

import io
import os
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from nerveseg.errors import UserError
from nerveseg.images import IMAGE_SUFFIXES

KAGGLE_ZIP = "ultrasound-nerve-segmentation.zip"
TIFF_SUFFIXES = (".tif", ".tiff")  # the Kaggle download's images and masks
MAX_MEMBER_MB = 64  # the default bound on a file read whole into memory (Kaggle's largest, train_masks.csv: ~2 MB)
MAX_COMPRESSION_RATIO = 200  # a member expanding more than this (past RATIO_CHECKED_FROM bytes) is a zip bomb
RATIO_CHECKED_FROM = 1 << 20  # small members may expand more: 1 MiB of zeros is still only 1 MiB
CHUNK = 1 << 20


@dataclass(frozen=True)
class Locator:
    """Where one file's bytes are: a plain file (member is empty) or a member of a zip archive."""

    path: str
    member: str = ""

    def describe(self) -> str:
        """The file's name as a user would look for it."""
        return f"{self.path}:{self.member}" if self.member else self.path


class ArchiveCache:
    """Zip archives opened on first use and kept open, each process with its own.

    An open archive must never be used across a process boundary: a forked worker shares its parent's
    file offset (one open file description) but keeps its own copy of the read buffer, so processes
    reading one archive move each other's offset and decompress the wrong bytes ("invalid distance too
    far back"). So the cache remembers the process that opened its archives; in any other process it
    closes the inherited copies unused and opens the archives anew.
    """

    def __init__(self) -> None:
        self.archives: dict[str, zipfile.ZipFile] = {}
        self.owner = os.getpid()

    def read(self, locator: Locator, *, max_bytes: int = MAX_MEMBER_MB << 20) -> bytes:
        """The bytes of the file that `locator` points to; a TooLarge error names it where it would take more
        than `max_bytes` of memory (see read_member)."""
        if not locator.member:
            path = Path(locator.path)
            if (size := path.stat().st_size) > max_bytes:
                raise TooLarge(f"{path} is {size / 2**20:.0f} MiB, {too_large_fix(max_bytes)}")
            return path.read_bytes()
        if self.owner != os.getpid():  # inherited through fork: the parent's handles, not ours
            self.close()
            self.owner = os.getpid()
        if locator.path not in self.archives:
            self.archives[locator.path] = zipfile.ZipFile(locator.path)
        buffer = io.BytesIO()
        read_member(self.archives[locator.path], locator.member, buffer, locator.describe(), max_bytes=max_bytes)
        return buffer.getvalue()

    def close(self) -> None:
        """Close every archive (in this process only: other processes' copies are not affected)."""
        for archive in self.archives.values():
            archive.close()
        self.archives.clear()

    def __enter__(self) -> "ArchiveCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TooLarge(UserError):
    """A file that would take more memory or disk than allowed; the message names it and the fix."""


def too_large_fix(max_bytes: int) -> str:
    """The end of a TooLarge message: the bound and how to raise it."""
    return (f"more than the {max_bytes / 2**20:g} MiB allowed (--max-member-mb); a Kaggle file is far smaller: "
            "re-download it, or raise --max-member-mb if this file is right")


def read_member(archive: zipfile.ZipFile, member: str, target: BinaryIO, where: str, *, max_bytes: int | None) -> None:
    """Decompress one archive member into `target`, refused (TooLarge) as soon as it would exceed `max_bytes`
    (None: no bound on its size) or expand more than MAX_COMPRESSION_RATIO times: checked first in the headers,
    then while decompressing."""
    info = archive.getinfo(member)
    check_expansion(info.file_size, info.compress_size, where, max_bytes=max_bytes)
    written = 0
    with archive.open(info) as source:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            check_expansion(written, info.compress_size, where, max_bytes=max_bytes)
            target.write(chunk)


def check_expansion(size: int, compressed: int, where: str, *, max_bytes: int | None) -> None:
    """Refuse a member of `size` bytes (expanded) from `compressed` bytes: too large, or a zip bomb."""
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"{where} expands to {size / 2**20:.0f} MiB or more, {too_large_fix(max_bytes)}")
    if size > RATIO_CHECKED_FROM and size > MAX_COMPRESSION_RATIO * max(compressed, 1):
        raise TooLarge(
            f"{where} expands {size // max(compressed, 1)} times or more ({compressed} bytes to {size / 2**20:.0f} "
            f"MiB), more than the {MAX_COMPRESSION_RATIO} times a real file does (a zip bomb?); refusing to read it. "
            "Re-download it from Kaggle."
        )


@dataclass
class Download:
    """The files of one Kaggle download: logical name (``train/1_1.tif``) -> where it is."""

    origin: str
    train: dict[str, list[Locator]]
    test: dict[str, list[Locator]]
    train_masks_csv: Locator | None
    sample_submission_csv: Locator | None


def check_member_names(archive: zipfile.ZipFile, where: str) -> None:
    """Refuse an archive with an entry that could write outside a target folder if extracted."""
    for info in archive.infolist():
        name = PurePosixPath(info.filename.replace("\\", "/"))
        is_link = stat.S_ISLNK(info.external_attr >> 16)
        if name.is_absolute() or ".." in name.parts or info.filename[1:3] == ":/" or is_link:
            what = "a symbolic link" if is_link else "an unsafe path"
            raise UserError(
                f"{where} holds {what} ({info.filename!r}); refusing to read this archive. Re-download it from Kaggle."
            )


def open_archive(path: Path, where: str) -> zipfile.ZipFile:
    """Open a zip archive, with a clear message when it is not one."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{where} is not a readable zip archive ({error}); re-download it") from None
    check_member_names(archive, where)
    return archive


class DownloadFinder:
    """Collects the files of a download; inner archives are copied to a private temporary folder."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.download = Download("", {}, {}, None, None)

    def add(self, logical: PurePosixPath, locator: Locator, where: str) -> None:
        """Sort one file into train, test or the CSVs by its name; open inner zips."""
        name, parent = logical.name, logical.parent.name
        if name.endswith(".zip"):
            self.add_inner_archive(locator, where)
        elif name in ("train_masks.csv", "train_masks.csv.zip"):
            self.download.train_masks_csv = locator
        elif name in ("sample_submission.csv", "sample_submission.csv.zip"):
            self.download.sample_submission_csv = locator
        elif parent in ("train", "test") and name.lower().endswith(TIFF_SUFFIXES):
            folder = self.download.train if parent == "train" else self.download.test
            folder.setdefault(name, []).append(locator)

    def add_inner_archive(self, locator: Locator, where: str) -> None:
        """Copy a zip found inside a zip to the scratch folder (under a name of our own) and add its files."""
        if locator.member:
            copy = self.scratch / f"inner-{len(list(self.scratch.iterdir()))}.zip"
            with zipfile.ZipFile(locator.path) as outer, open(copy, "wb") as target:
                read_member(outer, locator.member, target, locator.describe(), max_bytes=None)  # to disk: any size
            path, where = copy, f"{where}:{locator.member}"
        else:
            path = Path(locator.path)
        self.add_archive(path, where)

    def add_archive(self, path: Path, where: str) -> None:
        """Add every file of a zip archive (folders inside it are fine: train/ is found at any depth)."""
        with open_archive(path, where) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    self.add(PurePosixPath(info.filename), Locator(str(path), info.filename), where)

    def add_folder(self, folder: Path) -> None:
        """Add the download's files found directly in a folder and in its train/ and test/ subfolders."""
        for child in sorted(folder.iterdir()):
            if child.is_file() and (child.suffix == ".zip" or child.name.startswith(("train_masks", "sample_sub"))):
                self.add(PurePosixPath(child.name), Locator(str(child)), str(child))
            elif child.is_dir() and child.name in ("train", "test"):
                for file in sorted(child.iterdir()):
                    if file.is_file():
                        self.add(PurePosixPath(child.name, file.name), Locator(str(file)), str(file))


def find_download(source: Path, scratch: Path) -> Download:
    """Find the training pairs, test images and CSVs of a Kaggle download at `source`."""
    finder = DownloadFinder(scratch)
    check_source(source)
    if source.is_file():
        finder.add_archive(source, str(source))
    else:
        finder.add_folder(source)
    finder.download.origin = str(source)
    if not finder.download.train:
        raise UserError(
            f"found no training images in {source}: expected {KAGGLE_ZIP}, train.zip, or a train/ folder of "
            "<subject>_<n>.tif and <subject>_<n>_mask.tif files there"
        )
    return finder.download


def check_source(source: Path) -> None:
    """Refuse a --source that is missing, or neither a folder nor a zip file, with what to pass instead."""
    if not source.exists():
        raise UserError(
            f"{source} does not exist. Put the Kaggle download there ({KAGGLE_ZIP}, or the train/ and test/ folders) "
            "or your own images and masks, pass --source PATH, or run with --demo for synthetic data."
        )
    if source.is_dir() or (source.is_file() and (source.suffix.lower() == ".zip" or zipfile.is_zipfile(source))):
        return
    mode = source.stat().st_mode
    kind = ("an image file" if source.suffix.lower() in IMAGE_SUFFIXES else
            "a file" if stat.S_ISREG(mode) else "a device, a named pipe or a socket")
    raise UserError(
        f"--source {source} is {kind}, not a folder or a zip archive. Pass --source with the folder that holds the "
        f"Kaggle download ({KAGGLE_ZIP}, or train/ and test/) or your own images and masks, or the Kaggle zip itself"
    )


def read_csv_text(locator: Locator, cache: ArchiveCache, *, max_bytes: int = MAX_MEMBER_MB << 20) -> str:
    """The text of a CSV file, also when it is zipped on its own (``train_masks.csv.zip``), bounded as
    ArchiveCache.read bounds any file."""
    try:
        data = cache.read(locator, max_bytes=max_bytes)
        name = locator.member or locator.path
        if name.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                check_member_names(archive, locator.describe())
                csv_names = [n for n in archive.namelist() if n.endswith(".csv")]
                if not csv_names:
                    raise UserError(f"{locator.describe()} holds no .csv file; re-download it")
                buffer = io.BytesIO()
                read_member(archive, csv_names[0], buffer, f"{locator.describe()}:{csv_names[0]}", max_bytes=max_bytes)
                data = buffer.getvalue()
        return data.decode("utf-8-sig")
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as error:
        raise UserError(f"{locator.describe()} cannot be read ({type(error).__name__}: {error}); the download may be "
                        "damaged: re-download it") from None


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A private temporary folder for inner archives, removed when the run ends."""
    return tempfile.TemporaryDirectory(prefix="nerveseg-")
