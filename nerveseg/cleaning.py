"""Stage 1: verify a Kaggle download, or a user's own image/mask folders, and write a clean copy with a manifest.

The clean folder (``data/clean`` by default) holds::

    images/<subject>_<n>.tif   Kaggle training images, byte-identical copies of the verified originals
    masks/<subject>_<n>.tif    their masks, values {0, 255} (same name as the image: no string tricks)
    images/<id>.png            own data: each image as 8-bit grayscale PNG (<id>: its path below the source)
    masks/<id>.png             its mask as 0/255 PNG (the target values chosen by MaskValues)
    test/<n>.tif               Kaggle test images, byte-identical copies
    held-out/images, masks     pairs of whole subjects kept out of training (--hold-out), for an honest test
    manifest.csv               one row per training id: original files, paths, mask area, kept or why not,
                               near-duplicates, split (train or held-out)
    test.csv                   one row per test image
    cleaning.json              what was cleaned, with which options, and the summary

It is built in a temporary folder beside the target and swapped in only when complete.
"""

import concurrent.futures
import csv
import functools
import hashlib
import io
import json
import os
import re
import shutil
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from nerveseg.data import split_by_subject
from nerveseg.errors import UserError
from nerveseg.files import building_folder, swap_into_place, write_csv, write_json
from nerveseg.images import (
    MASK_VALUES_FORMS,
    MAX_IMAGE_PIXELS,
    MaskValues,
    UnreadableImage,
    describe_label,
    frame_count,
    mask_labels,
    opened_image,
    read_gray,
    target_pixels,
)
from nerveseg.layouts import OwnData, natural_key, suggest_subject_pattern
from nerveseg.rle import rle_encode
from nerveseg.sources import MAX_MEMBER_MB, ArchiveCache, Download, Locator, TooLarge, read_csv_text

KAGGLE_SIZE = (420, 580)  # height, width of every competition image
TRAIN_NAME = re.compile(r"^(\d+)_(\d+)(_mask)?\.tiff?$", re.IGNORECASE)
TEST_NAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)
FEATURE_SIZE = (64, 48)  # width, height of the thumbnail compared to find near-duplicates
MANIFEST_COLUMNS = ["id", "subject", "frame", "image", "mask", "height", "width", "mask_area", "kept", "reason",
                    "duplicate_of", "similarity", "split", "original_image", "original_mask"]
TEST_COLUMNS = ["id", "image", "kept", "reason"]
DUPLICATE_POLICIES = ("drop-empty", "drop-both", "keep")
FORMAT_VERSION = 3  # 2: subjects are names, own-data layouts, the split and original files in the manifest; 3: EXIF
# orientation applied, inputs bounded in size

_cache = ArchiveCache()  # the archives this process reads from (each process opens its own)


@dataclass
class PairResult:
    """What verifying one training id found."""

    id: str
    subject: str
    frame: str
    image: str = ""
    mask: str = ""
    height: int = 0
    width: int = 0
    mask_area: int = 0
    kept: bool = False
    reason: str = ""
    duplicate_of: str = ""
    similarity: str = ""
    split: str = ""
    original_image: str = ""
    original_mask: str = ""
    converted_from: str = ""  # the image's mode where it was not 8-bit grayscale
    several_values: list[int] = field(default_factory=list)  # a mask's labels, where the target must be named
    feature: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict:
        """The manifest row."""
        return {name: getattr(self, name) if name != "kept" else int(self.kept) for name in MANIFEST_COLUMNS}


def decode_gray8(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode an 8-bit grayscale TIFF of one frame; return (pixels, "") or (empty array, the reason it is unusable)."""
    if not data:
        return np.zeros(0), f"{name} is an empty file"
    try:
        with opened_image(data, name=name, max_pixels=max_pixels) as image:
            image_format, mode, frames = image.format, image.mode, frame_count(image)
            pixels = np.asarray(image)
    except UnreadableImage as error:
        return np.zeros(0), str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return np.zeros(0), f"{name} cannot be decoded (truncated or not an image: {error})"
    if image_format != "TIFF":
        return np.zeros(0), f"{name} is a {image_format} file, not a TIFF"
    if mode != "L" or pixels.ndim != 2:
        return np.zeros(0), f"{name} is mode {mode}, expected 8-bit grayscale (L)"
    if frames > 1:
        return np.zeros(0), f"{name} holds {frames} frames, expected one image"
    return pixels, ""


def read_unique(locators: list[Locator], name: str, max_bytes: int) -> tuple[bytes, str]:
    """The bytes of a file found once, or found several times with the same content."""
    try:
        contents = {_cache.read(locator, max_bytes=max_bytes) for locator in locators}
    except TooLarge as error:
        return b"", str(error)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        reason = f"{type(error).__name__}: {error}"
        return b"", f"{name} cannot be read ({reason}); the download may be damaged: re-download it"
    if len(contents) > 1:
        places = ", ".join(locator.describe() for locator in locators)
        return b"", f"{name} was found {len(locators)} times with different content ({places}); keep only the right one"
    return contents.pop(), ""


def thumbnail_feature(pixels: np.ndarray) -> np.ndarray:
    """A 64x48 area-averaged thumbnail, zero mean and unit length: the dot product of two is Pearson's r."""
    thumb = np.asarray(Image.fromarray(pixels).resize(FEATURE_SIZE, Image.Resampling.BOX), dtype=np.float32).ravel()
    thumb -= thumb.mean()
    return thumb / max(float(np.linalg.norm(thumb)), 1e-6)


def normalize_mask(mask: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Return (mask as {0, 255}, a note on what was repaired, the reason it is refused).

    A 0/1 mask is repaired (scaled to 0/255: nothing is guessed). Any other value, such as the grey
    edge of an anti-aliased drawing, is refused: which side of the edge is nerve would be a guess.
    """
    values = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist())  # uint8: 3x faster than unique
    if values <= {0, 255}:
        return mask, "", ""
    if values <= {0, 1}:
        return (mask * 255).astype(np.uint8), "repaired: 0/1 mask scaled to 0/255", ""
    shown = sorted(values)[:6]
    return mask, "", f"mask is not binary (values {shown}{'...' if len(values) > 6 else ''}), expected 0/255"


def verify_pair(job: tuple) -> PairResult:
    """Verify one training id and copy its files into the output folder (runs in a worker process)."""
    (subject, frame, image_locators, mask_locators, rle_text, output, max_bytes, max_pixels) = job
    result = PairResult(f"{subject}_{frame}", str(subject), str(frame))
    image_name = image_locators[0].describe() if image_locators else ""
    mask_name = mask_locators[0].describe() if mask_locators else ""
    result.original_image, result.original_mask = image_name, mask_name
    if not image_locators:
        result.reason = f"mask {mask_name} has no image"
        return result
    if not mask_locators:
        result.reason = f"image {image_name} has no mask"
        return result
    image_bytes, problem = read_unique(image_locators, image_name, max_bytes)
    mask_bytes, mask_duplicate = read_unique(mask_locators, mask_name, max_bytes)
    problem = problem or mask_duplicate
    image = mask = np.zeros(0)
    if not problem:
        image, problem = decode_gray8(image_bytes, image_name, max_pixels)
    if not problem:
        mask, problem = decode_gray8(mask_bytes, mask_name, max_pixels)
    if not problem and image.shape != mask.shape:
        problem = f"{mask_name} is {mask.shape[1]}x{mask.shape[0]}, its image is {image.shape[1]}x{image.shape[0]}"
    note = ""
    if not problem:
        mask, note, refused = normalize_mask(mask)
        problem = f"{mask_name}: {refused}" if refused else ""
    if not problem and rle_text is not None and rle_encode(mask) != " ".join(rle_text.split()):
        problem = f"{mask_name} differs from its train_masks.csv row"
    if problem:
        result.reason = problem
        return result
    result.image, result.mask = f"images/{result.id}.tif", f"masks/{result.id}.tif"
    Path(output, result.image).write_bytes(image_bytes)
    if note:
        Image.fromarray(mask).save(Path(output, result.mask), compression="tiff_lzw")
    else:
        Path(output, result.mask).write_bytes(mask_bytes)
    result.height, result.width = mask.shape
    result.mask_area = int(np.count_nonzero(mask))
    result.kept, result.reason, result.feature = True, note, thumbnail_feature(image)
    return result


@dataclass
class OwnPairJob:
    """What a worker needs to verify one pair of a user's own data."""

    id: str
    subject: str
    images: list[str]
    masks: list[str]
    mask_values: MaskValues
    output: str
    max_pixels: int = MAX_IMAGE_PIXELS


def read_own_image(path: str, max_pixels: int) -> tuple[np.ndarray, str, str, str]:
    """(8-bit grayscale pixels, the mode it was converted from or "", notes (see read_gray), the reason it is
    unusable or "")."""
    try:
        image = read_gray(path, max_pixels=max_pixels)
    except UnreadableImage as error:
        return np.zeros(0), "", "", str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return np.zeros(0), "", "", f"{path} cannot be decoded (truncated or not an image: {error})"
    return image.pixels, image.converted_from, image.notes, ""


def verify_own_pair(job: OwnPairJob) -> PairResult:
    """Verify one pair of own data and write it into the output folder as 8-bit grayscale PNG and a 0/255 PNG
    mask (runs in a worker process). Several mask files of one image are merged."""
    result = PairResult(job.id, job.subject, "", original_image=" + ".join(job.images),
                        original_mask=" + ".join(job.masks))
    if not job.images:
        result.reason = f"mask {job.masks[0]} has no image"
        return result
    if len(job.images) > 1:
        result.reason = f"image {job.id} was found {len(job.images)} times ({', '.join(job.images)}); keep only one"
        return result
    if not job.masks:
        result.reason = f"image {job.images[0]} has no mask"
        return result
    image, result.converted_from, image_notes, problem = read_own_image(job.images[0], job.max_pixels)
    target, mask_notes = np.zeros(image.shape, dtype=bool), []
    for path in job.masks if not problem else []:
        try:
            with opened_image(path, max_pixels=job.max_pixels) as mask_image:
                labels = mask_labels(mask_image)
                frames = frame_count(mask_image)
        except UnreadableImage as error:
            problem = str(error)
            break
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            problem = f"{path} cannot be decoded (truncated or not an image: {error})"
            break
        if labels.shape != image.shape:
            problem = (f"{path} is {labels.shape[1]}x{labels.shape[0]}, its image is "
                       f"{image.shape[1]}x{image.shape[0]}")
            break
        part, result.several_values = target_pixels(labels, job.mask_values)
        if part is None:
            shown = ", ".join(map(describe_label, result.several_values[:8]))
            problem = f"{path} holds several mask values ({shown}); name the target with --mask-values"
            break
        target |= part
        mask_notes += [f"{path}: first of {frames} frames used"] if frames > 1 else []
    if problem:
        result.reason = problem
        return result
    result.image, result.mask = f"images/{job.id}.png", f"masks/{job.id}.png"
    for name, pixels in ((result.image, image), (result.mask, target.astype(np.uint8) * 255)):
        path = Path(job.output, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, compress_level=3)
    notes = [f"converted from {result.converted_from}" if result.converted_from else "", image_notes,
             f"{len(job.masks)} mask files merged" if len(job.masks) > 1 else "", *mask_notes]
    result.height, result.width = image.shape
    result.mask_area = int(np.count_nonzero(target))
    result.kept, result.reason, result.feature = True, "; ".join(filter(None, notes)), thumbnail_feature(image)
    return result


def verify_test_image(job: tuple) -> dict:
    """Verify one test image and copy it into the output folder (runs in a worker process)."""
    number, locators, output, max_bytes, max_pixels = job
    name = locators[0].describe()
    data, problem = read_unique(locators, name, max_bytes)
    if not problem:
        _, problem = decode_gray8(data, name, max_pixels)
    row = {"id": str(number), "image": "", "kept": 0, "reason": problem}
    if not problem:
        row["image"], row["kept"] = f"test/{number}.tif", 1
        Path(output, row["image"]).write_bytes(data)
    return row


def parse_train_masks_csv(text: str, where: str) -> dict[str, str]:
    """train_masks.csv rows as id -> run-length text."""
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"subject", "img", "pixels"} <= set(rows.fieldnames):
        raise UserError(f"{where} should have the columns subject,img,pixels; re-download it")
    return {f"{row['subject']}_{row['img']}": row["pixels"] or "" for row in rows}


def pair_jobs(
    download: Download, rle_rows: dict[str, str] | None, output: Path, limits: tuple[int, int]
) -> tuple[list[tuple], list[PairResult]]:
    """Group the training files by id; names that do not follow <subject>_<n> become results at once."""
    images: dict[tuple[int, int], list[Locator]] = {}
    masks: dict[tuple[int, int], list[Locator]] = {}
    unnamed = []
    for name, locators in download.train.items():
        match = TRAIN_NAME.match(name)
        if not match:
            unnamed.append(PairResult(name, "", "", reason=f"{locators[0].describe()}: name is not <subject>_<n>.tif"))
            continue
        key = (int(match[1]), int(match[2]))
        (masks if match[3] else images).setdefault(key, []).extend(locators)
    jobs = []
    for key in sorted(images.keys() | masks.keys()):
        rle_text = None if rle_rows is None else rle_rows.get(f"{key[0]}_{key[1]}")
        jobs.append((key[0], key[1], images.get(key, []), masks.get(key, []), rle_text, str(output), *limits))
    return jobs, unnamed


def find_contradictions(
    results: list[PairResult], threshold: float, *, within_subjects: bool = True
) -> list[tuple[PairResult, PairResult, float]]:
    """Near-identical kept frames (Pearson r of thumbnails >= threshold) with one empty mask: among the frames of
    each subject, or among all images where the subjects are not known (within_subjects=False)."""
    groups: dict[str, list[PairResult]] = {}
    for result in results:
        if result.kept:
            groups.setdefault(result.subject if within_subjects else "", []).append(result)
    found = []
    for frames in groups.values():
        features = np.stack([frame.feature for frame in frames])
        for start in range(0, len(frames), 1024):  # blocks of rows: a few thousand images never need a full matrix
            similarity = features[start : start + 1024] @ features.T
            for i, j in zip(*np.nonzero(similarity >= threshold), strict=True):
                first, second = frames[start + i], frames[j]
                if start + i < j and (first.mask_area == 0) != (second.mask_area == 0):
                    with_mask, empty = (first, second) if first.mask_area else (second, first)
                    found.append((with_mask, empty, float(similarity[i, j])))
    return found


def apply_duplicate_policy(found: list[tuple[PairResult, PairResult, float]], policy: str) -> None:
    """Record each contradictory pair in the manifest and drop what the policy says."""
    for with_mask, empty, r in found:
        for this, other in ((with_mask, empty), (empty, with_mask)):
            this.duplicate_of = " ".join(filter(None, [this.duplicate_of, other.id]))
            this.similarity = " ".join(filter(None, [this.similarity, f"{r:.4f}"]))
        dropped = {"drop-empty": [empty], "drop-both": [with_mask, empty], "keep": []}[policy]
        for result in dropped:
            result.kept = False
            result.reason = f"contradictory near-duplicate of {result.duplicate_of} (--duplicates {policy})"


def run_job(function: Callable, job: tuple, name: str) -> Any:
    """`function(job)`, with an unforeseen failure turned into one line that names the file and what to do."""
    try:
        return function(job)
    except (UserError, OSError):  # explained where they are caught (a full disk stops the clean with a message)
        raise
    except Exception as error:
        raise UserError(
            f"verifying {name} failed unexpectedly ({type(error).__name__}: {str(error)[:200]}). Run again with "
            "--workers 1; if it fails again, the file is damaged (re-download it) or this is a bug (report this line)"
        ) from None


def run_parallel(function: Callable, jobs: list, names: list[str], workers: int, description: str, *,
                 quiet: bool) -> list:
    """Map `function` over `jobs` (each about the file in `names`) in worker processes, in order, with a bar.

    Workers are forked: they get the jobs by pickling, and open their own archives (see ArchiveCache).
    Chunks are small enough that every worker gets some of the jobs, even with a few dozen.
    """
    bar = tqdm(total=len(jobs), desc=description, unit="file", disable=quiet or None, leave=False)
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job, name in zip(jobs, names, strict=True):
            results.append(run_job(function, job, name))
            bar.update()
        _cache.close()
    else:
        chunk = max(1, min(64, len(jobs) // (4 * workers)))
        try:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for result in pool.map(functools.partial(run_job, function), jobs, names, chunksize=chunk):
                    results.append(result)
                    bar.update()
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(
                f"a worker process died while verifying the {description} (out of memory, or killed); run again "
                "with --workers 1, or with fewer workers"
            ) from None
    bar.close()
    return results


def source_fingerprint(paths: set[str], options: dict) -> str:
    """A hash of the source files' names, sizes and times and of the options: equal means nothing to redo."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(str(FORMAT_VERSION).encode())
    for path in sorted(paths):
        info = os.stat(path)
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def summarize(results: list[PairResult], tests: list[dict], found: list, options: "CleaningOptions") -> dict:
    """The figures printed at the end and stored in cleaning.json."""
    kept = [r for r in results if r.kept]
    reasons = Counter(r.reason.split(" (")[0] if "near-duplicate" in r.reason else "skipped" for r in results
                      if not r.kept)
    sizes = sorted({(r.width, r.height) for r in kept}, key=lambda size: size[0] * size[1])
    return {
        "ids_found": len(results),
        "pairs_kept": len(kept),
        "pairs_skipped": len(results) - len(kept),
        "skipped_by_reason": dict(reasons),
        "contradictory_duplicates_found": len(found),
        "duplicate_policy": options.duplicates,
        "dropped_as_duplicates": sum("near-duplicate" in r.reason for r in results if not r.kept),
        "empty_mask_fraction": round(sum(r.mask_area == 0 for r in kept) / max(len(kept), 1), 4),
        "subjects": len({r.subject for r in kept}),
        "held_out_pairs": sum(r.split == "held-out" for r in kept),
        "held_out_subjects": len({r.subject for r in kept if r.split == "held-out"}),
        "converted_to_grayscale": dict(Counter(r.converted_from for r in kept if r.converted_from)),
        "image_sizes": [f"{width}x{height}" for width, height in (sizes[:1] + sizes[1:][-1:])],
        "test_images_kept": sum(row["kept"] for row in tests),
        "test_images_skipped": sum(not row["kept"] for row in tests),
    }


@dataclass
class CleaningOptions:
    """How to clean."""

    duplicates: str = "drop-empty"
    similarity: float = 0.99
    strict: bool = False
    workers: int = 0
    quiet: bool = False
    mask_values: MaskValues = field(default_factory=MaskValues)  # own data: which mask values are the target
    hold_out: float = 0.0  # share of the subjects kept out of training, with their masks, in held-out/
    seed: int = 0  # chooses the held-out subjects
    max_image_pixels: int = MAX_IMAGE_PIXELS  # a larger image is skipped before it is decoded
    max_member_mb: int = MAX_MEMBER_MB  # a larger file (or archive member) is not read into memory

    def affecting_the_result(self) -> dict:
        """The options whose change means cleaning again."""
        return {"duplicates": self.duplicates, "similarity": self.similarity, "strict": self.strict,
                "mask_values": self.mask_values.text, "hold_out": self.hold_out, "seed": self.seed,
                "max_image_pixels": self.max_image_pixels, "max_member_mb": self.max_member_mb}

    def limits(self) -> tuple[int, int]:
        """(the most bytes a file read into memory may hold, the most pixels an image may hold)."""
        return self.max_member_mb << 20, self.max_image_pixels


def clean_download(download: Download, output: Path, options: CleaningOptions, *, overwrite: bool = False) -> dict:
    """Verify and copy a Kaggle download into `output`; return the summary (or {"unchanged": True, ...})."""
    paths = {loc.path for group in (download.train, download.test) for locs in group.values() for loc in locs}
    paths |= {loc.path for loc in (download.train_masks_csv, download.sample_submission_csv) if loc}
    fingerprint = source_fingerprint(paths, options.affecting_the_result())
    previous = check_output(output, download.origin, fingerprint, overwrite=overwrite)
    if previous:
        return previous
    rle_rows = None
    if download.train_masks_csv is not None:
        with ArchiveCache() as cache:  # closed before any worker starts: no open archive crosses a fork
            text = read_csv_text(download.train_masks_csv, cache, max_bytes=options.limits()[0])
        rle_rows = parse_train_masks_csv(text, download.train_masks_csv.describe())

    def verify(building: Path, workers: int) -> tuple[list[PairResult], list[dict]]:
        jobs, results = pair_jobs(download, rle_rows, building, options.limits())
        names = [(job[2] or job[3])[0].describe() for job in jobs]
        results += run_parallel(verify_pair, jobs, names, workers, "training pairs", quiet=options.quiet)
        test_jobs = []
        for name, locators in sorted(download.test.items(), key=lambda item: natural_key(item[0])):
            match = TEST_NAME.match(name)
            if match:
                test_jobs.append((int(match[1]), locators, str(building), *options.limits()))
            else:
                reason = f"{locators[0].describe()}: test image name is not <n>.tif"
                results.append(PairResult(name, "", "", reason=reason))
        names = [job[1][0].describe() for job in test_jobs]
        tests = run_parallel(verify_test_image, test_jobs, names, workers, "test images", quiet=options.quiet)
        if rle_rows is not None:
            found_ids = {r.id for r in results}
            for missing in sorted(rle_rows.keys() - found_ids, key=natural_key):
                results.append(PairResult(missing, *missing.split("_"),
                                          reason="listed in train_masks.csv but no image or mask file was found"))
        return results, tests

    expected = ("expected 8-bit grayscale TIFFs train/<subject>_<n>.tif with masks train/<subject>_<n>_mask.tif of "
                "the same size, values 0/255")
    return build_clean_copy(download.origin, fingerprint, output, options, verify, expected=expected,
                            about={"layout": "kaggle", "subjects_given": True})


def clean_own_data(
    own: OwnData, output: Path, options: CleaningOptions, subjects: Callable[[str], str | None] | None,
    *, overwrite: bool = False,
) -> dict:
    """Verify a user's own pairs and write them into `output` as grayscale PNGs with 0/255 masks.

    `subjects` gives each id its subject (None: each image is its own subject, and near-duplicates are then
    looked for among all images). Returns the summary (or {"unchanged": True, ...}).
    """
    paths = {str(path) for pair in own.pairs for path in pair.images + pair.masks}
    fingerprint = source_fingerprint(paths, {**options.affecting_the_result(), "layout": own.layout,
                                             "subjects": subjects is not None})
    previous = check_output(output, own.origin, fingerprint, overwrite=overwrite)
    if previous:
        return previous

    def verify(building: Path, workers: int) -> tuple[list[PairResult], list[dict]]:
        jobs, results = [], []
        for pair in own.pairs:
            subject = pair.id if subjects is None else subjects(pair.id)
            if subject is None:
                results.append(PairResult(pair.id, "", "", reason=f"{pair.id}: no subject found for it by --subjects"))
                continue
            jobs.append(OwnPairJob(pair.id, subject, list(map(str, pair.images)), list(map(str, pair.masks)),
                                   options.mask_values, str(building), options.max_image_pixels))
        names = [(job.images or job.masks)[0] for job in jobs]
        return results + run_parallel(verify_own_pair, jobs, names, workers, "pairs", quiet=options.quiet), []

    expected = "expected pairs of images and masks of the same size (PNG, JPEG, TIFF or BMP)"
    suggestion = "" if subjects is not None else suggest_subject_pattern([pair.id for pair in own.pairs])
    about = {"layout": own.layout, "subjects_given": subjects is not None, "suggested_subject_pattern": suggestion}
    return build_clean_copy(own.origin, fingerprint, output, options, verify, expected=expected,
                            within_subjects=subjects is not None, about=about)


def check_output(output: Path, origin: str, fingerprint: str, *, overwrite: bool) -> dict:
    """{} when `output` may be (re)built; the earlier summary when it already holds this very clean. A clean of
    the same source by an older version of this code is rebuilt without asking."""
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} is a file, not a folder; choose another --output")
    if output.exists() and any(output.iterdir()):
        previous = read_previous_record(output / "cleaning.json")
        if previous.get("fingerprint") == fingerprint:
            return {**previous["summary"], "unchanged": True}
        upgrade = previous.get("source") == origin and previous.get("format_version") != FORMAT_VERSION
        if not overwrite and not upgrade:
            what = f"a clean of {previous['source']}" if previous else "files that data_cleaning.py did not write"
            raise UserError(
                f"{output} already holds {what}, made from other files or options. Pass --overwrite true "
                "to replace it, or --output OTHER_FOLDER to keep both."
            )
    return {}


def several_values_message(results: list[PairResult], origin: str) -> str:
    """Why masks with several values stop the clean, with the values found and how to name the target."""
    counts = Counter(value for r in results for value in r.several_values)
    listing = ", ".join(f"{describe_label(value)} (in {count} masks)" for value, count in counts.most_common(12))
    lossy = len(counts) > 12 or any(r.original_mask.lower().endswith((".jpg", ".jpeg")) for r in results)
    hint = "; lossy JPEG masks hold many values near 0 and 255: --mask-values 128-255" if lossy else ""
    return (f"{len(results)} masks in {origin} hold more than one non-zero value (first: {results[0].original_mask}). "
            f"Values found: {listing}{', ...' if len(counts) > 12 else ''}. Name the target with --mask-values: "
            f"{MASK_VALUES_FORMS}{hint}")


def hold_out_subjects(results: list[PairResult], building: Path, share: float, seed: int) -> None:
    """Move the kept pairs of a `share` of the subjects (balanced for empty masks) into held-out/."""
    kept = [{"subject": r.subject, "empty": r.mask_area == 0, "result": r} for r in results if r.kept]
    _, held_out = split_by_subject(kept, share, seed, option="--hold-out")
    for result in (item["result"] for item in held_out):
        for name in ("image", "mask"):
            source = building / getattr(result, name)
            target = building / "held-out" / getattr(result, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            setattr(result, name, target.relative_to(building).as_posix())
        result.split = "held-out"


def build_clean_copy(
    origin: str, fingerprint: str, output: Path, options: CleaningOptions,
    verify: Callable[[Path, int], tuple[list[PairResult], list[dict]]], *, expected: str, about: dict,
    within_subjects: bool = True,
) -> dict:
    """Build the clean copy aside: `verify` writes the pairs; then near-duplicates, the held-out subjects, the
    manifest and the summary (with `about`: how the source was read); then swap it in. A problem leaves
    `output` as it was. `expected` says what a usable pair is, for when none is found."""
    try:
        building = building_folder(output)
    except OSError as error:
        raise UserError(
            f"cannot write into {output.parent}: {error.strerror}; choose --output in a writable folder"
        ) from None
    try:
        for folder in ("images", "masks", "test"):
            (building / folder).mkdir()
        results, tests = verify(building, options.workers or os.cpu_count() or 1)
        several = [r for r in results if r.several_values]
        if several:
            raise UserError(several_values_message(several, origin))
        found = find_contradictions(results, options.similarity, within_subjects=within_subjects)
        apply_duplicate_policy(found, options.duplicates)
        results.sort(key=lambda r: (natural_key(r.subject), natural_key(r.id)))
        problems = [r for r in results if not r.kept and "near-duplicate" not in r.reason]
        problems += [PairResult(row["id"], "", "", reason=row["reason"]) for row in tests if not row["kept"]]
        if options.strict and problems:
            listing = "\n  ".join(p.reason for p in problems[:20])
            raise UserError(f"--strict: {len(problems)} problem(s) in {origin}:\n  {listing}")
        if not any(r.kept for r in results):
            raise UserError(f"no usable training pair in {origin}: {expected}. First problems:\n  "
                            + "\n  ".join(r.reason for r in results[:5]))
        for result in results:
            result.split = "train" if result.kept else ""
        if options.hold_out:
            hold_out_subjects(results, building, options.hold_out, options.seed)
        summary = {**about, **summarize(results, tests, found, options)}
        write_csv(building / "manifest.csv", [r.row() for r in results], MANIFEST_COLUMNS)
        write_csv(building / "test.csv", tests, TEST_COLUMNS)
        write_json(building / "cleaning.json", {"source": origin, "fingerprint": fingerprint,
                                                "format_version": FORMAT_VERSION, "summary": summary,
                                                "problems": [p.reason for p in problems]})
        swap_into_place(building, output)
    except OSError as error:  # a full disk, a file that vanished: the partial copy goes, the output stays as it was
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(
            f"cleaning stopped: {error.strerror}{where}; {output} was left as it was. Free some space or choose "
            "another --output, then run again"
        ) from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return {**summary, "problems": [p.reason for p in problems]}


def read_previous_record(path: Path) -> dict:
    """The cleaning.json of an earlier clean, or {} when there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
