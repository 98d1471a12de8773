"""A synthetic stand-in for the Kaggle "Ultrasound Nerve Segmentation" download.

write_kaggle_download writes files in the exact Kaggle layout, so that cleaning, training, prediction, tests
and benchmarks run without the real data:

    root/train/<subject>_<frame>.tif, root/train/<subject>_<frame>_mask.tif   580 x 420 8-bit LZW TIFF
    root/test/<n>.tif                                                         n = 1 .. n_test
    root/train_masks.csv        subject,img,pixels (Kaggle run-length encoding, empty for empty masks)
    root/sample_submission.csv  img,pixels (pixels empty)

Every subject has its own neck anatomy: tissue layers with wavy boundaries, bright fascia, dark vessels with
posterior enhancement, and a nerve: an oval with a bright rim and dark fascicles inside (a honeycomb). Its
frames show that anatomy under small probe shifts, compression and gain changes, with fresh speckle each
time. Frames with an empty mask do not show the nerve, except for the planted contradictions: pairs of
near-identical frames of one subject that both show the nerve, where one has the nerve mask and its twin an
empty mask (an annotation error, as in about 45 pairs of the real data).

Every picture is drawn from its own seed sequence (spec.seed, train or test, subject, frame), so the files
are the same whatever the number of worker processes.
"""

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from tqdm import tqdm

from nerveseg.rle import rle_encode

HEIGHT, WIDTH = 420, 580
_PAD = 24  # margin of a subject's anatomy around the field of view, room for the probe to move
_TRAIN, _TEST, _PLAN = 0, 1, 2  # first words after spec.seed in the seed sequences
_CHUNK = 64  # most frames in one task handed to a worker process


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and randomness of a synthetic download.

    frames_per_subject is the mean number of frames per subject: there are round(n_subjects *
    frames_per_subject) train pairs, spread so that subjects differ by at most one frame (see frame_counts).
    Test images come from their own subjects, about as many frames each as the train subjects.
    empty_fraction is the share of empty train masks, the planted contradictions' empty twins included.
    """

    n_subjects: int
    frames_per_subject: float
    n_test: int
    empty_fraction: float = 0.588
    n_contradictions: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_subjects < 1 or self.frames_per_subject < 1 or self.n_test < 0:
            raise ValueError("need at least one subject, one frame per subject and no negative test count")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError("empty_fraction must lie in [0, 1]")
        if not 0 <= self.n_contradictions <= sum(count // 2 for count in frame_counts(self)):
            raise ValueError("n_contradictions must be >= 0 and fit two frames each into the subjects")

    @property
    def n_train(self) -> int:
        """Number of train image/mask pairs."""
        return round(self.n_subjects * self.frames_per_subject)


def frame_counts(spec: SyntheticSpec) -> list[int]:
    """Frames of subjects 1..n_subjects: spec.n_train spread evenly, the first subjects get one more."""
    base, extra = divmod(spec.n_train, spec.n_subjects)
    return [base + (subject < extra) for subject in range(spec.n_subjects)]


DEMO = SyntheticSpec(n_subjects=12, frames_per_subject=25, n_test=40, n_contradictions=6)
FULL = SyntheticSpec(n_subjects=47, frames_per_subject=5635 / 47, n_test=5508, n_contradictions=45)
TINY = SyntheticSpec(n_subjects=4, frames_per_subject=6, n_test=4, n_contradictions=2)


@dataclass(frozen=True)
class _Frame:
    """One picture to write: stem is its path under root without ".tif"."""

    stem: str
    kind: int  # _TRAIN or _TEST
    subject: int
    frame: int  # seeds the probe position, gains and speckle; also the tiny noise of a copied twin
    source: int  # frame whose picture this one shows: itself, or the twin it copies
    nerve: bool  # the nerve is in the picture
    mask: bool | None  # the mask file shows the nerve; None for test images (no mask file)


@dataclass(frozen=True)
class _Anatomy:
    """A subject's echogenicity maps over the padded field of view, with and without the nerve."""

    background: np.ndarray
    with_nerve: np.ndarray
    nerve: np.ndarray  # bool, inside the nerve oval
    attenuation: float  # depth attenuation over the image height (exponent)


def _rng(*words: int) -> np.random.Generator:
    """The generator of one seed sequence, e.g. (spec.seed, kind, subject, frame)."""
    return np.random.default_rng(np.random.SeedSequence(list(words)))


def _smooth_1d(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """A smooth random curve of n samples, within [-1, 1], varying over about scale samples."""
    t = np.arange(n, dtype=np.float32) / scale
    f = rng.uniform(0.5, 1.5, 3)
    phase = rng.uniform(0, 2 * np.pi, 3)
    weight = rng.uniform(0.3, 1.0, 3)
    curve = (weight[:, None] * np.sin(f[:, None] * t[None, :] + phase[:, None])).sum(0)
    return (curve / weight.sum()).astype(np.float32)


def _soft_disk(distance_inside: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from the signed distance (px) of pixel centres inside its edge."""
    return np.clip(distance_inside + 0.5, 0.0, 1.0)


def _oval(
    yy: np.ndarray, xx: np.ndarray, centre: tuple[float, float], half: tuple[float, float], angle: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates along the axes of a rotated oval (u across, v up-down) and the normalised radius rho."""
    cos, sin = math.cos(angle), math.sin(angle)
    u = (xx - centre[1]) * cos + (yy - centre[0]) * sin
    v = (yy - centre[0]) * cos - (xx - centre[1]) * sin
    return u, v, np.sqrt((u / half[1]) ** 2 + (v / half[0]) ** 2)


def _tissue(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Echogenicity of skin, tissue layers with wavy boundaries and fascia, and a few muscle bellies."""
    hp, wp = yy.shape[0], xx.shape[1]
    n_deep = int(rng.integers(3, 6))
    depths = np.concatenate([[rng.uniform(8, 16)], np.sort(rng.uniform(45, HEIGHT - 20, n_deep))]) + _PAD
    values = np.concatenate([[rng.uniform(0.75, 0.95)], rng.uniform(0.3, 0.7, n_deep + 1)]).astype(np.float32)
    striation = np.concatenate([[0.0], rng.uniform(0.0, 0.3, n_deep + 1)]).astype(np.float32)
    layer = np.zeros((hp, wp), np.int8)
    fascia = np.zeros((hp, wp), np.float32)
    for i, depth in enumerate(depths):
        tilt = rng.uniform(-0.06, 0.06) * (xx[0] - wp / 2)
        boundary = depth + tilt + rng.uniform(2, 10) * _smooth_1d(rng, wp, rng.uniform(50, 150))
        distance = yy - boundary[None, :]
        layer += distance > 0
        if i > 0 and rng.random() < 0.75:
            strength = rng.uniform(0.3, 0.7) * (0.6 + 0.4 * _smooth_1d(rng, wp, rng.uniform(20, 60)))
            fascia += strength[None, :] * np.exp(-0.5 * (distance / rng.uniform(1.0, 2.0)) ** 2)
    streaks = ndi.gaussian_filter(rng.standard_normal((hp, wp), np.float32), (0.7, 4.0))
    coarse = ndi.gaussian_filter(rng.standard_normal((hp // 12 + 2, wp // 12 + 2), np.float32), 1.2)
    coarse = ndi.zoom(coarse / coarse.std(), 12, order=1)[:hp, :wp]
    echo = values[layer] * (1 + 0.15 * coarse) * (1 + striation[layer] * streaks / streaks.std())
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(60, HEIGHT - 40) + _PAD, rng.uniform(0, WIDTH) + _PAD
        half = rng.uniform(25, 60), rng.uniform(90, 220)
        _, _, rho = _oval(yy, xx, centre, half, rng.uniform(-0.25, 0.25))
        edge = (1 - rho) * half[0]
        echo *= 1 + (rng.uniform(0.6, 1.4) - 1) * _soft_disk(edge)
        fascia += rng.uniform(0.2, 0.6) * np.exp(-0.5 * (edge / 1.5) ** 2)
    return echo + fascia


def _add_vessels(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    echo: np.ndarray,
    nerve: tuple[float, float, float],
) -> np.ndarray:
    """Add one or two anechoic vessels beside the nerve (centre y, x, half width), with a bright wall and
    posterior enhancement."""
    ncy, ncx, half_w = nerve
    side = rng.choice([-1.0, 1.0])
    for _ in range(int(rng.integers(1, 3))):
        ry = rng.uniform(15, 38)
        rx = ry * rng.uniform(1.0, 1.4)
        gap = half_w + rx + rng.uniform(12, 50)
        vcx = ncx + side * gap
        if not rx + 5 < vcx - _PAD < WIDTH - rx - 5:
            vcx = ncx - side * gap
        vcy = np.clip(ncy + rng.uniform(-50, 60), ry + 20 + _PAD, HEIGHT - ry - 20 + _PAD)
        _, _, rho = _oval(yy, xx, (vcy, vcx), (ry, rx), rng.uniform(-0.3, 0.3))
        edge = (1 - rho) * ry
        inside = _soft_disk(edge)
        below = np.clip((yy - vcy) / ry, 0, 1) * np.exp(-np.clip(yy - vcy - ry, 0, None) / 100.0)
        enhancement = below * np.exp(-(((xx - vcx) / rx) ** 4))
        echo = echo * (1 + rng.uniform(0.3, 0.6) * enhancement) * (1 - inside) + inside * rng.uniform(0.04, 0.1)
        echo += rng.uniform(0.2, 0.5) * np.exp(-0.5 * ((edge + 1) / 1.3) ** 2)
        side = -side
    return echo


@lru_cache(maxsize=4)
def _anatomy(seed: int, kind: int, subject: int) -> _Anatomy:
    """Draw a subject's anatomy from its seed (frame 0 of its seed sequences)."""
    rng = _rng(seed, kind, subject, 0)
    yy = np.arange(HEIGHT + 2 * _PAD, dtype=np.float32)[:, None]
    xx = np.arange(WIDTH + 2 * _PAD, dtype=np.float32)[None, :]
    echo = _tissue(rng, yy, xx)

    # the nerve: an oval in the upper middle, about 90-140 x 60-90 px
    half = rng.uniform(30, 45), rng.uniform(45, 70)
    centre = rng.uniform(0.25, 0.45) * HEIGHT + _PAD, rng.uniform(0.3, 0.7) * WIDTH + _PAD
    echo = _add_vessels(rng, yy, xx, echo, (centre[0], centre[1], half[1]))
    reach = int(half[1]) + 4  # the nerve is drawn in a window around its centre
    window = np.s_[int(centre[0]) - reach : int(centre[0]) + reach, int(centre[1]) - reach : int(centre[1]) + reach]
    u, v, rho = _oval(yy[window[0]], xx[:, window[1]], centre, half, rng.uniform(-0.3, 0.3))

    # bright interior with dark round fascicles (honeycomb) and a bright epineurium rim
    nerve_echo = np.full(rho.shape, rng.uniform(0.6, 0.8), np.float32)
    fascicle_radius = rng.uniform(4.5, 8.0)
    fascicle_value = rng.uniform(0.2, 0.35)
    centres: list[tuple[float, float]] = []
    for fu, fv in rng.uniform(-1, 1, (300, 2)) * (half[1], half[0]):
        if (fu / half[1]) ** 2 + (fv / half[0]) ** 2 < 0.6 and all(
            (fu - a) ** 2 + (fv - b) ** 2 > (2.3 * fascicle_radius) ** 2 for a, b in centres
        ):
            centres.append((fu, fv))
    for a, b in centres:
        cover = _soft_disk(fascicle_radius * rng.uniform(0.75, 1.2) - np.sqrt((u - a) ** 2 + (v - b) ** 2))
        nerve_echo += (fascicle_value - nerve_echo) * cover
    edge = (1 - rho) * math.sqrt(half[0] * half[1])
    phi = np.arctan2(v / half[0], u / half[1])
    rim = np.exp(-0.5 * ((edge - 3.0) / 1.8) ** 2) * (1 + 0.2 * np.cos(2 * phi + rng.uniform(0, 2 * np.pi)))
    nerve_echo = np.maximum(nerve_echo, rng.uniform(0.9, 1.15) * rim)
    cover = _soft_disk(edge)
    with_nerve = echo.copy()
    with_nerve[window] += (nerve_echo - echo[window]) * cover
    nerve = np.zeros(echo.shape, bool)
    nerve[window] = rho < 1
    return _Anatomy(
        background=ndi.gaussian_filter(np.clip(echo, 0, None), 0.8),
        with_nerve=ndi.gaussian_filter(np.clip(with_nerve, 0, None), 0.8),
        nerve=nerve,
        attenuation=float(rng.uniform(0.4, 0.9)),
    )


def _picture(seed: int, kind: int, subject: int, frame: int, nerve: bool) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame: the uint8 image and the bool nerve mask of where the nerve is (or would be)."""
    anatomy = _anatomy(seed, kind, subject)
    rng = _rng(seed, kind, subject, frame)
    y = np.arange(HEIGHT, dtype=np.float32)
    x = np.arange(WIDTH, dtype=np.float32)

    # probe position: shift, compression, smooth wobble; nearest-neighbour lookup into the padded anatomy
    # (coordinates are positive, so adding 0.5 and truncating rounds them)
    top, left = _PAD + 0.5 + rng.uniform(-4, 4), _PAD + 0.5 + rng.uniform(-6, 6)
    src_y = y * (1 + rng.uniform(-0.02, 0.02)) + top
    src_y = src_y[:, None] + np.outer(y / HEIGHT, rng.uniform(0, 3) * _smooth_1d(rng, WIDTH, rng.uniform(80, 200)))
    src_x = (x + left)[None, :] + (rng.uniform(0, 3) * _smooth_1d(rng, HEIGHT, rng.uniform(60, 150)))[:, None]
    index = src_y.astype(np.int32)
    index *= WIDTH + 2 * _PAD
    index += src_x.astype(np.int32)
    echo = (anatomy.with_nerve if nerve else anatomy.background).ravel()[index]
    mask = anatomy.nerve.ravel()[index]

    # gains: depth attenuation, overall gain, lateral shading, a broad brighter or darker patch
    attenuation = anatomy.attenuation + rng.uniform(-0.1, 0.1)
    depth_gain = np.exp(-attenuation * y / HEIGHT) * rng.uniform(0.85, 1.15)
    depth_gain *= 1 + 0.06 * _smooth_1d(rng, HEIGHT, rng.uniform(40, 120))
    lateral_gain = 1 + 0.08 * _smooth_1d(rng, WIDTH, rng.uniform(60, 200))
    patch_y = np.exp(-0.5 * ((y - rng.uniform(0, HEIGHT)) / rng.uniform(40, 120)) ** 2)
    patch_x = np.exp(-0.5 * ((x - rng.uniform(0, WIDTH)) / rng.uniform(50, 150)) ** 2)
    gain = np.outer(depth_gain * 200, lateral_gain)
    gain += np.outer(depth_gain * (200 * rng.uniform(-0.15, 0.15)) * patch_y, patch_x)

    # speckle: magnitude of smoothed complex noise (Rayleigh), drawn at half width and stretched laterally;
    # its contrast is softened, as by a scanner's speckle reduction
    noise = rng.random((2, HEIGHT, WIDTH // 2), np.float32) - np.float32(0.5)
    noise = ndi.gaussian_filter(noise, (0, 1.0, 1.0), truncate=3.0)
    half = np.hypot(noise[0], noise[1]) * np.float32(9.75 * 0.55) + np.float32(0.45)  # 9.75: mean 1
    blotches = ndi.gaussian_filter(rng.standard_normal((HEIGHT // 6, WIDTH // 12), np.float32), 0.7)
    blotches = Image.fromarray(blotches).resize((WIDTH // 2, HEIGHT), Image.Resampling.BICUBIC)
    half *= 1 + np.float32(0.35) * np.asarray(blotches)
    speckle = np.empty((HEIGHT, WIDTH), np.float32)
    speckle[:, 0::2] = half
    speckle[:, 1:-1:2] = (half[:, :-1] + half[:, 1:]) * 0.5
    speckle[:, -1] = half[:, -1]

    image = echo * gain
    image *= speckle
    return np.minimum(image, 255, out=image).astype(np.uint8), mask


def _retouch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-identical copy: +-1 or 2 grey levels on about 3% of the pixels."""
    delta = np.where(rng.random(image.shape) < 0.03, rng.choice(np.array([-2, -1, 1, 2]), image.shape), 0)
    return np.clip(image + delta, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    """Write a uint8 array as an 8-bit grayscale LZW-compressed TIFF, as in the Kaggle download."""
    Image.fromarray(array).save(path, compression="tiff_lzw")


def _write_frames(root: Path, seed: int, frames: list[_Frame], test_masks: bool) -> list[str]:
    """Render and write frames under root; return each one's run-length encoded mask ("" for test images).

    With test_masks, the truth of each test image goes to root/test_masks/<n>_mask.tif."""
    encoded = []
    for frame in frames:
        image, nerve = _picture(seed, frame.kind, frame.subject, frame.source, frame.nerve)
        if frame.source != frame.frame:
            image = _retouch(image, _rng(seed, frame.kind, frame.subject, frame.frame))
        _save(image, root / f"{frame.stem}.tif")
        if frame.mask is None:
            if test_masks:
                number = frame.stem.removeprefix("test/")
                truth = np.where(nerve & frame.nerve, 255, 0).astype(np.uint8)
                _save(truth, root / "test_masks" / f"{number}_mask.tif")
            encoded.append("")
            continue
        mask = np.where(nerve, 255, 0).astype(np.uint8) if frame.mask else np.zeros_like(image)
        _save(mask, root / f"{frame.stem}_mask.tif")
        encoded.append(rle_encode(mask))
    return encoded


def _plan(spec: SyntheticSpec) -> tuple[list[_Frame], list[tuple[str, str]]]:
    """Decide every picture (train frames by subject and frame, then test images by number) and the
    contradictory twins, returned as (id with mask, id with empty mask)."""
    rng = _rng(spec.seed, _PLAN)
    counts = frame_counts(spec)

    # contradictions: subjects taken in a random order, round robin, two unused frames each
    unused = [list(rng.permutation(count) + 1) for count in counts]
    copies: dict[tuple[int, int], int] = {}  # (subject, frame) -> the frame whose picture it copies
    with_mask: set[tuple[int, int]] = set()
    contradictions = []
    order = rng.permutation(spec.n_subjects)
    turn = 0
    while len(contradictions) < spec.n_contradictions:
        subject = int(order[turn % spec.n_subjects]) + 1
        turn += 1
        if len(unused[subject - 1]) >= 2:
            source, copy = (int(unused[subject - 1].pop()) for _ in range(2))
            copies[subject, source] = source
            copies[subject, copy] = source
            marked, empty = (source, copy) if rng.random() < 0.5 else (copy, source)
            with_mask.add((subject, marked))
            contradictions.append((f"{subject}_{marked}", f"{subject}_{empty}"))

    # ordinary frames: exactly enough empty ones to reach round(empty_fraction * n_train) empty masks
    ordinary = [(subject + 1, int(f)) for subject, frames in enumerate(unused) for f in sorted(frames)]
    n_empty = min(max(round(spec.empty_fraction * spec.n_train) - spec.n_contradictions, 0), len(ordinary))
    empty = {ordinary[i] for i in rng.choice(len(ordinary), n_empty, replace=False)}
    frames = []
    for subject, count in enumerate(counts, start=1):
        for f in range(1, count + 1):
            key = (subject, f)
            if key in copies:
                source, nerve, marked = copies[key], True, key in with_mask
            else:
                source, nerve, marked = f, key not in empty, key not in empty
            frames.append(_Frame(f"train/{subject}_{f}", _TRAIN, subject, f, source, nerve, marked))

    # test images: their own subjects, frames numbered in a random order, nerve in about 1 - empty_fraction
    n_test_subjects = math.ceil(spec.n_test / spec.frames_per_subject)
    base, extra = divmod(spec.n_test, max(n_test_subjects, 1))
    shots = [(s + 1, f + 1) for s in range(n_test_subjects) for f in range(base + (s < extra))]
    visible = rng.random(spec.n_test) >= spec.empty_fraction
    for number, i in enumerate(rng.permutation(spec.n_test), start=1):
        subject, f = shots[i]
        frames.append(_Frame(f"test/{number}", _TEST, subject, f, f, bool(visible[number - 1]), None))
    return frames, contradictions


def _chunks(frames: list[_Frame]) -> list[list[_Frame]]:
    """The frames grouped by subject in runs of at most _CHUNK: a worker draws an anatomy once a run."""
    by_subject: dict[tuple[int, int], list[_Frame]] = {}
    for frame in frames:
        by_subject.setdefault((frame.kind, frame.subject), []).append(frame)
    return [group[i : i + _CHUNK] for group in by_subject.values() for i in range(0, len(group), _CHUNK)]


def write_kaggle_download(
    root: Path, spec: SyntheticSpec, workers: int = 0, progress: bool = False, test_masks: bool = False
) -> list[tuple[str, str]]:
    """Write the download under root (root/train, root/test, the two CSVs); return the planted contradictory
    pairs as (id_with_mask, id_empty) with ids like "3_7".

    test_masks also writes the truth of the test images to root/test_masks/<n>_mask.tif (not part of the
    Kaggle layout: it lets the demo measure the Dice on unseen images). workers is the number of processes
    (0: one per CPU core); the files are the same whatever it is. Refuses with FileExistsError when any of
    the four targets already holds something, and never overwrites.
    """
    root = Path(root)
    for target in (root / "train", root / "test"):
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(f"{target} already holds files; refusing to write a synthetic download there")
    for target in (root / "train_masks.csv", root / "sample_submission.csv"):
        if target.exists():
            raise FileExistsError(f"{target} already exists; refusing to write a synthetic download there")
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    if test_masks:
        (root / "test_masks").mkdir(exist_ok=True)

    frames, contradictions = _plan(spec)
    chunks = _chunks(frames)
    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(frames), unit="img", disable=not progress, desc="synthetic download") as bar:
        if workers == 1:
            encoded = []
            for chunk in chunks:
                encoded.append(_write_frames(root, spec.seed, chunk, test_masks))
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_write_frames, root, spec.seed, chunk, test_masks) for chunk in chunks]
                for future in as_completed(futures):
                    bar.update(len(future.result()))
            encoded = [future.result() for future in futures]

    pixels = {
        frame.stem: rle
        for chunk, rles in zip(chunks, encoded, strict=True)
        for frame, rle in zip(chunk, rles, strict=True)
    }
    rows = [f"{f.subject},{f.frame},{pixels[f.stem]}\n" for f in frames if f.kind == _TRAIN]
    (root / "train_masks.csv").write_text("subject,img,pixels\n" + "".join(rows))
    (root / "sample_submission.csv").write_text("img,pixels\n" + "".join(f"{n},\n" for n in range(1, spec.n_test + 1)))
    return contradictions
