"""Stage 1: turn the Kaggle "Ultrasound Nerve Segmentation" download into a clean, verified copy.

    python data_cleaning.py                 # the download is in data/ (zip, inner zips or folders)
    python data_cleaning.py --source PATH   # it is elsewhere
    python data_cleaning.py --demo          # make a small synthetic download and clean that

The originals are only read. The clean copy (images/, masks/, test/, manifest.csv) is built aside and
swapped in when complete; see nerveseg/cleaning.py for what is checked.
"""

# %% Imports
import sys
from pathlib import Path

from nerveseg import synthetic
from nerveseg.cleaning import DUPLICATE_POLICIES, CleaningOptions, clean_download
from nerveseg.errors import UserError, exit_on_user_error
from nerveseg.settings import parse_settings
from nerveseg.sources import find_download, scratch_folder

# %% Settings
# -----------------------------------------------------------------------------
# Input and output
SOURCE = "data"  # the Kaggle download: a folder (with the zip, inner zips or train/ and test/) or the zip
OUTPUT = "data/clean"  # where the clean copy goes (built aside and swapped in when complete)
OVERWRITE = False  # replace an OUTPUT that holds a clean of other files or options
# Checks
DUPLICATES = "drop-empty"  # contradictory near-duplicates: drop-empty, drop-both or keep
SIMILARITY = 0.99  # Pearson r of 64x48 thumbnails at or above which two frames of a subject are twins
STRICT = False  # any problem is fatal, instead of skipping the bad file and reporting it
# Demo and system
DEMO = False  # generate a small synthetic download in data/synthetic-download and clean that
WORKERS = 0  # worker processes (0: one per CPU core)
QUIET = False  # no progress bars
# -----------------------------------------------------------------------------
exit_on_user_error("data_cleaning.py")
globals().update(parse_settings(globals()))
if DUPLICATES not in DUPLICATE_POLICIES:
    raise UserError(f"--duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, not {DUPLICATES!r}")
if not 0 < SIMILARITY <= 1:
    raise UserError(f"--similarity is a correlation between 0 and 1, not {SIMILARITY}")

# %% Demo data: a synthetic download in the exact Kaggle layout
if DEMO:
    SOURCE = "data/synthetic-download"
    if not Path(SOURCE, "train").exists():
        print(f"writing a synthetic Kaggle download to {SOURCE} ...")
        synthetic.write_kaggle_download(Path(SOURCE), synthetic.DEMO, WORKERS, progress=not QUIET, test_masks=True)

# %% Find the files, verify them and write the clean copy
with scratch_folder() as scratch:
    download = find_download(Path(SOURCE), Path(scratch))
    options = CleaningOptions(DUPLICATES, SIMILARITY, STRICT, WORKERS, QUIET)
    summary = clean_download(download, Path(OUTPUT), options, OVERWRITE)

# %% Summary
if summary.get("unchanged"):
    print(f"{OUTPUT} is already a clean copy of {SOURCE} with these options: nothing to do.")
for problem in summary.get("problems", [])[:20]:
    print(f"skipped: {problem}", file=sys.stderr)
print(
    f"{summary['ids_found']} training ids found in {SOURCE}: {summary['pairs_kept']} pairs kept from "
    f"{summary['subjects']} subjects, {summary['pairs_skipped']} skipped "
    f"({summary['dropped_as_duplicates']} as contradictory near-duplicates: "
    f"{summary['contradictory_duplicates_found']} pairs found, policy {summary['duplicate_policy']}).\n"
    f"Empty masks among the kept pairs: {summary['empty_mask_fraction']:.1%}. "
    f"Test images: {summary['test_images_kept']} kept, {summary['test_images_skipped']} skipped.\n"
    f"Clean copy: {OUTPUT} (manifest.csv lists every file and what happened to it)."
)
