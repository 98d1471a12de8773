"""Contradictory near-duplicates: near-identical frames of which one has a mask and its twin none."""

import numpy as np
from PIL import Image

from nerveseg.cleaning.pairs import PairResult, PairStatus

FEATURE_SIZE = (64, 48)  # width, height of the thumbnail compared to find near-duplicates
DUPLICATE_POLICIES = ("drop-empty", "drop-both", "keep")


def thumbnail_feature(pixels: np.ndarray) -> np.ndarray:
    """A 64x48 area-averaged thumbnail, zero mean and unit length: the dot product of two is Pearson's r."""
    thumb = np.asarray(Image.fromarray(pixels).resize(FEATURE_SIZE, Image.Resampling.BOX), dtype=np.float32).ravel()
    thumb -= thumb.mean()
    return thumb / max(float(np.linalg.norm(thumb)), 1e-6)


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
            result.status = PairStatus.DUPLICATE
            result.reason = f"contradictory near-duplicate of {result.duplicate_of} (--duplicates {policy})"
