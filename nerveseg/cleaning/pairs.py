"""One id through stage 1: the job a worker gets, what became of the id, and the result with its manifest row."""

import enum
from dataclasses import dataclass, field

import numpy as np

from nerveseg.cleaning.sources import MAX_MEMBER_MB, Locator
from nerveseg.images import MAX_IMAGE_PIXELS, MaskValues

MANIFEST_COLUMNS = ["id", "subject", "frame", "image", "mask", "height", "width", "mask_area", "kept", "reason",
                    "duplicate_of", "similarity", "split", "original_image", "original_mask"]


@dataclass
class PairJob:
    """What a worker needs to verify one id and write it into the clean copy (a test image: a job without masks)."""

    id: str
    subject: str
    frame: str
    images: list[Locator]
    masks: list[Locator]
    output: str  # the folder the clean copy is built in
    train_masks_row: str | None = None  # Kaggle: the id's run-length text in train_masks.csv (None: not listed)
    mask_values: MaskValues = field(default_factory=MaskValues)  # own data: which mask values are the target
    max_bytes: int = MAX_MEMBER_MB << 20  # a larger file (or archive member) is not read into memory
    max_pixels: int = MAX_IMAGE_PIXELS  # a larger image is skipped before it is decoded

    @property
    def name(self) -> str:
        """The file a message about this job names: the image, or the mask where there is no image."""
        return (self.images or self.masks)[0].describe()


class PairStatus(enum.Enum):
    """What became of one id. The manifest says why in words (PairResult.reason); the counts use this."""

    KEPT = "kept"
    SKIPPED = "skipped"  # its files are unusable: the reason names the file and the problem
    DUPLICATE = "near-duplicate"  # dropped as a contradictory near-duplicate by the --duplicates policy


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
    status: PairStatus = PairStatus.SKIPPED
    reason: str = ""  # why it is not kept, or what was repaired or converted where it is
    duplicate_of: str = ""
    similarity: str = ""
    split: str = ""
    original_image: str = ""
    original_mask: str = ""
    converted_from: str = ""  # the image's mode where it was not 8-bit grayscale
    several_values: list[int] = field(default_factory=list)  # a mask's labels, where the target must be named
    feature: np.ndarray | None = field(default=None, repr=False)

    @property
    def kept(self) -> bool:
        """Whether the pair is in the clean copy."""
        return self.status is PairStatus.KEPT

    def row(self) -> dict:
        """The manifest row."""
        return {name: getattr(self, name) if name != "kept" else int(self.kept) for name in MANIFEST_COLUMNS}
