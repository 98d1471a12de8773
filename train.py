"""Stage 2: train a MONAI UNet to segment the brachial plexus nerve, and save 2D_Nerve_Segmentation.pt.

    python train.py                               # the settings below
    python train.py --max-epochs 5 --batch-size 32
    python train.py --folds 5                     # 5-fold cross-validation: 5 models, predicted as an ensemble
    python train.py --resume                      # continue the latest interrupted run (or fold)
    torchrun --nproc_per_node=4 train.py          # several GPUs (or CPU processes), same script

The "# %%" cells run in order in an editor (VS Code, Spyder, Jupytext): imports, settings, load data, the model and
the loaders, train the model (train_fold per fold, which calls train_epoch), publish. Settings: below, or -h.
"""

# %% Import useful libraries
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import monai
import torch
from monai.data import DataLoader, ThreadDataLoader
from torch import nn

from nerveseg import distributed, memory
from nerveseg.checkpoint import save_torch
from nerveseg.data import describe_split, partition, read_manifest, split_into_folds
from nerveseg.ensemble import augmentation_for_training
from nerveseg.errors import exit_on_user_error
from nerveseg.model import (
    MODELS,
    PRESENCE_SIGNALS,
    build_model,
    encoder_start,
    model_config,
    network_channels,
    set_output_prior,
    start_encoder,
)
from nerveseg.postprocess import default_postprocessing
from nerveseg.progress import progress
from nerveseg.settings import Bounds, OneOf, parse_settings, settings_to_json
from nerveseg.training import runs, steps
from nerveseg.training.augment import AUGMENTATIONS, BatchAugment
from nerveseg.training.crossval import choose_on_validation, cross_validation_summary, validate_fold
from nerveseg.training.diskcache import CACHES, CachedPairs, DiskCache, MemoryCache, training_cache
from nerveseg.training.evaluation import evaluate
from nerveseg.training.tracking import TrainingLog, tensorboard_installed
from nerveseg.transforms import collate_keep_sizes, load_transforms, network_input

# %% Settings
# -----------------------------------------------------------------------------
# Data
DATA_DIR = "data/clean"  # the clean folder written by data_cleaning.py
IMAGE_HEIGHT = 128  # height the network sees (a multiple of 16); 128x176 keeps the 420:580 aspect
IMAGE_WIDTH = 176  # width the network sees (a multiple of 16)
VAL_FRACTION: Bounds(above=0, below=1) = 0.2  # share of subjects held out for validation (whole subjects, not frames)
FOLDS: Bounds(at_least=1) = 1  # cross-validation: this many models, each validating on 1/FOLDS of the subjects
SEED: Bounds(at_least=0, below=2**31) = 0  # seeds the split, the weights, the shuffling and the augmentation
# Augmentation
ROTATE_DEGREES: Bounds(at_least=0, at_most=180) = 10.0  # random rotation, up to this many degrees either way
SCALE: Bounds(at_least=0, below=1) = 0.1  # random zoom, up to this share in or out
SHIFT: Bounds(at_least=0, below=1) = 0.05  # random shift, up to this share of the image side
FLIP_PROB: Bounds(at_least=0, at_most=1) = 0.0  # chance of a left-right flip (off: it mirrors the anatomy)
INTENSITY_PROB: Bounds(at_least=0, at_most=1) = 0.3  # chance of each gamma, gain and noise change
AUGMENTATION: OneOf(AUGMENTATIONS) = "light"  # light (the above) or nnunet (adds zoom 0.7-1.4, blur, low resolution...)
# Model
MODEL: OneOf(MODELS) = "efficientnet-lite0"  # the network (nerveseg/model.py); efficientnet-*: an ImageNet encoder
ENCODER_WEIGHTS = "imagenet"  # an efficientnet-* encoder starts from: imagenet (its ImageNet weights), random, a file
FROZEN_STAGES: Bounds(at_least=0, at_most=7) = 3  # an ImageNet encoder's stem and first stages that keep their weights
DECODER_CHANNELS: Bounds(at_least=1) = (8, 16, 32, 64, 128)  # an ImageNet encoder's U-Net decoder: channels per level
CHANNELS: Bounds(at_least=1) = (16, 32, 64, 128, 256)  # a network from scratch (unet...): feature channels per level
STRIDES: Bounds(at_least=1) = (2, 2, 2, 2)  # UNet down-sampling per level (image sides: multiples of their product)
NUM_RES_UNITS: Bounds(at_least=0) = 2  # residual units per UNet block
DROPOUT: Bounds(at_least=0, below=1) = 0.0  # dropout in the UNet blocks
PRESENCE_WEIGHT: Bounds(at_least=0) = 0.5  # weight of the image-level "is the target there" loss (0: no presence head)
PRESENCE_BALANCE = False  # images with and without a target weigh the same in the presence loss (no prior learnt)
PRESENCE_SIGNAL: OneOf(PRESENCE_SIGNALS) = "head"  # presence from the head, or head+mask: averaged with the mask's top
TARGET_SHARE: Bounds(at_least=0, at_most=1) = 0.0  # each batch holds at least this share of images with a target
BALANCED_RULE = True  # the presence threshold (and the rest of the rule) is chosen as if half the images were empty
# Optimisation
BATCH_SIZE: Bounds(at_least=0) = 0  # training images per step and process (0: 128, fewer on small data sets, down to 8)
MICRO_BATCH_SIZE: Bounds(at_least=0) = 0  # images per forward/backward pass, gradients summed (0: 64 on CPU; GPU: all)
VAL_BATCH_SIZE: Bounds(at_least=1) = 64  # validation images per forward pass and per process
MAX_EPOCHS: Bounds(at_least=1) = 60  # passes over the training images (each at least MIN_STEPS_PER_EPOCH steps)
MIN_STEPS_PER_EPOCH: Bounds(at_least=1) = 32  # steps an epoch at least: a small set is passed over again
VAL_INTERVAL: Bounds(at_least=1) = 1  # validate every this many epochs (and always after the last one)
LEARNING_RATE: Bounds(above=0) = 2e-3  # Adam's peak learning rate (not scaled with the processes: docs/distributed.md)
WEIGHT_DECAY: Bounds(at_least=0) = 1e-5  # Adam's weight decay
WARMUP_EPOCHS: Bounds(at_least=0) = 2  # epochs of linear warm-up before the cosine decay
# Output
MODEL_PATH = "2D_Nerve_Segmentation.pt"  # the best model by validation Dice (with --folds: the ensemble) goes here
RUNS_DIR = "runs"  # each run writes a folder here: checkpoints, metrics.csv, curves.png, settings.json
RUN_NAME = ""  # the run's folder name ("" = the start time)
PICTURES = "Images"  # the training curves of the finished run are also drawn here
TENSORBOARD = True  # log curves and validation pictures for TensorBoard into the run's folder (when installed)
RESUME = False  # continue the run RUN_NAME (or the latest run) from its last completed epoch
# System
DEVICE = "auto"  # auto (GPU if there is one), cpu, cuda, cuda:N
NUM_WORKERS: Bounds(at_least=0) = 0  # data-loading worker processes (0: in the main process, best for cached data)
CACHE: OneOf(CACHES) = "auto"  # decoded images kept in memory or on disk (memory-mapped); auto: disk if memory is short
CACHE_DIR = ""  # where the disk cache is kept ("": DATA_DIR/training-cache, beside the clean copy, not your originals)
AMP = True  # mixed precision on CUDA (ignored on CPU)
COMPILE = False  # torch.compile the model (first epoch slower, then faster on GPU)
QUIET = False  # no progress: a bar in a terminal, else a line every 30 s of an epoch or a validation
# -----------------------------------------------------------------------------
exit_on_user_error("train.py")
run = runs.open_run(parse_settings(globals()))  # a new run, or with --resume the stopped run with its own settings
run_dir = run.folder
globals().update(run.settings)  # the constants above now hold this run's settings
settings = SimpleNamespace(**run.settings)  # the same, as one object for the functions below (settings.SEED)
runs.check_settings(run.settings)
runs.check_output_folders(run_dir, run.settings)
process = distributed.start(DEVICE)  # this process's rank and device (one process without torchrun)
if run.state is not None:
    process.print0(f"resuming {run_dir} (its own settings are used)")
memory.keep_freed_memory()  # big CPU tensors are reused, not handed back and faulted in again (see nerveseg/memory.py)
monai.data.set_track_meta(False)  # plain tensors: faster, and the metadata is not needed
saved_settings = settings_to_json(run.settings)

# %% Load data: the manifest of data_cleaning.py, split by subject (into FOLDS folds, each validating on its share)
pairs = read_manifest(DATA_DIR)
folds = split_into_folds(pairs, FOLDS, VAL_FRACTION, SEED)
if process.is_main:  # the data is readable: now the run's folder is made
    run_dir = runs.prepare_run_folder(run, settings_json=saved_settings, model_path=Path(MODEL_PATH))
run_dir = distributed.from_main(run_dir, process)  # its name, made by rank 0, is every process's (torchrun)
# The decoded, resized pairs: in each process's memory, or in one file on disk that every fold reads (CACHE)
disk_cache = training_cache(CACHE, pairs, (IMAGE_HEIGHT, IMAGE_WIDTH), data_dir=Path(DATA_DIR),
                            folder=Path(CACHE_DIR or Path(DATA_DIR) / "training-cache"), process=process,
                            quiet=QUIET or not process.is_main)

# %% The model and the loaders: each fold builds them anew (train_fold below calls these functions)
image_size = (IMAGE_HEIGHT, IMAGE_WIDTH)
has_presence = PRESENCE_WEIGHT > 0  # the model's image-level output (see nerveseg/model.py)
channels = network_channels(MODEL, CHANNELS, DECODER_CHANNELS)  # the levels' (from scratch) or the decoder's
config = model_config(channels, STRIDES, NUM_RES_UNITS, DROPOUT, presence=has_presence, model=MODEL,
                      presence_signal=PRESENCE_SIGNAL, encoder_weights=encoder_start(MODEL, ENCODER_WEIGHTS),
                      frozen_stages=FROZEN_STAGES)
default_rule = default_postprocessing(has_presence=has_presence)
preprocessing = {"image_size": list(image_size), "intensity": "0..255 scaled to 0..1", "reader": "PIL, grayscale"}
record = {"model_config": config, "preprocessing": preprocessing, "postprocessing": default_rule.as_dict(),
          "settings": saved_settings}  # how each checkpoint's model was made
loss_function = steps.SegmentationLoss(PRESENCE_WEIGHT, balance_presence=PRESENCE_BALANCE)  # Dice, CE, presence
augment = BatchAugment.preset(AUGMENTATION, rotate_degrees=ROTATE_DEGREES, scale=SCALE, shift=SHIFT,
                              flip_prob=FLIP_PROB, intensity_prob=INTENSITY_PROB)
tta = augmentation_for_training(scale=SCALE, shift=SHIFT, flip_prob=FLIP_PROB)  # what validation will judge


def make_model(config: dict, train_items: list[dict], *, seed: int, settings: SimpleNamespace,
               process: distributed.Process) -> tuple[nn.Module, nn.Module]:
    """The network of `config` with its presence output (nerveseg/model.py), starting at the training set's shares
    of target pixels and of images with a target: the plain model, and what trains (compiled with COMPILE, DDP)."""
    monai.utils.set_determinism(seed)
    raw_model = build_model(config)  # the plain model: its weights are saved and loaded
    start_encoder(raw_model, config, settings.ENCODER_WEIGHTS)  # an ImageNet encoder starts from what it learnt there
    raw_model = raw_model.to(process.device)
    present = 0.5 if settings.PRESENCE_BALANCE else sum(not i["empty"] for i in train_items) / len(train_items)
    set_output_prior(raw_model, foreground_fraction=sum(i["mask_fraction"] for i in train_items) / len(train_items),
                     present_fraction=present)
    model = torch.compile(raw_model, dynamic=False) if settings.COMPILE else raw_model
    return raw_model, nn.parallel.DistributedDataParallel(model) if process.world_size > 1 else model


def make_loaders(train_items: list[dict], val_items: list[dict], *, image_size: tuple[int, int],
                 disk_cache: DiskCache | None, settings: SimpleNamespace, process: distributed.Process
                 ) -> tuple[ThreadDataLoader, DataLoader]:
    """This process's share of the images, read and resized once (MONAI transforms, cached in memory, or read a
    batch at a time from `disk_cache`: the same bytes), in epochs whose order is a function of (SEED, epoch); small
    sets get a smaller batch and longer epochs (docs/pipeline.md)."""
    my_train_items = partition(train_items, process.rank, process.world_size, pad=True)
    my_val_items = partition(val_items, process.rank, process.world_size, pad=False)
    batch_size, epoch_length = steps.epoch_plan(len(my_train_items), batch_size=settings.BATCH_SIZE,
                                                min_steps=settings.MIN_STEPS_PER_EPOCH)
    quiet = settings.QUIET or not process.is_main
    if disk_cache is None:
        train_ds = MemoryCache(my_train_items, load_transforms(image_size, with_label=True),
                               desc="caching the training pairs", quiet=quiet, copy_cache=False)
        val_ds = MemoryCache(my_val_items, load_transforms(image_size, with_label=True, keep_full_label=True),
                             desc="caching the validation pairs", quiet=quiet)
    else:
        train_ds = CachedPairs(disk_cache, my_train_items, full_label=False)
        val_ds = CachedPairs(disk_cache, my_val_items, full_label=True)
    present = [not item["empty"] for item in my_train_items]
    sampler = steps.EpochSampler(len(train_ds), epoch_length, settings.SEED, batch_size=batch_size,
                                 target_share=settings.TARGET_SHARE, present=present)
    train_loader = ThreadDataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=settings.NUM_WORKERS,
                                    collate_fn=collate_keep_sizes)
    val_loader = DataLoader(val_ds, batch_size=settings.VAL_BATCH_SIZE, num_workers=settings.NUM_WORKERS,
                            collate_fn=collate_keep_sizes)
    return train_loader, val_loader


# %% Train the model: one per fold; each fold leaves its best model and that model's validation predictions
def train_epoch(model: nn.Module, loader: ThreadDataLoader, optimizer, scheduler, scaler, *, epoch: int,
                micro_batch: int, name: str, augment: BatchAugment, loss_function: nn.Module,
                settings: SimpleNamespace, process: distributed.Process) -> float:
    """One epoch of optimiser steps on batches augmented on the device; the mean training loss of all processes."""
    loader.sampler.set_epoch(epoch)  # the shuffle of this epoch
    generator = torch.Generator(process.device).manual_seed(steps.augmentation_seed(settings.SEED, epoch, process.rank))
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=process.device)
    bar = progress(loader, desc=f"{name}epoch {epoch}/{settings.MAX_EPOCHS}",
                   quiet=settings.QUIET or not process.is_main)
    for step, batch in enumerate(bar):
        images = network_input(batch["image"].to(process.device, non_blocking=True))
        labels = batch["label"].to(process.device, non_blocking=True).float()
        images, labels = augment(images, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = steps.backward_in_micro_batches(model, loss_function, images, labels, micro_batch=micro_batch,
                                               scaler=scaler, amp=settings.AMP)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(images)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return distributed.mean_of_sums(loss_sum, len(loader.sampler), process)


def train_fold(fold: int, train_items: list[dict], val_items: list[dict], *, run_dir: Path, resumed: bool, record: dict,
               loss_function: nn.Module, augment: BatchAugment, tta: dict, disk_cache: DiskCache | None,
               settings: SimpleNamespace, process: distributed.Process) -> tuple[dict, dict]:
    """Train one fold's model of `record` (from its last.pt when resumed), with what every fold shares; return its
    best checkpoint and its validation."""
    print0, quiet = process.print0, settings.QUIET or not process.is_main
    image_size = tuple(record["preprocessing"]["image_size"])
    fold_dir, name = runs.fold_folder(run_dir, fold, settings.FOLDS), runs.fold_name(fold, settings.FOLDS)
    if (kept := runs.completed_fold(fold_dir)) is not None:  # a resumed run keeps the folds it completed
        print0(f"{name}completed before: kept")
        return kept
    print0(f"{name}{describe_split(train_items, val_items)}")
    raw_model, model = make_model(record["model_config"], train_items, seed=settings.SEED + fold - 1,
                                  settings=settings, process=process)
    train_loader, val_loader = make_loaders(train_items, val_items, image_size=image_size, disk_cache=disk_cache,
                                            settings=settings, process=process)
    steps_per_epoch, batch_size = len(train_loader), train_loader.batch_size
    micro_batch = steps.micro_batch_size(settings.MICRO_BATCH_SIZE, batch_size, process.device)
    optimizer, scheduler, scaler = steps.make_optimizer(
        raw_model, learning_rate=settings.LEARNING_RATE, weight_decay=settings.WEIGHT_DECAY,
        warmup_steps=settings.WARMUP_EPOCHS * steps_per_epoch, total_steps=settings.MAX_EPOCHS * steps_per_epoch,
        device=process.device, amp=settings.AMP)
    start_epoch, history, best = runs.restore(fold_dir, resumed=resumed, model=raw_model,
                                              optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    if start_epoch:
        print0(f"{name}resuming after epoch {start_epoch} of {settings.MAX_EPOCHS}")
    if process.is_main:
        runs.prepare_fold_folder(fold_dir, history=history)
    log = TrainingLog(fold_dir, enabled=settings.TENSORBOARD and process.is_main and tensorboard_installed(),
                      pictured=val_loader.dataset)
    print0(name + runs.training_line(process, steps=steps_per_epoch, batch_size=batch_size, micro_batch=micro_batch,
                                     fold_dir=fold_dir, tensorboard_dir=run_dir.parent if log.enabled else None))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, settings.MAX_EPOCHS + 1):
            started = time.perf_counter()
            train_loss = train_epoch(model, train_loader, optimizer, scheduler, scaler, epoch=epoch,
                                     micro_batch=micro_batch, name=name, augment=augment, loss_function=loss_function,
                                     settings=settings, process=process)
            train_seconds = time.perf_counter() - started
            runs.check_finite(train_loss, epoch=epoch, fold_dir=fold_dir, learning_rate=settings.LEARNING_RATE)
            row = {"epoch": epoch, "train_loss": round(train_loss, 5), "lr": f"{scheduler.get_last_lr()[0]:.3g}",
                   "train_seconds": round(train_seconds, 3)}
            # Every VAL_INTERVAL epochs and after the last: validate, and keep the model if it is the best so far
            metrics = None
            if epoch % settings.VAL_INTERVAL == 0 or epoch == settings.MAX_EPOCHS:
                metrics, _ = evaluate(raw_model, val_loader, loss_function, process, amp=settings.AMP, quiet=quiet)
                row |= runs.validation_row(metrics)
                best = runs.best_so_far(best, raw_model, metrics, epoch=epoch, record=record, fold_dir=fold_dir,
                                        save=process.is_main)
            row["seconds"] = round(time.perf_counter() - started, 2)
            history.append(row)
            # Every epoch: what --resume needs to go on as if never stopped (last.pt), metrics.csv and the curves
            if process.is_main:
                runs.save_epoch(fold_dir, runs.last_state(raw_model, optimizer, scheduler, scaler, epoch=epoch,
                                                          history=history, settings=record["settings"]))
            log.epoch(row, images_per_second=len(train_loader.sampler) * process.world_size / train_seconds)
            # Every few epochs: TensorBoard's pictures (by the plain model: a compiled one would compile again)
            if log.wants_pictures(epoch, settings.MAX_EPOCHS):
                log.pictures(raw_model, epoch)
            print0(name + runs.epoch_line(row, settings.MAX_EPOCHS, metrics))
    except KeyboardInterrupt:
        print0(runs.interrupted(epoch, run_dir, fold=name))
        log.close()
        distributed.stop()
        sys.exit(130)
    except torch.cuda.OutOfMemoryError:
        raise runs.out_of_memory(epoch, fold_dir, micro_batch=micro_batch, batch_size=batch_size,
                                 image_size=image_size) from None
    log.close()
    validation = validate_fold(raw_model, val_loader, loss_function, process, fold=fold, best=best, val_items=val_items,
                               tta=tta, amp=settings.AMP, quiet=quiet)
    if process.is_main:
        save_torch(fold_dir / "validation.pt", validation)  # this fold is complete
    return best, validation


members, validations = [], []
for fold, (train_items, val_items) in enumerate(folds, start=1):
    best, validation = train_fold(fold, train_items, val_items, run_dir=run_dir, resumed=run.state is not None,
                                  record=record, loss_function=loss_function, augment=augment, tta=tta,
                                  disk_cache=disk_cache, settings=settings, process=process)
    members.append(best)
    validations.append(validation)

# %% Publish: the model (one split's best, or the folds' ensemble) with the rules chosen on all validation images
post, use_tta, tta_dice = choose_on_validation(validations, has_presence=has_presence, balanced=BALANCED_RULE)
summary = cross_validation_summary(validations, rule=post, use_tta=use_tta, default_rule=default_rule)
checkpoint = runs.published_model(members, summary, rule=post, tta={"use": use_tta, **tta, "validation_dice": tta_dice})
if process.is_main:
    runs.publish(checkpoint, summary, run_dir=run_dir, model_path=MODEL_PATH, pictures=Path(PICTURES))
process.print0(runs.describe_result(checkpoint, summary, default_rule=default_rule))
process.print0(f"Saved {MODEL_PATH}; curves and metrics in {run_dir}")
distributed.stop()
