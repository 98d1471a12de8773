"""Stage 2: train a MONAI UNet to segment the brachial plexus nerve, and save 2D_Nerve_Segmentation.pt.

    python train.py                               # the settings below
    python train.py --max-epochs 5 --batch-size 32
    python train.py --folds 5                     # 5-fold cross-validation: 5 models, predicted as an ensemble
    python train.py --resume                      # continue the latest interrupted run (or fold)
    torchrun --nproc_per_node=4 train.py          # several GPUs (or CPU processes), same script

Each "# %%" cell can be run on its own in an editor (VS Code, Spyder, Jupytext); the training of one fold is one
cell, a loop over the folds (one fold without --folds). Change a setting by editing it below, or on the command
line (-h lists them all).
"""

# %% Import useful libraries
import functools
import math
import signal
import sys
import time
from pathlib import Path

import monai
import torch
from monai.data import CacheDataset, DataLoader, ThreadDataLoader
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nerveseg import distributed, runs
from nerveseg.checkpoint import ensemble_checkpoint, make_checkpoint, read_torch_file, save_torch
from nerveseg.crossval import (
    choose_on_validation,
    cross_validation_summary,
    describe_cross_validation,
    fold_validation,
)
from nerveseg.data import describe_split, partition, read_manifest, split_into_folds
from nerveseg.ensemble import TestTimeAugmentation, augmentation_for
from nerveseg.errors import exit_on_user_error
from nerveseg.evaluation import evaluate
from nerveseg.files import write_csv, write_json
from nerveseg.memory import keep_freed_memory
from nerveseg.model import build_model, model_config, set_output_prior
from nerveseg.pictures import plot_cross_validation, plot_training_curves
from nerveseg.postprocess import default_postprocessing
from nerveseg.settings import parse_settings, settings_to_json
from nerveseg.tracking import TrainingLog, tensorboard_installed
from nerveseg.training import (
    EpochSampler,
    SegmentationLoss,
    automatic_batch_size,
    backward_in_micro_batches,
    micro_batch_size,
    warmup_cosine,
)
from nerveseg.transforms import BatchAugment, collate_keep_sizes, load_transforms, network_input

# %% Settings
# -----------------------------------------------------------------------------
# Data
DATA_DIR = "data/clean"  # the clean folder written by data_cleaning.py
IMAGE_HEIGHT = 128  # height the network sees (a multiple of 16); 128x176 keeps the 420:580 aspect
IMAGE_WIDTH = 176  # width the network sees (a multiple of 16)
VAL_FRACTION = 0.2  # share of subjects held out for validation (whole subjects, never single frames)
FOLDS = 1  # cross-validation: this many models, each validating on its 1/FOLDS of the subjects (5: the full recipe)
SEED = 0  # seeds the split, the weights, the shuffling and the augmentation
# Augmentation
ROTATE_DEGREES = 10.0  # random rotation, up to this many degrees either way
SCALE = 0.1  # random zoom, up to this share in or out
SHIFT = 0.05  # random shift, up to this share of the image side
FLIP_PROB = 0.0  # chance of a left-right flip (off: it mirrors the anatomy)
INTENSITY_PROB = 0.3  # chance of each gamma, gain and noise change
AUGMENTATION = "light"  # light (the above) or nnunet (adds nnU-Net 2-D zoom 0.7-1.4, blur, low resolution, contrast)
# Model
MODEL = "unet"  # the network: unet, unetplusplus, attentionunet, segresnet or dynunet (see nerveseg/model.py)
CHANNELS = (16, 32, 64, 128, 256)  # UNet feature channels per level
STRIDES = (2, 2, 2, 2)  # UNet down-sampling per level (image sides must be multiples of their product)
NUM_RES_UNITS = 2  # residual units per UNet block
DROPOUT = 0.0  # dropout in the UNet blocks
PRESENCE_WEIGHT = 0.5  # weight of the image-level "is the target there at all" loss (0: no presence output)
PRESENCE_BALANCE = False  # images with and without a target weigh the same in the presence loss (no prior learnt)
PRESENCE_SIGNAL = "head"  # presence from the head, or head+mask: averaged with the mask's largest probability
TARGET_SHARE = 0.0  # each batch holds at least this share of images with a target (nnU-Net: 0.33)
# Optimisation
BATCH_SIZE = 0  # training images per step and process (0: 128, fewer on small data sets, down to 16)
MICRO_BATCH_SIZE = 0  # images per forward/backward pass, gradients summed up to BATCH_SIZE (0: 64 on CPU, all on GPU)
VAL_BATCH_SIZE = 64  # validation images per forward pass and per process
MAX_EPOCHS = 60  # passes over the training images (each at least MIN_STEPS_PER_EPOCH steps)
MIN_STEPS_PER_EPOCH = 32  # a small data set is passed over again within an epoch until this many steps
VAL_INTERVAL = 1  # validate every this many epochs (and always after the last one)
LEARNING_RATE = 2e-3  # Adam's peak learning rate (not scaled with the number of processes: see docs/distributed.md)
WEIGHT_DECAY = 1e-5  # Adam's weight decay
WARMUP_EPOCHS = 2  # epochs of linear warm-up before the cosine decay
# Output
MODEL_PATH = "2D_Nerve_Segmentation.pt"  # the best model by validation Dice (with --folds: the ensemble) goes here
RUNS_DIR = "runs"  # each run writes a folder here: checkpoints, metrics.csv, curves.png, settings.json
RUN_NAME = ""  # the run's folder name ("" = the start time)
PICTURES = "Images"  # the training curves of the finished run are also drawn here
TENSORBOARD = True  # log curves and validation pictures for TensorBoard into the run's folder (when installed)
RESUME = False  # continue the run RUN_NAME (or the latest run) from its last completed epoch
# System
DEVICE = "auto"  # auto (GPU if there is one), cpu, cuda, cuda:N
NUM_WORKERS = 0  # data-loading worker processes (0: in the main process, best for cached data on few cores)
AMP = True  # mixed precision on CUDA (ignored on CPU)
COMPILE = False  # torch.compile the model (first epoch slower, then faster on GPU)
QUIET = False  # no progress bars (they are off anyway when the output is not a terminal)
# -----------------------------------------------------------------------------
exit_on_user_error("train.py")
settings = parse_settings(globals())
globals().update(settings)

# %% Start: processes, device, and the run (new, or resumed with its own settings)
process = distributed.start(DEVICE)
print0 = print if process.is_main else (lambda *args, **kwargs: None)
quiet = QUIET or not process.is_main
run = runs.open_run(settings)
settings, run_dir = run.settings, run.folder
globals().update(settings)
if run.state is not None:
    print0(f"resuming {run_dir} (its own settings are used)")
runs.check_settings(settings)
runs.check_output_folders(run_dir, settings)
image_size = (IMAGE_HEIGHT, IMAGE_WIDTH)
has_presence = PRESENCE_WEIGHT > 0  # the model's image-level output (see nerveseg/model.py)
default_rule = default_postprocessing(has_presence=has_presence)
config = model_config(CHANNELS, STRIDES, NUM_RES_UNITS, DROPOUT, presence=has_presence, model=MODEL,
                      presence_signal=PRESENCE_SIGNAL)
keep_freed_memory()  # big CPU tensors are reused, not handed back and faulted in again (see nerveseg/memory.py)
monai.data.set_track_meta(False)  # plain tensors: faster, and the metadata is not needed
preprocessing = {"image_size": list(image_size), "intensity": "0..255 scaled to 0..1", "reader": "PIL, grayscale"}
saved_settings = settings_to_json(settings)
tta = augmentation_for(saved_settings)  # the test-time augmentation that validation will judge

# %% Load data: the manifest of data_cleaning.py, split by subject (into FOLDS folds, each validating on its share)
items = read_manifest(DATA_DIR)
folds = split_into_folds(items, FOLDS, VAL_FRACTION, SEED)
if process.is_main:  # the data is readable: now the run's folder is made
    runs.prepare_run_folder(run, settings_json=saved_settings, model_path=Path(MODEL_PATH))
signal.signal(signal.SIGTERM, signal.default_int_handler)  # a job scheduler's stop is handled like Ctrl-C
# Dice over the whole batch plus cross-entropy (it does not collapse on the many empty masks), plus presence.
loss_function = SegmentationLoss(PRESENCE_WEIGHT, balance_presence=PRESENCE_BALANCE)
augment = BatchAugment.preset(
    AUGMENTATION, rotate_degrees=ROTATE_DEGREES, scale=SCALE, shift=SHIFT, flip_prob=FLIP_PROB,
    intensity_prob=INTENSITY_PROB
)

# %% Train one model per fold; each fold leaves its best model and that model's validation predictions
validations, members = [], []
for fold, (train_items, val_items) in enumerate(folds, start=1):
    fold_dir = runs.fold_folder(run_dir, fold, FOLDS)
    fold_name = f"fold {fold} of {FOLDS}, " if FOLDS > 1 else ""
    if (fold_dir / "validation.pt").is_file():  # a resumed run keeps the folds it completed
        validations.append(read_torch_file(fold_dir / "validation.pt"))
        members.append(read_torch_file(fold_dir / "best.pt"))
        print0(f"{fold_name}completed before: kept")
        continue
    state = runs.fold_state(fold_dir, resumed=run.state is not None)
    print0(f"{fold_name}{describe_split(train_items, val_items)}")

    # The model: MONAI's UNet with an image-level presence output (nerveseg/model.py), its outputs starting at the
    # training set's shares of target pixels and of images with a target
    monai.utils.set_determinism(SEED + fold - 1)
    raw_model = build_model(config)  # the plain model: its weights are saved and loaded
    set_output_prior(
        raw_model,
        foreground_fraction=sum(i["mask_fraction"] for i in train_items) / len(train_items),
        present_fraction=0.5 if PRESENCE_BALANCE else sum(not i["empty"] for i in train_items) / len(train_items),
    )
    raw_model.to(process.device)
    if state is not None:
        raw_model.load_state_dict(state["model"])
    model = torch.compile(raw_model, dynamic=False) if COMPILE else raw_model
    model = DistributedDataParallel(model) if process.world_size > 1 else model  # what trains

    # Loaders and MONAI transforms: decode and resize once (cached), augment whole batches on the device
    my_train_items = partition(train_items, process.rank, process.world_size, pad=True)  # cache only this share
    my_val_items = partition(val_items, process.rank, process.world_size, pad=False)
    # Small data sets get enough optimiser steps: a smaller automatic batch, and epochs of at least a set number
    # of steps (the competition's 4,500 training images: batch 128, 36 steps, one pass, as before).
    batch_size = BATCH_SIZE or automatic_batch_size(len(my_train_items), MIN_STEPS_PER_EPOCH)
    epoch_length = max(len(my_train_items), MIN_STEPS_PER_EPOCH * batch_size)
    show_progress = not quiet and sys.stderr.isatty()
    train_ds = CacheDataset(my_train_items, load_transforms(image_size, with_label=True), progress=show_progress,
                            copy_cache=False)
    val_ds = CacheDataset(my_val_items, load_transforms(image_size, with_label=True, keep_full_label=True),
                          progress=show_progress)
    # The sampler makes each epoch's order a function of (SEED, epoch): a resumed run sees the same batches.
    sampler = EpochSampler(len(train_ds), epoch_length, SEED, present=[not i["empty"] for i in my_train_items],
                           batch_size=batch_size, target_share=TARGET_SHARE)
    # ThreadDataLoader assembles the next batch in a background thread while the device works on this one.
    train_loader = ThreadDataLoader(
        train_ds, batch_size=batch_size, sampler=sampler, num_workers=NUM_WORKERS, collate_fn=collate_keep_sizes
    )
    val_loader = DataLoader(val_ds, batch_size=VAL_BATCH_SIZE, num_workers=NUM_WORKERS,
                            collate_fn=collate_keep_sizes)

    # Optimiser and learning-rate schedule
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(train_loader)
    micro_batch = micro_batch_size(MICRO_BATCH_SIZE, batch_size, process.device)
    schedule = functools.partial(warmup_cosine, warmup_steps=WARMUP_EPOCHS * steps_per_epoch,
                                 total_steps=MAX_EPOCHS * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_scaler = AMP and process.device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)  # only float16 needs loss scaling
    start_epoch, best, history = 0, None, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        best = read_torch_file(fold_dir / "best.pt") if (fold_dir / "best.pt").exists() else None
        torch.set_rng_state(state["rng"]["torch"])
        print0(f"{fold_name}resuming after epoch {start_epoch} of {MAX_EPOCHS}")
    if process.is_main:
        runs.prepare_fold_folder(fold_dir, history=history)
    log = TrainingLog(fold_dir, enabled=TENSORBOARD and process.is_main and tensorboard_installed())
    picture_batch = collate_keep_sizes([val_ds[i] for i in range(min(4, len(val_ds)))]) if log.enabled else None

    # Train the model
    print0(
        f"{fold_name}training on {process.device} x {process.world_size}, {steps_per_epoch} steps of {batch_size} "
        f"per epoch{f' ({micro_batch} images a pass)' if micro_batch < batch_size else ''}; writing {fold_dir}"
        f"{' (tensorboard --logdir ' + str(run_dir.parent) + ')' if log.enabled else ''}"
    )
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, MAX_EPOCHS + 1):
            started = time.perf_counter()
            sampler.set_epoch(epoch)  # the shuffle of this epoch
            generator = torch.Generator(process.device).manual_seed(
                SEED * 1000 + epoch * 64 + process.rank
            )  # its augmentation
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=process.device)
            bar = tqdm(train_loader, desc=f"{fold_name}epoch {epoch}/{MAX_EPOCHS}", leave=False, disable=quiet or None)
            for step, batch in enumerate(bar):
                images = network_input(batch["image"].to(process.device, non_blocking=True))
                labels = batch["label"].to(process.device, non_blocking=True).float()
                images, labels = augment(images, labels, generator)
                optimizer.zero_grad(set_to_none=True)
                loss = backward_in_micro_batches(
                    model, loss_function, images, labels, micro_batch=micro_batch, scaler=scaler, amp=AMP
                )
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach() * len(images)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            train_seconds = time.perf_counter() - started
            totals = distributed.all_reduce_sum(
                torch.stack([loss_sum.cpu(), torch.tensor(epoch_length, dtype=torch.float64)]), process
            )
            train_loss = float(totals[0] / totals[1])
            if not math.isfinite(train_loss):
                raise runs.diverged(train_loss, epoch, fold_dir, LEARNING_RATE)
            row = {
                "epoch": epoch,
                "train_loss": round(train_loss, 5),
                "lr": f"{scheduler.get_last_lr()[0]:.3g}",
                "train_seconds": round(train_seconds, 3),
            }
            if epoch % VAL_INTERVAL == 0 or epoch == MAX_EPOCHS:
                metrics, _ = evaluate(raw_model, val_loader, loss_function, process, amp=AMP, quiet=quiet)
                row |= runs.validation_row(metrics)
                if best is None or metrics["dice"] > best["metrics"]["dice"]:  # every process keeps it in memory
                    best = make_checkpoint(raw_model, model_config=config, preprocessing=preprocessing,
                                           postprocessing=default_rule.as_dict(), settings=saved_settings,
                                           epoch=epoch, metrics=metrics)
                    if process.is_main:
                        save_torch(fold_dir / "best.pt", best)
            row["seconds"] = round(time.perf_counter() - started, 2)
            history.append(row)
            if process.is_main:  # everything --resume needs to go on after this epoch as if never stopped
                save_torch(fold_dir / "last.pt", runs.last_state(raw_model, optimizer, scheduler, scaler, epoch=epoch,
                                                                 history=history, settings=saved_settings))
                write_csv(fold_dir / "metrics.csv", history, runs.METRICS_COLUMNS)
                plot_training_curves(history, fold_dir / "curves.png")
            log.epoch(row, images_per_second=epoch_length * process.world_size / train_seconds)
            if log.wants_pictures(epoch, MAX_EPOCHS):
                log.pictures(raw_model, picture_batch, epoch)  # not the compiled model: it would compile again
            print0(fold_name + runs.epoch_line(row, MAX_EPOCHS, metrics if "val_dice" in row else None))
    except KeyboardInterrupt:
        print0(runs.interrupted(epoch, run_dir, fold=fold_name))
        log.close()
        distributed.stop()
        sys.exit(130)
    except torch.cuda.OutOfMemoryError:
        raise runs.out_of_memory(epoch, fold_dir, micro_batch=micro_batch, batch_size=batch_size,
                                 image_size=image_size) from None
    log.close()

    # The fold's best model on its validation subjects, without and with test-time augmentation: what the
    # post-processing and the augmentation are chosen on, below
    raw_model.load_state_dict(best["state_dict"])
    _, plain = evaluate(raw_model, val_loader, loss_function, process, amp=AMP, tune=True, quiet=quiet)
    augmented_model = TestTimeAugmentation(raw_model, size=image_size, **tta)
    _, augmented = evaluate(augmented_model, val_loader, loss_function, process, amp=AMP, tune=True, quiet=quiet)
    validation = fold_validation(fold, best_epoch=best["epoch"], val_items=val_items, plain=plain, augmented=augmented)
    if process.is_main:
        save_torch(fold_dir / "validation.pt", validation)  # this fold is complete
    validations.append(validation)
    members.append(best)

# %% Choose the post-processing and test-time augmentation on all folds' validation images pooled; publish the
# model: the best model of the one split, or the ensemble of the fold models
post, use_tta, tta_dice = choose_on_validation(validations, has_presence=has_presence)
summary = cross_validation_summary(validations, rule=post, use_tta=use_tta, default_rule=default_rule)
pooled = summary["pooled"]
tta_record = {"use": use_tta, **tta, "validation_dice": tta_dice}
if FOLDS == 1:  # the best model of the split, with the chosen rule
    checkpoint = members[0] | {"postprocessing": post.as_dict(), "tta": tta_record}
    checkpoint["metrics"] = checkpoint["metrics"] | {
        "dice_raw": pooled["raw"]["dice"],
        "dice_postprocessed": pooled["postprocessed"]["dice"],
        "default_rule": pooled["raw"],
        "postprocessed": pooled["postprocessed"],
    }
    result = runs.result_summary(checkpoint["epoch"], pooled["raw"], pooled["postprocessed"], post,
                                 default_rule=default_rule, tta_dice=tta_dice, use_tta=use_tta)
else:  # the ensemble of the fold models
    checkpoint = ensemble_checkpoint(members, postprocessing=post.as_dict(), tta=tta_record,
                                     metrics={"cross_validation": summary})
    result = describe_cross_validation(summary, tta_dice=tta_dice, use_tta=use_tta)
if process.is_main:
    save_torch(MODEL_PATH, checkpoint)
    if FOLDS == 1:
        save_torch(run_dir / "best.pt", checkpoint)
        plot_training_curves(read_torch_file(run_dir / "last.pt")["history"], Path(PICTURES, "training_curves.png"))
    else:
        plot_cross_validation(summary, run_dir / "cross_validation.png")
        plot_cross_validation(summary, Path(PICTURES, "cross_validation.png"))
    write_json(run_dir / "summary.json", {
        "folds": FOLDS,
        "best_epochs": [member["epoch"] for member in members],
        "metrics": summary if FOLDS > 1 else checkpoint["metrics"],
        "postprocessing": post.as_dict(),
        "test_time_augmentation": tta_record,
        "model_path": MODEL_PATH,
    })
print0(result)
print0(f"Saved {MODEL_PATH}; curves and metrics in {run_dir}")
distributed.stop()
