"""Measuring every stage: the sizes (profiles), the synthetic data, and one function per figure.

Each measure_* function returns rows of the table (see report.py); `measure` runs them all in order.
"""

import csv
import hashlib
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from monai.data import PILReader
from monai.transforms import LoadImage, Resize
from monai.utils import convert_to_tensor
from report import GB, Row, Watch, flag_busy, say, spread

from nerveseg.checkpoint import load_checkpoint, read_torch_file, save_torch
from nerveseg.cleaning import synthetic
from nerveseg.data import read_manifest, split_by_subject
from nerveseg.ensemble import Ensemble, TestTimeAugmentation, augmentation_for
from nerveseg.model import build_model, model_config, network_channels
from nerveseg.onnx_model import onnx_graph
from nerveseg.postprocess import PostProcessing
from nerveseg.predictors import OnnxPredictor, TorchPredictor, max_difference
from nerveseg.settings import script_defaults
from nerveseg.training.steps import (
    SegmentationLoss,
    automatic_batch_size,
    backward_in_micro_batches,
    make_optimizer,
    micro_batch_size,
)

ROOT = Path(__file__).resolve().parents[1]

CACHE = ROOT / "benchmarks" / ".cache"


TRAIN = script_defaults(ROOT / "train.py")  # train.py's defaults: model, batch, image size, optimiser, precision
FULL_TRAIN_IMAGES = round(synthetic.FULL.n_train * (1 - TRAIN["VAL_FRACTION"]))  # a full-set epoch, about


# %% Sizes: one profile per mode
@dataclass(frozen=True)
class Profile:
    """How much data and how many repetitions one mode uses."""

    name: str
    spec: synthetic.SyntheticSpec  # the download to generate
    image_size: tuple[int, int] = (TRAIN["IMAGE_HEIGHT"], TRAIN["IMAGE_WIDTH"])  # what the network sees
    scaling_sizes: tuple[tuple[int, int], ...] = ((96, 128), (128, 176), (224, 320))
    batch_size: int = TRAIN["BATCH_SIZE"] or automatic_batch_size(FULL_TRAIN_IMAGES, TRAIN["MIN_STEPS_PER_EPOCH"])
    epochs: int = 4  # train.py epochs; all but the first are timed
    warmup_steps: int = 3  # untimed training steps before the timed ones (on the CPU, steps 1-3 are slower)
    steps: int = 5  # timed training steps of the compute limit (at least; see min_seconds)
    few_steps: int = 2  # timed steps of the naive loop and of the other image sizes (224x320: 30 s a step on 2 cores)
    min_seconds: float = 3.0  # keep timing steps until this much time has passed (fast GPU steps)
    warmup_runs: int = 1  # untimed runs of each script, on a small input, before the timed ones
    runs: int = 3  # timed runs of data_cleaning.py and predict.py


DEFAULT_SPEC = synthetic.SyntheticSpec(n_subjects=12, frames_per_subject=50, n_test=300, n_contradictions=6)
PROFILES = {
    "quick": Profile(
        "quick",
        synthetic.TINY,
        image_size=(32, 48),
        scaling_sizes=((16, 32), (32, 48), (48, 64)),
        batch_size=8,
        epochs=2,
        warmup_steps=1,
        steps=1,
        few_steps=1,
        min_seconds=0.0,
        warmup_runs=0,
        runs=1,
    ),
    "default": Profile("default", DEFAULT_SPEC),
    "gpu-quick": Profile("gpu-quick", DEFAULT_SPEC, epochs=3, runs=1),
    "full": Profile("full", synthetic.FULL, epochs=3, runs=2),
}


# %% Running the project's scripts
@dataclass
class ScriptRun:
    """The wall time and peak memory of one run of a script."""

    seconds: float
    peak_rss: int  # bytes: the process and its children together, sampled every 0.1 s


def tree_rss(process: psutil.Process) -> int:
    """The resident memory of a process and all its descendants."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_script(script: str, *arguments: object, cwd: Path) -> ScriptRun:
    """Run one of the project's scripts as a user would; fail with its output if it fails."""
    log = cwd / f"{script}.log"
    with open(log, "w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, str(ROOT / script), *map(str, arguments)], cwd=cwd, stdout=output, stderr=subprocess.STDOUT
        )
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                peak = max(peak, tree_rss(watched))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        process.wait()
        seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(map(str, arguments))} failed:\n{log.read_text()[-3000:]}")
    return ScriptRun(seconds, peak)


# %% Data: synthetic downloads, made once and cached
def cached_download(spec: synthetic.SyntheticSpec) -> Path:
    """A synthetic Kaggle download of `spec` in benchmarks/.cache, generated on first use."""
    folder = CACHE / f"download-{spec.n_train}-{hashlib.sha256(repr(spec).encode()).hexdigest()[:10]}"
    if not folder.is_dir():
        say(
            f"generating a synthetic download of {spec.n_train:,} pairs and {spec.n_test:,} test images into "
            f"{folder} (once)"
        )
        building = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE))
        synthetic.write_kaggle_download(building, spec, progress=sys.stderr.isatty())
        building.rename(folder)
    return folder


def subset_download(download: Path, fraction: float) -> Path:
    """The first `fraction` of a download's subjects and test images (hard links), with matching CSVs."""
    folder = download.with_name(f"{download.name}-subset-{fraction}")
    if folder.is_dir():
        return folder
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE))
    rows = (download / "train_masks.csv").read_text().splitlines()
    subjects = sorted({int(row.split(",")[0]) for row in rows[1:]})
    kept = set(subjects[: max(1, round(fraction * len(subjects)))])
    rows = [rows[0], *(row for row in rows[1:] if int(row.split(",")[0]) in kept)]
    (building / "train_masks.csv").write_text("\n".join(rows) + "\n")
    n_test = len(list((download / "test").iterdir()))
    tests = range(1, max(1, round(fraction * n_test)) + 1)
    (building / "sample_submission.csv").write_text("img,pixels\n" + "".join(f"{n},\n" for n in tests))
    for name in ("train", "test"):
        (building / name).mkdir()
    for path in (download / "train").iterdir():
        if int(path.name.split("_")[0]) in kept:
            os.link(path, building / "train" / path.name)
    for number in tests:
        os.link(download / "test" / f"{number}.tif", building / "test" / f"{number}.tif")
    building.rename(folder)
    return folder


def count_pairs(download: Path) -> int:
    """The training pairs of a download (rows of train_masks.csv)."""
    return len((download / "train_masks.csv").read_text().splitlines()) - 1


# %% 1 and 7: cleaning, and how its time grows with the set
def measure_cleaning(download: Path, profile: Profile, work: Path) -> tuple[list[Row], Path, Path]:
    """Clean 1/4, 1/2 and all of the download, interleaved, `runs` times each after a warm-up on 1/4.

    Returns the rows and the clean copies of all and of 1/4 of the set (kept for training and prediction).
    """
    sources = {"1/4": subset_download(download, 0.25), "1/2": subset_download(download, 0.5), "all": download}
    pairs = {label: count_pairs(source) for label, source in sources.items()}
    say(f"cleaning: {profile.runs} timed run(s) on each of {', '.join(f'{n:,}' for n in pairs.values())} pairs")
    times: dict[str, list[float]] = {label: [] for label in sources}
    memory, outputs = 0, {}
    schedule = [("1/4", False)] * profile.warmup_runs
    schedule += [(label, True) for _ in range(profile.runs) for label in sources]
    for number, (label, timed) in enumerate(schedule):
        output = work / f"clean-{number}"
        run = run_script("data_cleaning.py", "--source", sources[label], "--output", output, "--quiet", cwd=work)
        if timed:
            times[label].append(run.seconds)
        if timed and label == "all":
            memory = max(memory, run.peak_rss)
        if label in outputs:
            shutil.rmtree(outputs[label])
        outputs[label] = output
    full = profile.name == "full"
    rate = pairs["all"] / statistics.median(times["all"])
    rows = [
        Row(
            section=1,
            key="cleaning_rate",
            benchmark="Cleaning: data_cleaning.py, all checks on",
            value=rate,
            unit="pairs/s",
            goal="≥ 190 (full set)",
            met=rate >= 190 if full else None,
            note=f"{pairs['all']:,} pairs; {spread(times['all'], 's')}",
        ),
        Row(
            section=6,
            key="cleaning_memory",
            benchmark="Peak memory: cleaning (RSS, with its worker processes)",
            value=memory / GB,
            unit="GB",
            note=f"{pairs['all']:,} pairs",
        ),
    ]
    for label, samples in times.items():
        seconds = statistics.median(samples)
        rows.append(
            Row(
                section=7,
                key=f"scaling_cleaning_{label.replace('/', '_')}",
                benchmark=f"Scaling: cleaning {label} of the set ({pairs[label]:,} pairs)",
                value=seconds,
                unit="s",
                goal="≤ 30 (full set)" if label == "all" else "",
                met=seconds <= 30 if full and label == "all" else None,
                note=f"{1000 * seconds / pairs[label]:.2f} ms per pair; {spread(samples, 's')}",
            )
        )
    return rows, outputs["all"], outputs["1/4"]


# %% 2, 4 and 7: training steps measured in this process
Batch = tuple[torch.Tensor, torch.Tensor]  # images and masks, (batch, 1, height, width)


def training_step(device: torch.device, amp: bool, batch_size: int, compiled: bool = False) -> Callable[..., None]:
    """One optimisation step as train.py takes it: its model, loss, optimiser, precision and micro-batches."""
    torch.manual_seed(0)
    presence = TRAIN["PRESENCE_WEIGHT"] > 0
    channels = network_channels(TRAIN["MODEL"], TRAIN["CHANNELS"], TRAIN["DECODER_CHANNELS"])
    levels = (channels, TRAIN["STRIDES"], TRAIN["NUM_RES_UNITS"], TRAIN["DROPOUT"])
    config = model_config(*levels, presence=presence, model=TRAIN["MODEL"], presence_signal=TRAIN["PRESENCE_SIGNAL"])
    model = build_model(config).to(device)  # the weights it starts from do not change the time
    network = torch.compile(model, dynamic=False) if compiled else model
    loss_function = SegmentationLoss(TRAIN["PRESENCE_WEIGHT"], balance_presence=TRAIN["PRESENCE_BALANCE"])
    optimizer, _, _ = make_optimizer(model, learning_rate=TRAIN["LEARNING_RATE"], weight_decay=TRAIN["WEIGHT_DECAY"],
                                     warmup_steps=1, total_steps=2, device=device, amp=amp)

    micro_batch = micro_batch_size(TRAIN["MICRO_BATCH_SIZE"], batch_size, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # no loss scaling: fp32 and bfloat16 need none

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_in_micro_batches(
            network, loss_function, images, labels, micro_batch=micro_batch, scaler=scaler, amp=amp
        )
        optimizer.step()

    return step


def time_steps(
    step: Callable, batches: Iterator[Batch], device: torch.device, warmup: int, steps: int, min_seconds: float
) -> list[float]:
    """Seconds per step (fetching the batch included) of at least `steps` steps and `min_seconds`, after a warm-up."""
    times: list[float] = []
    number = 0
    while number < warmup + steps or sum(times) < min_seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        images, labels = next(batches)
        step(images.to(device), labels.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if number >= warmup:
            times.append(time.perf_counter() - started)
        number += 1
    return times


def random_batches(batch_size: int, image_size: tuple[int, int], device: torch.device) -> Iterator[Batch]:
    """The same preloaded batch of random images and masks, forever: no data loading at all."""
    images = torch.rand(batch_size, 1, *image_size, device=device)
    labels = (torch.rand(batch_size, 1, *image_size, device=device) > 0.9).float()
    return itertools.repeat((images, labels))


def compute_limit(
    profile: Profile,
    device: torch.device,
    image_size: tuple[int, int],
    steps: int,
    amp: bool = TRAIN["AMP"],
    compiled: bool = False,
) -> list[float]:
    """Images/s of training steps on preloaded random tensors (one figure per timed step)."""
    step = training_step(device, amp, profile.batch_size, compiled)
    warmup = profile.warmup_steps + 2 * compiled  # compiling happens in the first steps
    times = time_steps(
        step, random_batches(profile.batch_size, image_size, device), device, warmup, steps, profile.min_seconds
    )
    return [profile.batch_size / seconds for seconds in times]


def naive_batches(items: list[dict], batch_size: int, image_size: tuple[int, int]) -> Iterator[Batch]:
    """The naive reference: every step reads its TIFFs from disk with MONAI's LoadImage, one by one, and resizes
    each (no cache, no worker processes, no augmentation)."""
    load = LoadImage(reader=PILReader(reverse_indexing=False), image_only=True)
    resize_image, resize_label = Resize(image_size, mode="area"), Resize(image_size, mode="nearest-exact")
    stream = itertools.cycle(random.Random(0).sample(items, len(items)))
    while True:
        chosen = list(itertools.islice(stream, batch_size))
        images = [resize_image(load(item["image"])[None] / 255.0) for item in chosen]
        labels = [resize_label(load(item["label"])[None] / 255.0) for item in chosen]
        yield (
            convert_to_tensor(torch.stack(images), track_meta=False),
            convert_to_tensor(torch.stack(labels), track_meta=False),
        )


def measure_naive(train_items: list[dict], profile: Profile, device: torch.device) -> list[float]:
    """Images/s of the naive loop: reading and resizing at every step, then the same training step."""
    times = time_steps(
        training_step(device, TRAIN["AMP"], profile.batch_size),
        naive_batches(train_items, profile.batch_size, profile.image_size),
        device,
        profile.warmup_steps,
        profile.few_steps,
        profile.min_seconds,
    )
    return [profile.batch_size / seconds for seconds in times]


# %% 3: train.py's own epoch loop
def measure_pipeline(clean: Path, profile: Profile, device: torch.device, work: Path) -> tuple[list[float], ScriptRun]:
    """Images/s of train.py's epochs after the first (its train_seconds), validating only after the last."""
    run_dir = work / "runs" / "benchmark"
    run = run_script(
        "train.py",
        "--data-dir",
        clean,
        "--max-epochs",
        profile.epochs,
        "--val-interval",
        10**6,
        "--batch-size",
        profile.batch_size,
        "--min-steps-per-epoch",
        1,  # an epoch is one pass, as on the full set
        "--image-height",
        profile.image_size[0],
        "--image-width",
        profile.image_size[1],
        "--runs-dir",
        run_dir.parent,
        "--run-name",
        run_dir.name,
        "--model-path",
        work / "model.pt",
        "--pictures",
        work / "pictures",
        "--device",
        device.type,
        "--quiet",
        cwd=work,
    )
    with open(run_dir / "metrics.csv", newline="") as file:
        seconds = [float(row["train_seconds"]) for row in csv.DictReader(file)][1:]
    train_items, _ = split_by_subject(read_manifest(clean), TRAIN["VAL_FRACTION"], TRAIN["SEED"])
    return [len(train_items) / s for s in seconds], run


# %% 5: predict.py end to end
def prediction_checkpoint(work: Path) -> Path:
    """train.py's model with every post-processing step switched on (largest component, minimum area), so that
    the figure does not depend on what the short training run chose."""
    checkpoint = read_torch_file(work / "model.pt")
    checkpoint["postprocessing"] = PostProcessing(threshold=0.5, keep_largest=True, min_area_fraction=0.01).as_dict()
    path = work / "benchmark-model.pt"
    save_torch(path, checkpoint)
    return path


def measure_prediction(
    clean: Path, warmup_input: Path, profile: Profile, device: torch.device, work: Path, *, engine: str = "auto"
) -> list[Row]:
    """predict.py (with `engine`) on the clean test images, `runs` times after a warm-up on a smaller set."""
    checkpoint = prediction_checkpoint(work)
    n_images = len(list((clean / "test").iterdir()))
    say(f"prediction ({engine}): {profile.runs} timed run(s) on {n_images:,} test images")
    times, memory = [], 0
    for number in range(profile.warmup_runs + profile.runs):
        timed = number >= profile.warmup_runs
        run = run_script(
            "predict.py",
            "--checkpoint",
            checkpoint,
            "--input",
            clean / "test" if timed else warmup_input,
            "--output",
            work / "predictions",
            "--pictures",
            work / "pictures",
            "--device",
            device.type,
            "--engine",
            engine,
            "--quiet",
            cwd=work,
        )
        if timed:
            times.append(run.seconds)
            memory = max(memory, run.peak_rss)
    seconds = statistics.median(times)
    full = profile.name == "full"
    if engine != "auto":
        return [Row(section=5, key=f"prediction_seconds_{engine}", benchmark=f"Prediction with --engine {engine}: "
                    f"time for {n_images:,} test images", value=seconds, unit="s", note=spread(times, "s"))]
    return [
        Row(
            section=5,
            key="prediction_rate",
            benchmark="Prediction: predict.py end to end (read, infer, resize back, post-process, RLE, write)",
            value=n_images / seconds,
            unit="images/s",
            goal="≥ 61.2 (full set)",
            met=n_images / seconds >= 61.2 if full else None,
            note=f"{n_images:,} images; {spread(times, 's')}",
        ),
        Row(
            section=5,
            key="prediction_seconds",
            benchmark=f"Prediction: time for {n_images:,} test images",
            value=seconds,
            unit="s",
            goal="≤ 90 (full set)",
            met=seconds <= 90 if full else None,
            note="Python start-up and loading the model included",
        ),
        Row(
            section=6,
            key="prediction_memory",
            benchmark="Peak memory: prediction (RSS, with its loader workers)",
            value=memory / GB,
            unit="GB",
            note=f"{n_images:,} images",
        ),
    ]


def measure_forward_engines(profile: Profile, work: Path) -> list[Row]:
    """The network's forward pass on the CPU, batch 64: PyTorch against ONNX Runtime (predict.py's engines)."""
    model, checkpoint = load_checkpoint(work / "model.pt", "cpu")
    image_size = tuple(checkpoint["preprocessing"]["image_size"])
    has_presence = checkpoint["model_config"].get("presence", False)
    torch_predictor = TorchPredictor(model, torch.device("cpu"), amp=False)
    onnx_predictor = OnnxPredictor(onnx_graph(model, image_size, has_presence=has_presence), "benchmark")
    images = torch.randint(0, 256, (64, 1, *image_size), dtype=torch.uint8)
    rates = {}
    for name, predictor in (("torch", torch_predictor), ("onnxruntime", onnx_predictor)):
        predictor(images)  # warm-up
        times = []
        for _ in range(max(profile.runs, 3)):
            started = time.perf_counter()
            predictor(images)
            times.append(time.perf_counter() - started)
        rates[name] = 64 / statistics.median(times)
    difference = max_difference(torch_predictor, onnx_predictor, images)
    return [
        Row(section=5, key=f"forward_{name}", benchmark=f"Forward pass on the CPU, batch 64, {name}",
            value=rate, unit="images/s", note=f"{image_size[0]}x{image_size[1]}, {torch.get_num_threads()} threads")
        for name, rate in rates.items()
    ] + [Row(section=5, key="forward_onnxruntime_speedup", benchmark="ONNX Runtime / PyTorch, forward pass",
             value=rates["onnxruntime"] / rates["torch"], unit="x", note=f"probabilities within {difference:.1g}")]


def measure_ensemble_forward(profile: Profile, device: torch.device, work: Path) -> list[Row]:
    """What prediction costs with K fold models and with test-time augmentation: the forward pass of one model,
    of one with augmentation, of a 5-model ensemble and of both, in images a second (batch 64)."""
    model, checkpoint = load_checkpoint(work / "model.pt", device)
    image_size = tuple(checkpoint["preprocessing"]["image_size"])
    views = augmentation_for(checkpoint["settings"])
    ensemble = Ensemble([model] * 5)  # the same weights five times: the cost of five models
    models = {
        "one model": model,
        "one model, test-time augmentation": TestTimeAugmentation(model, size=image_size, **views),
        "5-model ensemble": ensemble,
        "5-model ensemble, test-time augmentation": TestTimeAugmentation(ensemble, size=image_size, **views),
    }
    images = torch.randint(0, 256, (64, 1, *image_size), dtype=torch.uint8)
    rows = []
    for name, candidate in models.items():
        predictor = TorchPredictor(candidate.to(device).eval(), device, amp=True)
        predictor(images)  # warm-up
        times = []
        for _ in range(max(profile.runs, 2)):
            started = time.perf_counter()
            predictor(images)[0].cpu()  # the result on the host: the GPU has finished
            times.append(time.perf_counter() - started)
        key = "forward_" + name.replace("-model", "").replace(", test-time augmentation", "_tta").replace(" ", "_")
        rows.append(Row(section=5, key=key, benchmark=f"Forward pass, batch 64: {name}", value=64 / statistics.median(
            times), unit="images/s", note=f"{image_size[0]}x{image_size[1]} on {device.type}"))
    return rows


# %% GPU only: full-set epochs, mixed precision and torch.compile
def gpu_rows(profile: Profile, device: torch.device, limit: float, pipeline: float, n_train: int) -> list[Row]:
    """Full-set epoch times, and the speed-ups of AMP (bf16 autocast vs fp32) and torch.compile (compute limit)."""
    say("GPU: compute limit in fp32 and with torch.compile")
    fp32 = compute_limit(profile, device, profile.image_size, profile.steps, amp=False)
    compiled = compute_limit(profile, device, profile.image_size, profile.steps, compiled=True)
    fp32_rate, compiled_rate = statistics.median(fp32), statistics.median(compiled)
    measured = profile.name == "full"
    images = n_train if measured else FULL_TRAIN_IMAGES
    how = f"measured on {n_train:,} images" if measured else f"{images:,} images at the images/s measured above"
    return [
        Row(
            section=8,
            key="gpu_epoch_pipeline",
            benchmark="GPU: full-set epoch, our pipeline (train.py)",
            value=images / pipeline,
            unit="s",
            note=how,
        ),
        Row(
            section=8,
            key="gpu_epoch_limit",
            benchmark="GPU: full-set epoch at the compute limit",
            value=images / limit,
            unit="s",
            note=how,
        ),
        Row(
            section=8,
            key="gpu_fp32",
            benchmark="GPU: training compute limit in fp32 (no autocast)",
            value=fp32_rate,
            unit="images/s",
            note=spread(fp32, "images/s"),
        ),
        Row(
            section=8,
            key="gpu_amp_speedup",
            benchmark="GPU: AMP speed-up (bf16 autocast / fp32), compute limit",
            value=limit / fp32_rate,
            unit="×",
        ),
        Row(
            section=8,
            key="gpu_compiled",
            benchmark="GPU: training compute limit with torch.compile (as train.py --compile)",
            value=compiled_rate,
            unit="images/s",
            note=spread(compiled, "images/s"),
        ),
        Row(
            section=8,
            key="gpu_compile_speedup",
            benchmark="GPU: torch.compile speed-up, compute limit",
            value=compiled_rate / limit,
            unit="×",
        ),
        Row(
            section=8,
            key="gpu_memory",
            benchmark="GPU: peak memory allocated by torch",
            value=torch.cuda.max_memory_allocated(device) / GB,
            unit="GB",
            note="the largest of the in-process training figures",
        ),
    ]


# %% All rows
def measure(profile: Profile, device: torch.device, work: Path) -> list[Row]:
    """Every figure of the table, sorted into the order it is printed."""
    download = cached_download(profile.spec)
    watch = Watch()
    rows, clean, quarter = measure_cleaning(download, profile, work)
    flag_busy(rows, watch)
    size = f"{profile.image_size[0]}x{profile.image_size[1]}, batch {profile.batch_size}"
    watch = Watch()
    say(f"training: compute limit at {size}")
    limit = compute_limit(profile, device, profile.image_size, profile.steps)
    say(f"training: train.py, {profile.epochs} epochs")
    pipeline, training_run = measure_pipeline(clean, profile, device, work)
    say("training: the naive loop")
    train_items, _ = split_by_subject(read_manifest(clean), TRAIN["VAL_FRACTION"], TRAIN["SEED"])
    naive = measure_naive(train_items, profile, device)
    limit_rate, pipeline_rate, naive_rate = map(statistics.median, (limit, pipeline, naive))
    judged = profile.name != "quick"
    limit_row = Row(
        section=2,
        key="train_limit",
        benchmark=f"Training, compute limit: steps on preloaded tensors ({size})",
        value=limit_rate,
        unit="images/s",
        note=spread(limit, "images/s"),
    )
    rows += flag_busy(
        [
            limit_row,
            Row(
                section=3,
                key="train_pipeline",
                benchmark=f"Training, our pipeline: train.py epochs ({size})",
                value=pipeline_rate,
                unit="images/s",
                note=f"{len(train_items):,} images an epoch; epochs 2-{profile.epochs}: {spread(pipeline, 'images/s')}",
            ),
            Row(
                section=3,
                key="train_pipeline_vs_limit",
                benchmark="Training: our pipeline / compute limit",
                value=pipeline_rate / limit_rate,
                unit="×",
                goal="≥ 0.9",
                met=pipeline_rate / limit_rate >= 0.9 if judged else None,
            ),
            Row(
                section=4,
                key="train_naive",
                benchmark=f"Training, naive pipeline: LoadImage from disk every step ({size})",
                value=naive_rate,
                unit="images/s",
                note=spread(naive, "images/s"),
            ),
            Row(
                section=4,
                key="train_speedup_vs_naive",
                benchmark="Training: our pipeline / naive pipeline",
                value=pipeline_rate / naive_rate,
                unit="×",
            ),
            Row(
                section=6,
                key="train_memory",
                benchmark="Peak memory: training (train.py RSS)",
                value=training_run.peak_rss / GB,
                unit="GB",
                goal="≤ 3 (full set)",
                met=training_run.peak_rss <= 3 * GB if profile.name == "full" else None,
                note=f"{len(train_items):,} training images, {profile.epochs} epochs and validation",
            ),
        ],
        watch,
    )
    watch = Watch()
    rows += flag_busy(measure_prediction(clean, quarter / "test", profile, device, work), watch)
    if device.type == "cpu":
        rows += flag_busy(measure_prediction(clean, quarter / "test", profile, device, work, engine="torch"), watch)
        rows += flag_busy(measure_forward_engines(profile, work), watch)
    rows += flag_busy(measure_ensemble_forward(profile, device, work), watch)
    for height, width in profile.scaling_sizes:
        same = (height, width) == profile.image_size
        if not same:
            say(f"scaling: compute limit at {height}x{width}")
        watch = Watch()
        rates = limit if same else compute_limit(profile, device, (height, width), profile.few_steps)
        rate = statistics.median(rates)
        row = Row(
            section=7,
            key=f"scaling_train_{height}x{width}",
            benchmark=f"Scaling: training compute limit at {height}x{width}",
            value=rate,
            unit="images/s",
            note=f"{1e9 / (rate * height * width):.0f} ns per pixel; "
                + (limit_row.note if same else spread(rates, "images/s")),
        )
        rows += [row] if same else flag_busy([row], watch)
    if device.type == "cuda":
        watch = Watch()
        rows += flag_busy(gpu_rows(profile, device, limit_rate, pipeline_rate, len(train_items)), watch)
    return sorted(rows, key=lambda row: row.section)


