"""nerveseg/rle.py: the Kaggle run-length encoding of masks."""

import csv

import numpy as np
import pytest
from PIL import Image

from nerveseg.rle import rle_decode, rle_encode
from tests.helpers import KAGGLE_SAMPLE, needs_kaggle_sample


@needs_kaggle_sample
def test_rle_reproduces_the_competition_rows_exactly():
    with open(KAGGLE_SAMPLE / "train_masks.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 55
    for row in rows:
        mask = np.asarray(Image.open(KAGGLE_SAMPLE / "train" / f"{row['subject']}_{row['img']}_mask.tif"))
        assert rle_encode(mask) == row["pixels"]
        assert np.array_equal(rle_decode(row["pixels"], mask.shape) * 255, mask)


def test_rle_round_trips_and_follows_the_kaggle_numbering():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) > rng.random()
        assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)
    assert rle_encode(np.zeros((4, 5))) == ""
    column_major = np.zeros((3, 2), np.uint8)
    column_major[1:, 0] = 1  # pixels 2 and 3: down the first column
    column_major[0, 1] = 1  # pixel 4: top of the second column
    assert rle_encode(column_major) == "2 3"
    with pytest.raises(ValueError):
        rle_decode("5 2 3 1", (3, 3))  # not ascending
