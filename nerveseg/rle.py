"""Kaggle run-length encoding of masks.

Pixels are numbered from 1, top to bottom then left to right (column-major), and a mask is written
as pairs "start length". An empty mask is an empty string.
"""

import numpy as np


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any non-zero value is foreground) as Kaggle run-length pairs."""
    pixels = np.asarray(mask).ravel(order="F") != 0
    edges = np.flatnonzero(np.diff(pixels, prepend=False, append=False)) + 1
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges.tolist()))


def rle_decode(text: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode Kaggle run-length pairs into a uint8 mask of 0 and 1 with the given (height, width).

    Raises ValueError when the text is not a valid encoding for that shape.
    """
    values = np.array(text.split(), dtype=np.int64) if text and text.strip() else np.zeros(0, np.int64)
    if values.size % 2:
        raise ValueError("run-length text has an odd number of values")
    starts, lengths = values[0::2] - 1, values[1::2]
    ends = starts + lengths
    total = shape[0] * shape[1]
    if values.size and (starts.min() < 0 or lengths.min() < 1 or ends.max() > total or np.any(starts[1:] < ends[:-1])):
        raise ValueError("run-length pairs must be ascending, non-overlapping and inside the image")
    flat = np.zeros(total + 1, dtype=np.int32)
    np.add.at(flat, starts, 1)
    np.add.at(flat, ends, -1)
    return np.cumsum(flat[:-1]).astype(np.uint8).reshape(shape, order="F")
