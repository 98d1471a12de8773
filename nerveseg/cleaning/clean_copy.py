"""Stage 1's clean copy: built aside from the verified pairs, with the near-duplicates, the held-out subjects,
the manifest and the summary, and swapped in when complete.

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

import contextlib
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nerveseg.cleaning.duplicates import apply_duplicate_policy, find_contradictions
from nerveseg.cleaning.pairs import MANIFEST_COLUMNS, PairResult, PairStatus
from nerveseg.cleaning.sources import MAX_MEMBER_MB
from nerveseg.data import split_by_subject
from nerveseg.errors import UserError
from nerveseg.files import (
    FolderLock,
    building_folder,
    check_replaceable,
    discard_building,
    swap_into_place,
    write_csv,
    write_json,
)
from nerveseg.images import MASK_VALUES_FORMS, MAX_IMAGE_PIXELS, MaskValues, describe_label
from nerveseg.inputs import natural_key

TEST_COLUMNS = ["id", "image", "kept", "reason"]
FORMAT_VERSION = 3  # 2: subjects are names, own-data layouts, the split and original files in the manifest; 3: EXIF
# orientation applied, inputs bounded in size


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

    def limits(self) -> dict[str, int]:
        """The bounds of what a job reads, as PairJob's keywords: max_bytes (of one file or archive member read into
        memory) and max_pixels (of one image)."""
        return {"max_bytes": self.max_member_mb << 20, "max_pixels": self.max_image_pixels}


@dataclass
class Source:
    """What the clean copy records of the source it is made from."""

    origin: str  # the source as the user named it
    fingerprint: str  # of its files and of the options (source_fingerprint): equal means nothing to redo
    expected: str  # what a usable pair is, said when none is found
    about: dict  # how the source was read (its layout, whether subjects were given), stored with the summary
    within_subjects: bool = True  # near-duplicates among the frames of each subject (False: among all images)


def source_fingerprint(paths: set[str], options: dict) -> str:
    """A hash of the source files' names, sizes and times and of the options: equal means nothing to redo."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(str(FORMAT_VERSION).encode())
    for path in sorted(paths):
        info = os.stat(path)
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_output(output: Path, source: Source, *, overwrite: bool, reads: set[str]) -> dict:
    """{} when `output` may be (re)built; the earlier summary when it already holds this very clean. A clean of
    the same source by an older version of this code is rebuilt without asking. Only a clean copy (its own
    cleaning.json) is ever replaced, and never a folder that is or holds the source or the files read."""
    check_replaceable(output, marker="cleaning.json", reads=[source.origin, *reads], script="data_cleaning.py")
    if output.exists() and any(output.iterdir()):
        previous = read_previous_record(output / "cleaning.json")
        if "fingerprint" not in previous:
            raise UserError(f"{output / 'cleaning.json'} was not written by data_cleaning.py, so {output} is not a "
                            "clean copy and is never replaced; choose another --output (a new or empty folder)")
        if previous.get("fingerprint") == source.fingerprint:
            return {**previous["summary"], "unchanged": True}
        upgrade = previous.get("source") == source.origin and previous.get("format_version") != FORMAT_VERSION
        if not overwrite and not upgrade:
            raise UserError(
                f"{output} already holds a clean of {previous['source']}, made from other files or options. Pass "
                "--overwrite true to replace it, or --output OTHER_FOLDER to keep both."
            )
    return {}


@contextlib.contextmanager
def clean_copy_aside(output: Path) -> Iterator[Path]:
    """A new folder beside `output` (with images/, masks/ and test/) to build the clean copy in, swapped into
    place when the block completes. A problem in the block, or a full disk, leaves `output` as it was."""
    try:
        lock = FolderLock(output, script="data_cleaning.py")  # one run at a time writes it
        building = building_folder(output)
    except OSError as error:
        raise UserError(
            f"cannot write into {output.parent}: {error.strerror}; choose --output in a writable folder"
        ) from None
    try:
        for folder in ("images", "masks", "test"):
            (building / folder).mkdir()
        yield building
        swap_into_place(building, output)
    except OSError as error:  # a full disk, a file that vanished: the partial copy goes, the output stays as it was
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(
            f"cleaning stopped: {error.strerror}{where}; {output} was left as it was. Free some space or choose "
            "another --output, then run again"
        ) from None
    finally:
        discard_building(building)  # nothing left to discard once swapped in
        lock.release()


def finish_clean_copy(
    building: Path, source: Source, results: list[PairResult], tests: list[dict], options: CleaningOptions
) -> dict:
    """Complete the clean copy in `building` from the verified pairs and test images: the near-duplicates, the
    held-out subjects, the manifest and the summary (returned, with the problems)."""
    several = [r for r in results if r.several_values]
    if several:
        raise UserError(several_values_message(several, source.origin))
    found = find_contradictions(results, options.similarity, within_subjects=source.within_subjects)
    apply_duplicate_policy(found, options.duplicates)
    results.sort(key=lambda r: (natural_key(r.subject), natural_key(r.id)))
    problems = [r.reason for r in results if r.status is PairStatus.SKIPPED]
    problems += [row["reason"] for row in tests if not row["kept"]]
    if options.strict and problems:
        listing = "\n  ".join(problems[:20])
        raise UserError(f"--strict: {len(problems)} problem(s) in {source.origin}:\n  {listing}")
    if not any(r.kept for r in results):
        raise UserError(f"no usable training pair in {source.origin}: {source.expected}. First problems:\n  "
                        + "\n  ".join(r.reason for r in results[:5]))
    for result in results:
        result.split = "train" if result.kept else ""
    if options.hold_out:
        hold_out_subjects(results, building, options.hold_out, options.seed)
    summary = {**source.about, **summarize(results, tests, found, options)}
    write_csv(building / "manifest.csv", [r.row() for r in results], MANIFEST_COLUMNS)
    write_csv(building / "test.csv", tests, TEST_COLUMNS)
    write_json(building / "cleaning.json", {"source": source.origin, "fingerprint": source.fingerprint,
                                            "format_version": FORMAT_VERSION, "summary": summary,
                                            "problems": problems})
    return {**summary, "problems": problems}


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


def summarize(results: list[PairResult], tests: list[dict], found: list, options: CleaningOptions) -> dict:
    """The figures printed at the end and stored in cleaning.json."""
    kept = [r for r in results if r.kept]
    reasons = Counter(r.reason.split(" (")[0] if r.status is PairStatus.DUPLICATE else "skipped" for r in results
                      if not r.kept)
    sizes = sorted({(r.width, r.height) for r in kept}, key=lambda size: size[0] * size[1])
    return {
        "ids_found": len(results),
        "pairs_kept": len(kept),
        "pairs_skipped": len(results) - len(kept),
        "skipped_by_reason": dict(reasons),
        "contradictory_duplicates_found": len(found),
        "duplicate_policy": options.duplicates,
        "dropped_as_duplicates": sum(r.status is PairStatus.DUPLICATE for r in results),
        "empty_mask_fraction": round(sum(r.mask_area == 0 for r in kept) / max(len(kept), 1), 4),
        "subjects": len({r.subject for r in kept}),
        "held_out_pairs": sum(r.split == "held-out" for r in kept),
        "held_out_subjects": len({r.subject for r in kept if r.split == "held-out"}),
        "converted_to_grayscale": dict(Counter(r.converted_from for r in kept if r.converted_from)),
        "image_sizes": [f"{width}x{height}" for width, height in (sizes[:1] + sizes[1:][-1:])],
        "test_images_kept": sum(row["kept"] for row in tests),
        "test_images_skipped": sum(not row["kept"] for row in tests),
    }


def read_previous_record(path: Path) -> dict:
    """The cleaning.json of an earlier clean, or {} when there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
