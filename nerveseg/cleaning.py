"""Stage 1: verify a Kaggle download (nerveseg/kaggle_checks.py), or a user's own image/mask folders
(nerveseg/own_data_checks.py), in worker processes (nerveseg/parallel.py), and write a clean copy with a
manifest (nerveseg/clean_copy.py)."""

from collections.abc import Callable
from pathlib import Path

from nerveseg.clean_copy import CleaningOptions, build_clean_copy, check_output, source_fingerprint
from nerveseg.kaggle_checks import TEST_NAME, pair_jobs, parse_train_masks_csv, verify_pair, verify_test_image
from nerveseg.layouts import OwnData, natural_key, suggest_subject_pattern
from nerveseg.own_data_checks import OwnPairJob, verify_own_pair
from nerveseg.pairs import PairResult
from nerveseg.parallel import run_parallel
from nerveseg.sources import ArchiveCache, Download, read_csv_text


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
            text = read_csv_text(download.train_masks_csv, cache)
        rle_rows = parse_train_masks_csv(text, download.train_masks_csv.describe())

    def verify(building: Path, workers: int) -> tuple[list[PairResult], list[dict]]:
        jobs, results = pair_jobs(download, rle_rows, building)
        names = [(job[2] or job[3])[0].describe() for job in jobs]
        results += run_parallel(verify_pair, jobs, names, workers, "training pairs", quiet=options.quiet)
        test_jobs = []
        for name, locators in sorted(download.test.items(), key=lambda item: natural_key(item[0])):
            match = TEST_NAME.match(name)
            if match:
                test_jobs.append((int(match[1]), locators, str(building)))
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
                                   options.mask_values, str(building)))
        names = [(job.images or job.masks)[0] for job in jobs]
        return results + run_parallel(verify_own_pair, jobs, names, workers, "pairs", quiet=options.quiet), []

    expected = "expected pairs of images and masks of the same size (PNG, JPEG, TIFF or BMP)"
    suggestion = "" if subjects is not None else suggest_subject_pattern([pair.id for pair in own.pairs])
    about = {"layout": own.layout, "subjects_given": subjects is not None, "suggested_subject_pattern": suggestion}
    return build_clean_copy(own.origin, fingerprint, output, options, verify, expected=expected,
                            within_subjects=subjects is not None, about=about)
