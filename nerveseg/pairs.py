"""What verifying one id of stage 1 found: the result a worker gives back, and its row of the manifest."""

from dataclasses import dataclass, field

import numpy as np

MANIFEST_COLUMNS = ["id", "subject", "frame", "image", "mask", "height", "width", "mask_area", "kept", "reason",
                    "duplicate_of", "similarity", "split", "original_image", "original_mask"]


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
