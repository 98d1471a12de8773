"""Stage 1: turn the Kaggle "Ultrasound Nerve Segmentation" download, or your own images and masks, into a
clean, verified copy.

    python data_cleaning.py                 # the download is in data/ (zip, inner zips or folders)
    python data_cleaning.py --source PATH   # it is elsewhere
    python data_cleaning.py --demo          # make a small synthetic download and clean that
    python data_cleaning.py --source my_scans --subjects '^(?P<subject>[^_]+)_' --hold-out 0.2
                                            # your own data: images/ + masks/, or <name>.png + <name>_mask.png

The originals are only read. The clean copy (images/, masks/, test/, manifest.csv) is built aside and
swapped in when complete; nerveseg/cleaning/ holds the stage: kaggle_checks.py and own_data_checks.py say what
is checked, layouts.py the layouts of own data.
"""

# %% Imports
import sys
from pathlib import Path

from nerveseg.cleaning import synthetic
from nerveseg.cleaning.clean_copy import CleaningOptions
from nerveseg.cleaning.duplicates import DUPLICATE_POLICIES
from nerveseg.cleaning.layouts import LAYOUTS, detect_layout, find_own_data, subject_lookup
from nerveseg.cleaning.pipeline import clean_download, clean_own_data
from nerveseg.cleaning.sources import find_download, scratch_folder
from nerveseg.errors import UserError, exit_on_user_error
from nerveseg.images import parse_mask_values
from nerveseg.settings import Bounds, OneOf, parse_settings

# %% Settings
# -----------------------------------------------------------------------------
# Input and output
SOURCE = "data"  # the Kaggle download (a folder with the zip, inner zips or train/ and test/; or the zip) or your own
OUTPUT = "data/clean"  # where the clean copy goes (built aside and swapped in when complete)
OVERWRITE = False  # replace an OUTPUT that holds a clean of other files or options
# Your own data, subjects, and a held-out test set (Kaggle too)
LAYOUT: OneOf(LAYOUTS) = "auto"  # images-masks: images/ and masks/ folders; suffix: <name>.png beside <name>_mask.png
MASK_SUFFIX = "_mask"  # how a mask's name ends (extra masks <name>_mask_1.png are merged into one)
MASK_VALUES = ""  # target values where masks hold several: any, 1,2 or 128-255 or #ff0000 ("": one value per mask)
SUBJECTS = ""  # each image's subject: a CSV (name, subject) or a pattern with (?P<subject>...) ("": each image its own)
HOLD_OUT: Bounds(at_least=0, below=1) = 0.0  # share of the subjects kept out of training, in OUTPUT/held-out/
SEED: Bounds(at_least=0, below=2**31) = 0  # chooses the held-out subjects
# Checks
DUPLICATES: OneOf(DUPLICATE_POLICIES) = "drop-empty"  # contradictory near-duplicates: drop-empty, drop-both or keep
SIMILARITY: Bounds(above=0, at_most=1) = 0.99  # Pearson r of 64x48 thumbnails from which two frames are twins
STRICT = False  # any problem is fatal, instead of skipping the bad file and reporting it
MAX_IMAGE_PIXELS: Bounds(at_least=1) = 25_000_000  # an image of more pixels (width x height) is skipped before decoding
MAX_MEMBER_MB: Bounds(at_least=1) = 64  # a file or archive member larger than this (MiB) is not read into memory
# Demo and system
DEMO = False  # generate a small synthetic download in data/synthetic-download and clean that
WORKERS: Bounds(at_least=0) = 0  # worker processes (0: one per CPU core)
QUIET = False  # no progress bars
# -----------------------------------------------------------------------------
exit_on_user_error("data_cleaning.py")
globals().update(parse_settings(globals()))
if not MASK_SUFFIX:
    raise UserError("--mask-suffix cannot be empty: it tells a mask's name from its image's (<name>_mask.png)")
mask_values = parse_mask_values(MASK_VALUES)

# %% Demo data: a synthetic download in the exact Kaggle layout
if DEMO:
    SOURCE = "data/synthetic-download"
    if not Path(SOURCE, "train").exists():
        print(f"writing a synthetic Kaggle download to {SOURCE} ...")
        synthetic.write_kaggle_download(Path(SOURCE), synthetic.DEMO, WORKERS, progress=not QUIET, test_masks=True)

# %% Find the files, verify them and write the clean copy
options = CleaningOptions(duplicates=DUPLICATES, similarity=SIMILARITY, strict=STRICT, workers=WORKERS, quiet=QUIET,
                          mask_values=mask_values, hold_out=HOLD_OUT, seed=SEED, max_image_pixels=MAX_IMAGE_PIXELS,
                          max_member_mb=MAX_MEMBER_MB)
layout = detect_layout(Path(SOURCE), MASK_SUFFIX) if LAYOUT == "auto" else LAYOUT
if layout == "kaggle":
    if SUBJECTS or MASK_VALUES:
        raise UserError("--subjects and --mask-values are for your own data: Kaggle names carry the subject "
                        "(<subject>_<n>.tif) and its masks are 0/255")
    with scratch_folder() as scratch:
        download = find_download(Path(SOURCE), Path(scratch))
        summary = clean_download(download, Path(OUTPUT), options, overwrite=OVERWRITE)
else:
    own_data = find_own_data(Path(SOURCE), layout, MASK_SUFFIX)
    summary = clean_own_data(own_data, Path(OUTPUT), options, subject_lookup(SUBJECTS), overwrite=OVERWRITE)

# %% Summary
if summary.get("unchanged"):
    print(f"{OUTPUT} is already a clean copy of {SOURCE} with these options: nothing to do.")
for problem in summary.get("problems", [])[:20]:
    print(f"skipped: {problem}", file=sys.stderr)
found = "training ids" if summary["layout"] == "kaggle" else f"images (layout {summary['layout']})"
print(
    f"{summary['ids_found']} {found} found in {SOURCE}: {summary['pairs_kept']} pairs kept from "
    f"{summary['subjects']} subjects, {summary['pairs_skipped']} skipped "
    f"({summary['dropped_as_duplicates']} as contradictory near-duplicates: "
    f"{summary['contradictory_duplicates_found']} pairs found, policy {summary['duplicate_policy']}).\n"
    f"Empty masks among the kept pairs: {summary['empty_mask_fraction']:.1%}. "
    f"Test images: {summary['test_images_kept']} kept, {summary['test_images_skipped']} skipped."
)
if summary["converted_to_grayscale"]:
    modes = ", ".join(f"{count} {mode}" for mode, count in summary["converted_to_grayscale"].items())
    print(f"Converted to 8-bit grayscale: {modes} (colour by luminance; more than 8 bits stretched from each "
          "image's lowest to its highest value).")
if len(summary["image_sizes"]) > 1:
    print(f"Image sizes from {summary['image_sizes'][0]} to {summary['image_sizes'][1]} (train.py resizes each).")
if summary["held_out_pairs"]:
    print(f"Held out: {summary['held_out_pairs']} pairs of {summary['held_out_subjects']} subjects in "
          f"{OUTPUT}/held-out/ (never trained on; python predict.py --input {OUTPUT}/held-out/images "
          f"--masks {OUTPUT}/held-out/masks).")
if not summary["subjects_given"]:
    hint = summary["suggested_subject_pattern"]
    print("warning: no --subjects given, so each image is its own subject, and frames of one patient may fall on "
          "both sides of the split (a too optimistic validation). "
          + (f"The names look like <subject>_<n>: --subjects '{hint}'." if hint else
             "Give a CSV of names and subjects, or a pattern with (?P<subject>...)."), file=sys.stderr)
print(f"Clean copy: {OUTPUT} (manifest.csv lists every file and what happened to it).")
