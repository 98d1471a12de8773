"""A synthetic probe sweep: the frames of a video in which a subject's nerve slides across the field of view, out of
it and back, with its true mask in every frame (empty while it is out of view). It judges what needs a video with a
known truth (the presence decision over time, docs/results.md) and feeds the video benchmarks and tests; the
pictures are nerveseg/cleaning/synthetic.py's."""

import numpy as np
from scipy import ndimage as ndi

from nerveseg.cleaning import synthetic


def sweep_frames(count: int, *, subject: int = 1, seed: int = 0, travel: float = 1.6
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` frames (580 x 420 uint8) and nerve masks (bool): the nerve slides over a still field of tissue and
    speckle, its offset going from 0 to `travel` / 2 times the width and back as a sine, so that it leaves the
    field and returns."""
    background, _ = synthetic._picture(seed, 1, subject, 1, False)
    with_nerve, mask = synthetic._picture(seed, 1, subject, 1, True)
    rows, columns = np.nonzero(ndi.binary_dilation(mask, iterations=3))  # the nerve's rim reaches past its mask
    mask_rows, mask_columns = np.nonzero(mask)
    frames = []
    for index in range(count):
        shift = round(travel * synthetic.WIDTH * np.sin(np.pi * index / max(count - 1, 1)) / 2)
        image, truth = background.copy(), np.zeros_like(mask)
        inside = (columns + shift >= 0) & (columns + shift < synthetic.WIDTH)
        image[rows[inside], columns[inside] + shift] = with_nerve[rows[inside], columns[inside]]
        keep = (mask_columns + shift >= 0) & (mask_columns + shift < synthetic.WIDTH)
        truth[mask_rows[keep], mask_columns[keep] + shift] = True
        frames.append((image, truth))
    return frames
