"""Finding the files of a Kaggle download, in any of the forms it comes in, without extracting it.

Accepted forms (under one source folder, or a zip file given directly):
- the zip the Kaggle CLI saves (``ultrasound-nerve-segmentation.zip``), holding ``train/`` and ``test/``
  folders or inner ``train.zip`` / ``test.zip`` archives;
- the unzipped folders ``train/`` and ``test/``, or the inner ``train.zip`` and ``test.zip`` themselves;
- ``train_masks.csv`` and ``sample_submission.csv``, plain or as ``.csv.zip``.

Archives are read in place: no entry name is ever used as a path to write to. An archive holding an
absolute path, a ``..`` component or a symbolic link is refused as a whole.
"""

import io
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nerveseg.errors import UserError

KAGGLE_ZIP = "ultrasound-nerve-segmentation.zip"
IMAGE_SUFFIXES = (".tif", ".tiff")


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

    def read(self, locator: Locator) -> bytes:
        """The bytes of the file that `locator` points to."""
        if not locator.member:
            return Path(locator.path).read_bytes()
        if self.owner != os.getpid():  # inherited through fork: the parent's handles, not ours
            self.close()
            self.owner = os.getpid()
        if locator.path not in self.archives:
            self.archives[locator.path] = zipfile.ZipFile(locator.path)
        return self.archives[locator.path].read(locator.member)

    def close(self) -> None:
        """Close every archive (in this process only: other processes' copies are not affected)."""
        for archive in self.archives.values():
            archive.close()
        self.archives.clear()

    def __enter__(self) -> "ArchiveCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
        elif parent in ("train", "test") and name.lower().endswith(IMAGE_SUFFIXES):
            folder = self.download.train if parent == "train" else self.download.test
            folder.setdefault(name, []).append(locator)

    def add_inner_archive(self, locator: Locator, where: str) -> None:
        """Copy a zip found inside a zip to the scratch folder (under a name of our own) and add its files."""
        if locator.member:
            copy = self.scratch / f"inner-{len(list(self.scratch.iterdir()))}.zip"
            with (
                zipfile.ZipFile(locator.path) as outer,
                outer.open(locator.member) as source,
                open(copy, "wb") as target,
            ):
                shutil.copyfileobj(source, target)
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
    if not source.exists():
        raise UserError(
            f"{source} does not exist. Put the Kaggle download there ({KAGGLE_ZIP}, or the train/ and test/ "
            "folders), pass --source PATH, or run with --demo for synthetic data."
        )
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


def read_csv_text(locator: Locator, cache: ArchiveCache) -> str:
    """The text of a CSV file, also when it is zipped on its own (``train_masks.csv.zip``)."""
    data = cache.read(locator)
    name = locator.member or locator.path
    if name.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            check_member_names(archive, locator.describe())
            csv_names = [n for n in archive.namelist() if n.endswith(".csv")]
            if not csv_names:
                raise UserError(f"{locator.describe()} holds no .csv file; re-download it")
            data = archive.read(csv_names[0])
    return data.decode("utf-8-sig")


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A private temporary folder for inner archives, removed when the run ends."""
    return tempfile.TemporaryDirectory(prefix="nerveseg-")
