"""Stage 1: verify a Kaggle download, or a user's own image/mask folders, and write a clean copy with a manifest.

Each source is cleaned the same way: a fingerprint of its files and the options says whether the output
already holds this clean; the pairs are verified in worker processes (parallel.py) by the checks of the source
(kaggle_checks.py, own_data_checks.py) and written into a folder beside the output; the near-duplicates
(duplicates.py), the held-out subjects and the manifest complete it, and it is swapped in (clean_copy.py, which
also describes the clean folder).
"""

from collections.abc import Callable
from pathlib import Path

from nerveseg.cleaning import kaggle_checks, own_data_checks
from nerveseg.cleaning.clean_copy import (
    CleaningOptions,
    Source,
    check_output,
    clean_copy_aside,
    finish_clean_copy,
    source_fingerprint,
)
from nerveseg.cleaning.layouts import OwnData, suggest_subject_pattern
from nerveseg.cleaning.sources import Download
from nerveseg.frames import split_frame


def clean_download(download: Download, output: Path, options: CleaningOptions, *, overwrite: bool = False) -> dict:
    """Verify and copy a Kaggle download into `output`; return the summary (or {"unchanged": True, ...})."""
    paths = {loc.path for group in (download.train, download.test) for locs in group.values() for loc in locs}
    paths |= {loc.path for loc in (download.train_masks_csv, download.sample_submission_csv) if loc}
    source = Source(download.origin, source_fingerprint(paths, options.affecting_the_result()),
                    kaggle_checks.EXPECTED, about={"layout": "kaggle", "subjects_given": True})
    previous = check_output(output, source, overwrite=overwrite, reads=paths)
    if previous:
        return previous
    rle_rows = kaggle_checks.read_train_masks_csv(download, options)
    with clean_copy_aside(output) as building:
        results, tests = kaggle_checks.verify_download(download, rle_rows, building, options)
        return finish_clean_copy(building, source, results, tests, options)


def clean_own_data(
    own: OwnData, output: Path, options: CleaningOptions, subjects: Callable[[str], str | None] | None,
    *, overwrite: bool = False,
) -> dict:
    """Verify a user's own pairs and write them into `output` as grayscale PNGs with 0/255 masks.

    `subjects` gives each id its subject (None: each image is its own subject, and near-duplicates are then
    looked for among all images). Returns the summary (or {"unchanged": True, ...}).
    """
    paths = {split_frame(str(path))[0] for pair in own.pairs for path in pair.images + pair.masks}  # frames: files
    fingerprint = source_fingerprint(paths, {**options.affecting_the_result(), "layout": own.layout,
                                             "subjects": subjects is not None})
    suggestion = "" if subjects is not None else suggest_subject_pattern([pair.id for pair in own.pairs])
    about = {"layout": own.layout, "subjects_given": subjects is not None, "suggested_subject_pattern": suggestion}
    source = Source(own.origin, fingerprint, own_data_checks.EXPECTED, about, within_subjects=subjects is not None)
    previous = check_output(output, source, overwrite=overwrite, reads=paths)
    if previous:
        return previous
    with clean_copy_aside(output) as building:
        results = own_data_checks.verify_own_data(own, subjects, building, options)
        return finish_clean_copy(building, source, results, [], options)
