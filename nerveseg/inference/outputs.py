"""predict.py's outputs: the output folder, the truth masks, the examples drawn."""

import os
import sys
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from nerveseg.dicom import is_dicom_file
from nerveseg.errors import UserError
from nerveseg.files import (
    FolderLock,
    atomic_write,
    building_folder,
    check_replaceable,
    discard_building,
    name_text,
    swap_into_place,
)
from nerveseg.frames import read_truth
from nerveseg.images import MAX_IMAGE_PIXELS, MaskValues, UnreadableImage
from nerveseg.inputs import mask_suffix_hint, natural_key, read_error_reason, truth_files

MARKER = ".nerveseg-predictions"  # tells a folder of ours from a user's folder, and lists what we wrote


class OutputFolder:
    """Predictions are written into a folder beside OUTPUT and swapped in when complete.

    An existing OUTPUT is replaced only if an earlier predict.py run wrote it: it holds the marker file, which
    lists the files that run wrote. A file you added to it since is carried over untouched into the new folder
    (a hard link: the same file, not a copy). A folder of anything else is refused, and so is a folder that is or
    holds what the run reads (`reads`: the input, the truth masks). One run at a time writes OUTPUT (a lock
    beside it); an unfinished run, stopped by an error, Ctrl-C or SIGTERM, leaves nothing behind.
    """

    def __init__(self, target: Path, *, reads: Iterable[str | Path] = ()) -> None:
        check_replaceable(target, marker=MARKER, reads=reads, script="predict.py")
        try:
            self.lock = FolderLock(target, script="predict.py")
            self.building = building_folder(target)
        except OSError as error:
            raise UserError(f"cannot write into {target.parent}: {error.strerror}; choose another --output") from None
        (self.building / "masks").mkdir()
        self.target = target
        weakref.finalize(self, discard_building, self.building)  # an unfinished run leaves nothing

    def write_mask(self, name: str, mask: np.ndarray) -> None:
        """One mask at masks/<name>.png (see write_mask)."""
        write_mask(self.building, name, mask, then=f"nothing was changed in {self.target}")

    def finish(self) -> None:
        """List what this run wrote in the marker, carry the files of others over, and swap the results in."""
        written = sorted(path.relative_to(self.building).as_posix() for path in files_below(self.building))
        with atomic_write(self.building / MARKER) as file:
            file.write("".join(f"{name}\n" for name in [MARKER, *written]))
        for name in files_of_others(self.target):
            carried = self.building / name
            if os.path.lexists(carried):
                raise UserError(f"{self.target / name} was not written by predict.py, and this run wrote a file of "
                                f"that name; move it out of {self.target} and run again ({self.target} was left as "
                                "it was)")
            try:
                carried.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.target / name, carried, follow_symlinks=False)
            except OSError as error:
                raise UserError(f"cannot carry {self.target / name} over into the new predictions "
                                f"({error.strerror}); move it out of {self.target} and run again ({self.target} was "
                                "left as it was)") from None
        for name in empty_folders_of_others(self.target):
            try:
                (self.building / name).mkdir(parents=True, exist_ok=True)
            except OSError:
                raise UserError(f"{self.target / name} is a folder of yours, and this run wrote a file of that name; "
                                f"move it out of {self.target} and run again ({self.target} was left as it was)"
                                ) from None
        swap_into_place(self.building, self.target)
        self.lock.release()


def write_mask(folder: Path, name: str, mask: np.ndarray, *, then: str) -> None:
    """One mask as an 8-bit PNG of 0 and 255, at folder/masks/<name>.png (a name may hold subfolders); a failure
    is a UserError that names the file and ends with `then` (what was kept)."""
    path = folder / "masks" / f"{name}.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((mask * 255).astype(np.uint8)).save(path, compress_level=1)
    except OSError as error:
        path.unlink(missing_ok=True)  # PIL leaves a partial file when closing it fails too (a full disk)
        raise UserError(f"cannot write {path}: {error.strerror}; {then}") from None


def files_below(folder: Path) -> list[Path]:
    """The files (and symbolic links) below a folder, at any depth."""
    return [path for path in folder.rglob("*") if path.is_symlink() or path.is_file()]


def files_of_others(target: Path) -> list[str]:
    """The files in an earlier predictions folder that predict.py did not write, as paths below it: all that its
    marker does not list (a marker left by an older version is empty: its files were these names)."""
    if not (target / MARKER).is_file():
        return []  # a new or empty folder
    listed = set((target / MARKER).read_text(encoding="utf-8", errors="surrogateescape").splitlines())
    names = [path.relative_to(target).as_posix() for path in files_below(target)]
    if not listed:
        return [name for name in names if name not in (MARKER, "images.csv", "submission.csv")
                and not (name.startswith("masks/") and name.endswith(".png"))]
    return [name for name in names if name not in listed]


def empty_folders_of_others(target: Path) -> list[str]:
    """The empty folders in an earlier predictions folder, as paths below it: predict.py makes none, so they are
    yours (a folder of yours with files in it comes along with its files)."""
    if not (target / MARKER).is_file():
        return []
    return [path.relative_to(target).as_posix() for path in target.rglob("*")
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir())]


def find_truth(
    items: list[dict], folder: str, suffix: str, rule: MaskValues, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Callable[[], np.ndarray]]:
    """For each image with a truth mask in `folder` (see inputs.truth_files), a reader of it as 0/1; several mask
    files of one image are merged. A frame `<id>#<n>` of a DICOM file or video has its own mask file, or frame n of
    a mask given as DICOM, `<id>.dcm` or `<id>_mask.dcm`."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--masks {folder} is not a folder")
    found = truth_files(root, suffix, images={Path(item["image_path"]).resolve() for item in items})
    truths = {}
    for item in items:
        base, _, number = item["id"].rpartition("#")
        paths = [(path, 1) for path in found.get(item["id"], [])]
        if not paths and number.isdigit():
            paths = [(path, int(number)) for path in found.get(base, []) if is_dicom_file(path)]
        if paths:
            truths[item["id"]] = lambda paths=paths: np.maximum.reduce(
                [read_truth_file(path, frame, rule, max_pixels=max_pixels) for path, frame in paths])
    if not truths:
        hint = mask_suffix_hint([(list(found), {item["id"] for item in items})], suffix)
        raise UserError(f"--masks {folder} holds no mask named like the input images (<name>.png, <name>{suffix}.png "
                        f"or any other image format, in the same subfolders).{hint}")
    report_unmatched(items, found, truths, folder, suffix)
    return truths


def report_unmatched(items: list[dict], found: dict[str, list[Path]], truths: dict, folder: str,
                     suffix: str) -> None:
    """Say (on stderr) which images have no truth and which mask files matched no image, with a hint at
    --mask-suffix where their names extend the images' (case1_seg beside case1): the Dice is of the others only."""
    without = [item["image_path"] for item in items if item["id"] not in truths]
    matched = {identifier for item in items for identifier in (item["id"], item["id"].rpartition("#")[0])}
    unmatched_ids = found.keys() - matched
    unmatched = sorted((path for identifier in unmatched_ids for path in found[identifier]), key=natural_key)
    if not without:
        return
    hint = mask_suffix_hint([(list(unmatched_ids), {item["id"] for item in items})], suffix)
    print(f"predict.py: {len(without)} of {len(items)} images have no truth mask in --masks {folder} (the Dice is "
          f"of the others only): {shown(without)}"
          + (f"; {len(unmatched)} mask file(s) matched no image: {shown(unmatched)}." if unmatched else ".") + hint,
          file=sys.stderr)


def shown(paths: list) -> str:
    """The first few of `paths`, as text."""
    return ", ".join(name_text(path) for path in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def read_truth_file(path: Path, frame: int, rule: MaskValues, *, max_pixels: int) -> np.ndarray:
    """One truth mask as 0/1 (nerveseg.frames.read_truth); UnreadableImage (naming it and why) where it is damaged
    or not an image."""
    try:
        return read_truth(path, frame, rule, max_pixels=max_pixels)
    except UserError:
        raise  # UnreadableImage, or several mask values without --mask-values: a setting to give
    except Exception as error:  # PIL's errors for a damaged file: OSError, ValueError, SyntaxError, ...
        raise UnreadableImage(f"{path}: {read_error_reason(str(path), error)}") from None


def truth_of(truths: dict[str, Callable[[], np.ndarray]], name: str) -> tuple[np.ndarray | None, str]:
    """The truth mask of the image `name` (None where it has none), and why its file could not be read ("" where
    it could): a damaged truth is left out of the Dice and named, as a damaged image is skipped and named."""
    if name not in truths:
        return None, ""
    try:
        return truths[name](), ""
    except UnreadableImage as error:
        return None, f"its truth mask was left out: {name_text(str(error))}"


def pick_examples(items: list[dict], predicted: dict[str, str], count: int) -> list[dict]:
    """Up to `count` images for the picture: spread over the list, at least half with a predicted nerve."""
    with_nerve = [item for item in items if predicted.get(item["id"])]
    without = [item for item in items if not predicted.get(item["id"])]
    wanted = min(count, len(items))
    first = evenly_spaced(with_nerve, max(wanted - len(without), (wanted + 1) // 2))
    return sorted(first + evenly_spaced(without, wanted - len(first)), key=items.index)


def evenly_spaced(items: list, count: int) -> list:
    """`count` items evenly spaced through the list."""
    count = min(count, len(items))
    return [items[int(i * len(items) / count)] for i in range(count)] if count > 0 else []
