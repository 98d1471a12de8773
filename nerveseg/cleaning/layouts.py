"""A user's own folders of images and masks: which layout they are in, the pairs, and each image's subject.

Layouts (data_cleaning.py --layout; "auto" takes the one that is there and refuses to guess between two):

    kaggle         the competition download, in any of its forms (nerveseg/cleaning/sources.py)
    images-masks   images/ and masks/ folders (or img/, labels/, gt/, ...) with matching names, at the top of
                   the source or in each class folder (benign/images/ with benign/masks/, ...)
    suffix         <name>.png beside <name>_mask.png (another suffix: --mask-suffix), in one folder or in class
                   folders (benign/, malignant/, normal/, ...)

A pair's id is the image's path below the source without its extension (benign/case 1), so the clean copy
keeps the user's names. A mask may also be named <name>_mask.png in a masks folder, and extra masks of one
image (<name>_mask_1.png, as in the BUSI dataset) are merged into one.
"""

import csv
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nerveseg.cleaning.sources import KAGGLE_ZIP, check_source
from nerveseg.dicom import inspect_dicom, is_dicom_file
from nerveseg.errors import UserError
from nerveseg.images import UnreadableImage
from nerveseg.inputs import (
    IMAGE_FOLDERS,
    MASK_FOLDERS,
    folder_pairs,
    id_of,
    image_files,
    join_id,
    mask_name_pattern,
    mask_suffix_hint,
    natural_key,
    relative_id,
)
from nerveseg.video import is_video_file

LAYOUTS = ("auto", "kaggle", "images-masks", "suffix")
KAGGLE_TRAIN_NAME = re.compile(r"^\d+_\d+(_mask)?\.tiff?$", re.IGNORECASE)


@dataclass
class OwnPair:
    """The files of one id: normally one image and one mask (several masks are merged; several images refused)."""

    id: str
    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)


@dataclass
class OwnData:
    """The pairs found in a source folder, and how they were found."""

    origin: str
    layout: str
    pairs: list[OwnPair]


def looks_like_kaggle(source: Path) -> bool:
    """A zip, the competition's CSVs or zips, or a train/ folder of <subject>_<n>.tif names."""
    if source.is_file():
        return True
    names = {child.name for child in source.iterdir()}
    if KAGGLE_ZIP in names or any(name.endswith(".zip") or name.startswith("train_masks.csv") for name in names):
        return True
    train = source / "train"
    return train.is_dir() and any(KAGGLE_TRAIN_NAME.match(name) for name in os.listdir(train))


def suffix_pairs(source: Path, suffix: str, *, skip: set[Path]) -> dict[str, OwnPair]:
    """The pairs of the suffix layout below `source` (folders in `skip` left out), by id."""
    pattern = mask_name_pattern(suffix)
    pairs: dict[str, OwnPair] = {}
    for path in own_files(source):
        if not any(folder in path.parents for folder in skip):
            identifier, is_mask = id_of(path, source, pattern)
            pair = pairs.setdefault(identifier, OwnPair(identifier))
            (pair.masks if is_mask else pair.images).append(path)
    return with_dicom_frames(pairs)


def images_masks_pairs(source: Path, suffix: str) -> dict[str, OwnPair]:
    """The pairs of the images-masks layout, by id (the class folder, if any, and the image's path below images/)."""
    pattern = mask_name_pattern(suffix)
    pairs: dict[str, OwnPair] = {}
    for images, masks in folder_pairs(source):
        prefix = images.parent.relative_to(source).as_posix()
        for path in own_files(images):
            identifier = join_id(prefix, relative_id(path, images))
            pairs.setdefault(identifier, OwnPair(identifier)).images.append(path)
        for path in own_files(masks):
            identifier = join_id(prefix, id_of(path, masks, pattern)[0])
            pairs.setdefault(identifier, OwnPair(identifier)).masks.append(path)
    return with_dicom_frames(pairs)


def own_files(folder: Path) -> list[Path]:
    """The image files and DICOM files below `folder` (videos are not read as own data: export their frames)."""
    return [path for path in image_files(folder, media=True) if not is_video_file(path)]


def with_dicom_frames(pairs: dict[str, OwnPair]) -> dict[str, OwnPair]:
    """Each pair whose image is a multi-frame DICOM file `<id>.dcm` as a pair a frame, `<id>#<n>`, its image
    `<file>#<n>` (read by nerveseg.frames.read_image), its mask frame n of a multi-frame DICOM mask or the mask
    file of that frame (`<id>#<n>_mask.png`). A DICOM file whose header cannot be read stays one pair: reading
    it gives the reason."""
    for identifier, pair in list(pairs.items()):
        if len(pair.images) != 1 or not is_dicom_file(pair.images[0]):
            continue
        try:
            frames = inspect_dicom(pair.images[0]).frames
        except UnreadableImage:
            continue
        if frames == 1:
            continue
        del pairs[identifier]
        for number in range(1, frames + 1):
            frame = pairs.setdefault(f"{identifier}#{number}", OwnPair(f"{identifier}#{number}"))
            frame.images.append(Path(f"{pair.images[0]}#{number}"))
            frame.masks += [Path(f"{mask}#{number}") for mask in pair.masks if is_dicom_file(mask)]
    return pairs


def describe_folder(source: Path) -> str:
    """What a folder holds, in a line: its image files by folder and suffix, or that it has none."""
    counts = Counter((path.parent.relative_to(source).as_posix(), path.suffix.lower()) for path in own_files(source))
    if not counts:
        entries = sorted(child.name + ("/" if child.is_dir() else "") for child in source.iterdir())[:8]
        return f"no image files ({', '.join(entries) or 'it is empty'})"
    shown = ", ".join(f"{count} {suffix} in {folder}/" for (folder, suffix), count in counts.most_common(6))
    return f"{sum(counts.values())} image files: {shown}{', ...' if len(counts) > 6 else ''}"


def suffix_hint(source: Path, suffix: str) -> str:
    """mask_suffix_hint for the files below `source`: each name against the names in its own folder, and the names
    in masks/ folders against those in the images/ folder beside them."""
    by_folder: dict[Path, list[str]] = {}
    for path in own_files(source):
        by_folder.setdefault(path.parent, []).append(path.stem)
    groups = [(stems, set(stems)) for stems in by_folder.values()]
    for images, masks in folder_pairs(source):
        groups.append(([path.stem for path in own_files(masks)], {path.stem for path in own_files(images)}))
    return mask_suffix_hint(groups, suffix)


def detect_layout(source: Path, suffix: str) -> str:
    """The one layout found at `source`; a UserError lists what was found when there is none or several."""
    check_source(source)
    found = {}
    kaggle = looks_like_kaggle(source)
    if kaggle:
        found["kaggle"] = "the Kaggle download (a zip, its CSVs, or train/ with <subject>_<n>.tif names)"
    if source.is_dir():
        pairs = folder_pairs(source)
        if pairs:
            found["images-masks"] = "images/ and masks/ folders"
        skip = {folder for pair in pairs for folder in pair}
        if kaggle:
            skip |= {source / "train", source / "test", source / "test_masks"}
        paired = [pair for pair in suffix_pairs(source, suffix, skip=skip).values() if pair.images and pair.masks]
        if paired:
            found["suffix"] = f"{len(paired)} images with a <name>{suffix} mask beside them"
    if len(found) == 1:
        return next(iter(found))
    options = "--layout kaggle, --layout images-masks or --layout suffix (with --mask-suffix if masks end otherwise)"
    if found:
        listing = "; ".join(f"{name}: {what}" for name, what in found.items())
        choices = " or ".join(f"--layout {name}" for name in found)
        raise UserError(f"{source} holds more than one layout ({listing}); choose one with {choices}")
    raise UserError(
        f"found no image/mask pairs in {source} ({describe_folder(source)}).{suffix_hint(source, suffix)} Expected "
        f"the Kaggle download ({KAGGLE_ZIP}, or train/ and test/), images/ and masks/ folders with matching names, "
        f"or <name>.png beside <name>{suffix}.png; choose with {options}. For synthetic data: python data_cleaning.py "
        "--demo"
    )


def find_own_data(source: Path, layout: str, suffix: str) -> OwnData:
    """The pairs of `source` in an images-masks or suffix layout."""
    check_source(source)
    if not source.is_dir():
        raise UserError(f"--layout {layout}: --source {source} is a file; pass the folder of your images and masks")
    if layout == "images-masks":
        if not folder_pairs(source):
            raise UserError(f"--layout images-masks: {source} has no images/ and masks/ folders "
                            f"({describe_folder(source)}); the names may be {'/'.join(IMAGE_FOLDERS)} and "
                            f"{'/'.join(MASK_FOLDERS)}")
        pairs = images_masks_pairs(source, suffix)
    else:
        pairs = suffix_pairs(source, suffix, skip={folder for pair in folder_pairs(source) for folder in pair})
        if not any(pair.masks for pair in pairs.values()):
            raise UserError(f"--layout suffix: no file below {source} is named <name>{suffix} "
                            f"({describe_folder(source)}); set --mask-suffix to how your masks' names end."
                            + suffix_hint(source, suffix))
    hint = "" if any(pair.images and pair.masks for pair in pairs.values()) else suffix_hint(source, suffix)
    if hint:
        raise UserError(f"--layout {layout}: no image below {source} has a mask named like it (<name> or "
                        f"<name>{suffix}).{hint}")
    return OwnData(str(source), layout, [pairs[key] for key in sorted(pairs, key=natural_key)])


# Subjects ------------------------------------------------------------------------------------------------------
SUBJECT_COLUMNS = ("subject", "patient", "patient_id", "case", "case_id", "subject_id")
NAME_COLUMNS = ("image", "file", "filename", "file_name", "name", "id", "img", "path")


def subjects_from_csv(path: Path) -> Callable[[str], str | None]:
    """A lookup id -> subject from a CSV with a name column and a subject column (names with or without folder
    and extension; separated by commas, semicolons or tabs)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read --subjects {path}: {error}") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    columns = {name.strip().lower(): name for name in (rows[0].keys() if rows else [])}
    subject_column = next((columns[name] for name in SUBJECT_COLUMNS if name in columns), None)
    name_column = next((columns[name] for name in NAME_COLUMNS if name in columns), None)
    if subject_column is None or name_column is None:
        raise UserError(
            f"--subjects {path} needs a column of file names ({', '.join(NAME_COLUMNS)}) and one of subjects "
            f"({', '.join(SUBJECT_COLUMNS)}); its columns are {', '.join(columns) or 'none'}"
        )
    by_path, by_name = {}, {}
    for row in rows:
        name = Path(row[name_column].strip().replace("\\", "/")).with_suffix("").as_posix().lstrip("./")
        by_path[name] = by_name[name.rpartition("/")[2]] = row[subject_column].strip()
    return lambda identifier: by_path.get(identifier) or by_name.get(identifier.rpartition("/")[2])


def subjects_from_pattern(pattern: str) -> Callable[[str], str | None]:
    """A lookup id -> the named group "subject" of a regular expression searched in the id."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise UserError(f"--subjects {pattern!r} is not a regular expression ({error})") from None
    if "subject" not in compiled.groupindex:
        raise UserError(f"--subjects {pattern!r} needs a named group (?P<subject>...), such as '^(?P<subject>[^_]+)_'")
    return lambda identifier: (match := compiled.search(identifier)) and match["subject"] or None


def subject_lookup(spec: str) -> Callable[[str], str | None] | None:
    """--subjects: a CSV file, a regular expression, or "" (None: each image its own subject)."""
    if not spec:
        return None
    if spec.lower().endswith(".csv") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise UserError(f"--subjects {spec} does not exist; give a CSV of file names and subjects, or a pattern")
        return subjects_from_csv(Path(spec))
    return subjects_from_pattern(spec)


def suggest_subject_pattern(ids: list[str]) -> str:
    """A --subjects pattern to suggest when names look like <subject>_<number> (ALWI_000), else ""."""
    prefixes = [match[1] for identifier in ids if (match := re.match(r"^([A-Za-z0-9]+)[_-]\d+$", identifier))]
    distinct = len(set(prefixes))
    if len(prefixes) >= 0.9 * len(ids) and 2 <= distinct <= len(ids) / 2:
        return "^(?P<subject>[A-Za-z0-9]+)[_-]"
    return ""
