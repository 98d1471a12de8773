"""Tests of the synthetic Kaggle download (nerveseg.cleaning.synthetic)."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.cleaning.synthetic import FULL, TINY, SyntheticSpec, frame_counts, write_kaggle_download
from nerveseg.rle import rle_encode


def _low_res(path: Path) -> np.ndarray:
    """Pixels of an image area-downsampled to 64 x 48, zero-mean and unit-variance."""
    small = np.asarray(Image.open(path).resize((64, 48), Image.Resampling.BOX), np.float64).ravel()
    return (small - small.mean()) / small.std()


def _correlation(a: Path, b: Path) -> float:
    return float(np.mean(_low_res(a) * _low_res(b)))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    root = tmp_path_factory.mktemp("kaggle") / "download"
    return root, write_kaggle_download(root, TINY, workers=1)


def test_layout_and_csvs(download: tuple[Path, list[tuple[str, str]]]) -> None:
    root, _ = download
    ids = [f"{subject}_{frame}" for subject, n in enumerate(frame_counts(TINY), 1) for frame in range(1, n + 1)]
    assert len(ids) == TINY.n_train == 24
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(
        [f"{i}.tif" for i in ids] + [f"{i}_mask.tif" for i in ids]
    )
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(f"{n}.tif" for n in range(1, TINY.n_test + 1))
    assert sorted(p.name for p in root.iterdir()) == [
        "sample_submission.csv",
        "test",
        "train",
        "train_masks.csv",
    ]

    train_csv = (root / "train_masks.csv").read_text()
    assert train_csv.startswith("subject,img,pixels\n")
    assert [f"{row['subject']}_{row['img']}" for row in _rows(root / "train_masks.csv")] == ids
    submission = (root / "sample_submission.csv").read_text()
    assert submission == "img,pixels\n" + "".join(f"{n},\n" for n in range(1, TINY.n_test + 1))


def test_images_and_masks_format(download: tuple[Path, list[tuple[str, str]]]) -> None:
    root, _ = download
    for path in [*(root / "train").iterdir(), *(root / "test").iterdir()]:
        with Image.open(path) as image:
            assert (image.mode, image.size, image.info["compression"]) == ("L", (580, 420), "tiff_lzw")
            if path.stem.endswith("_mask"):
                assert set(np.unique(np.asarray(image)).tolist()) <= {0, 255}


def test_csv_rows_encode_the_mask_files(download: tuple[Path, list[tuple[str, str]]]) -> None:
    root, _ = download
    rows = _rows(root / "train_masks.csv")
    for row in rows:
        mask = np.asarray(Image.open(root / "train" / f"{row['subject']}_{row['img']}_mask.tif"))
        assert row["pixels"] == rle_encode(mask)
        if row["pixels"]:
            assert 2_500 < np.count_nonzero(mask) < 15_000  # a nerve-sized oval
    n_empty = sum(not row["pixels"] for row in rows)
    assert n_empty == round(TINY.empty_fraction * TINY.n_train)


def test_contradictions_are_near_identical_with_opposite_masks(
    download: tuple[Path, list[tuple[str, str]]],
) -> None:
    root, contradictions = download
    assert len(contradictions) == TINY.n_contradictions
    assert len({i for pair in contradictions for i in pair}) == 2 * TINY.n_contradictions
    for marked, empty in contradictions:
        assert marked.split("_")[0] == empty.split("_")[0]
        assert np.asarray(Image.open(root / "train" / f"{marked}_mask.tif")).any()
        assert not np.asarray(Image.open(root / "train" / f"{empty}_mask.tif")).any()
        assert _correlation(root / "train" / f"{marked}.tif", root / "train" / f"{empty}.tif") > 0.99


def test_ordinary_frames_are_not_near_duplicates(download: tuple[Path, list[tuple[str, str]]]) -> None:
    root, contradictions = download
    twins = {frozenset(pair) for pair in contradictions}
    for subject, n in enumerate(frame_counts(TINY), 1):
        ids = [f"{subject}_{frame}" for frame in range(1, n + 1)]
        vectors = np.stack([_low_res(root / "train" / f"{i}.tif") for i in ids])
        r = vectors @ vectors.T / vectors.shape[1]
        for a in range(n):
            for b in range(a + 1, n):
                if frozenset((ids[a], ids[b])) not in twins:
                    assert r[a, b] < 0.95, (ids[a], ids[b])


def test_same_seed_gives_identical_files_whatever_the_workers(
    download: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    root, contradictions = download
    assert write_kaggle_download(tmp_path, TINY, workers=2) == contradictions
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in files:
        assert (root / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_other_seed_gives_other_pictures(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_subjects=1, frames_per_subject=2, n_test=0)
    write_kaggle_download(tmp_path / "a", spec, workers=1)
    write_kaggle_download(tmp_path / "b", SyntheticSpec(1, 2, 0, seed=1), workers=1)
    assert (tmp_path / "a/train/1_1.tif").read_bytes() != (tmp_path / "b/train/1_1.tif").read_bytes()


def test_refuses_to_write_into_a_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "1_1.tif").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="refusing"):
        write_kaggle_download(tmp_path, TINY, workers=1)
    assert (tmp_path / "train" / "1_1.tif").read_bytes() == b"mine"
    assert not (tmp_path / "train_masks.csv").exists()


def test_frame_counts_hit_the_full_size() -> None:
    counts = frame_counts(FULL)
    assert (len(counts), sum(counts), FULL.n_train) == (47, 5_635, 5_635)
    assert max(counts) - min(counts) <= 1


def test_spec_rejects_contradictions_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="n_contradictions"):
        SyntheticSpec(n_subjects=2, frames_per_subject=3, n_test=0, n_contradictions=3)
