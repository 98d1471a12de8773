"""One record per input file of predict.py, and what is said of them all at the end.

An `ImageResult` is everything predict.py knows of one file: predicted (its mask's presence, area, run-length
code, uncertainty, the Dice where a truth was given, the report's pictures) or skipped (and why). images.csv,
submission.csv, the report and the summary at the end all read these records; `Summary` gathers what the end
needs one record at a time (the Dice tally, the counts, the uncertainty check), so it is computed once.
"""

from array import array
from dataclasses import asdict, dataclass, field

import torch

from nerveseg.inference.uncertainty import WRONG_BELOW, uncertainty_check
from nerveseg.metrics import DiceTally

IMAGE_COLUMNS = ["img", "file", "time_s", "presence", "mask_area", "mask_area_mm2", "dice", "uncertainty",
                 "skipped_because", "note"]
LISTED = 20  # the skipped and noted files named in the summary


@dataclass
class ImageResult:
    """One input file (or a frame of a DICOM file or video): predicted, or skipped (`skipped_because` says why).
    `dice` and `truth_empty` where a truth was given; `seconds` a video frame's time, `area_mm2` the mask's area
    where the size of a pixel is known; `thumb`, `width`, `height` and `full` are the report's pictures (paths below
    the output folder)."""

    id: str
    file: str
    skipped_because: str = ""
    presence: float | None = None
    area: int = 0
    pixels: str = ""  # the mask, run-length encoded (Kaggle's submission format)
    uncertainty: float | None = None
    dice: float | None = None
    truth_empty: bool | None = None
    note: str = ""
    seconds: float | None = None
    area_mm2: float | None = None
    thumb: str = ""
    width: int = 0
    height: int = 0
    full: str = ""

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_because)

    def csv_row(self) -> dict:
        """The file's row of images.csv (figures to 4 decimals; a skipped file has only its reason)."""
        if self.skipped:
            return {"img": self.id, "file": self.file, "skipped_because": self.skipped_because}
        row = {"img": self.id, "file": self.file, "presence": f"{self.presence:.4f}", "mask_area": self.area,
               "uncertainty": f"{self.uncertainty:.4f}", "note": self.note,
               "time_s": "" if self.seconds is None else f"{self.seconds:.3f}",
               "mask_area_mm2": "" if self.area_mm2 is None else f"{self.area_mm2:.2f}"}
        if self.dice is not None:
            row["dice"] = f"{self.dice:.4f}"
        return row

    def kind(self) -> str:
        """What kind of case it is: skipped; without a truth, empty or mask; with one, true empty, false empty, hit,
        miss or stray mask (a mask on an empty truth)."""
        if self.skipped:
            return "skipped"
        if self.truth_empty is None:
            return "empty" if self.area == 0 else "mask"
        if self.truth_empty:
            return "true empty" if self.area == 0 else "stray mask"
        if self.area == 0:
            return "false empty"
        return "hit" if self.dice is not None and self.dice >= WRONG_BELOW else "miss"

    def as_dict(self) -> dict:
        return asdict(self)


KINDS = ("hit", "miss", "true empty", "false empty", "stray mask", "empty", "mask", "skipped")


@dataclass
class Summary:
    """What the end of predict.py says of all its files, gathered one record at a time (in the records' order)."""

    tally: DiceTally = field(default_factory=DiceTally)
    predicted: int = 0
    empty_masks: int = 0
    skipped: list[ImageResult] = field(default_factory=list)  # the first LISTED
    skipped_count: int = 0
    noted: list[ImageResult] = field(default_factory=list)  # the first LISTED
    noted_count: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    uncertainties: array = field(default_factory=lambda: array("d"))  # to 4 decimals, of the images with truths
    dices: array = field(default_factory=lambda: array("d"))  # to 4 decimals

    def add(self, result: ImageResult) -> None:
        self.kinds[result.kind()] += 1
        if result.skipped:
            self.skipped_count += 1
            if len(self.skipped) < LISTED:
                self.skipped.append(result)
            return
        self.predicted += 1
        self.empty_masks += result.area == 0
        if result.note:
            self.noted_count += 1
            if len(self.noted) < LISTED:
                self.noted.append(result)
        if result.dice is not None:
            self.tally.add(torch.tensor([result.dice]), torch.tensor([result.truth_empty]),
                           torch.tensor([result.area == 0]))
            self.uncertainties.append(round(result.uncertainty, 4))
            self.dices.append(round(result.dice, 4))

    def scores(self) -> dict | None:
        """The Kaggle Dice figures (DiceTally.summary) with the all-empty baseline; None without truths."""
        scores = self.tally.summary()
        if not scores["images"]:
            return None
        scores["all_empty_baseline"] = self.tally.count_empty / scores["images"]
        return scores

    def uncertainty_check(self) -> dict | None:
        """uncertainty.uncertainty_check on the images with truths (None for fewer than 10)."""
        return uncertainty_check(list(self.uncertainties), list(self.dices))
