"""Training pieces shared by train.py and the benchmarks: the loss, the batch size and epoch length that
follow the data, and one step's forward and backward passes.

A batch can go through the network in slices (micro-batches) whose gradients add up before the optimiser
steps, as nanoGPT's gradient accumulation does: the step sees BATCH_SIZE images while only one slice's
activations are held at a time. On the CPU, slices of 64 hold about half the memory at about the same speed
(the figures: docs/performance.md, "What changed").
"""

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nerveseg.device import autocast

CPU_MICRO_BATCH_SIZE = 64  # what MICRO_BATCH_SIZE = 0 (auto) means on the CPU
LARGEST_AUTOMATIC_BATCH = 128  # BATCH_SIZE = 0 (auto): this many images a step on large data sets ...
SMALLEST_AUTOMATIC_BATCH = 16  # ... fewer on small ones, down to this ...
SMALL_SET_BATCH = 8  # ... and on sets too small for that, batches of 8 and more steps (the same images an epoch)


class SegmentationLoss(nn.Module):
    """Dice over the whole batch plus cross-entropy on the mask, plus presence_weight x the cross-entropy of
    the image-level presence output against "does this mask hold any target pixel".

    The Dice is computed over the whole batch (batch=True): a per-image Dice is undefined on empty masks.
    With balance_presence, images with and without a target weigh half of the presence loss each (within the
    batch), so the presence output does not learn the training set's share of empty images as a prior. Outputs
    with a third element (deep supervision: coarser outputs' mask logits, finest first) add their mask losses,
    weighted 1/2, 1/4, ... of the final output's, as nnU-Net does, the weights summing to 1.
    """

    def __init__(self, presence_weight: float, *, balance_presence: bool = False) -> None:
        super().__init__()
        self.mask_loss = DiceCELoss(sigmoid=True, batch=True)
        self.presence_weight = presence_weight
        self.balance_presence = balance_presence

    def forward(self, outputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        mask_logits, presence_logits = outputs[:2]
        masks = [mask_logits, *(outputs[2] if len(outputs) > 2 else [])]
        weights = [0.5**level for level in range(len(masks))]
        loss = sum(w * self.mask_loss(m.float(), labels) for w, m in zip(weights, masks, strict=True)) / sum(weights)
        if presence_logits is not None and self.presence_weight > 0:
            present = labels.flatten(1).amax(dim=1)  # after augmentation: a target moved out of view is gone
            loss = loss + self.presence_weight * F.binary_cross_entropy_with_logits(
                presence_logits.float(), present, weight=self.presence_weights(present)
            )
        return loss

    def presence_weights(self, present: torch.Tensor) -> torch.Tensor | None:
        """Each image's weight in the presence loss: None (all 1), or with balance_presence half of the batch's
        weight to the images with a target and half to those without (all 1 where the batch holds one kind)."""
        if not self.balance_presence:
            return None
        count, with_target = len(present), present.sum()
        if with_target == 0 or with_target == count:
            return None
        return torch.where(present > 0, count / (2 * with_target), count / (2 * (count - with_target)))


def automatic_batch_size(train_images: int, steps_per_pass: int) -> int:
    """The batch for BATCH_SIZE = 0: 128, or fewer on a small data set so that one pass over it makes
    `steps_per_pass` optimiser steps (16 at least); on a set too small for 16 images a step, SMALL_SET_BATCH."""
    batch = min(LARGEST_AUTOMATIC_BATCH, train_images // steps_per_pass)
    return batch if batch >= SMALLEST_AUTOMATIC_BATCH else SMALL_SET_BATCH


def epoch_plan(train_images: int, *, batch_size: int, min_steps: int) -> tuple[int, int]:
    """The batch (BATCH_SIZE, 0: automatic_batch_size) and the images an epoch passes through: the whole set, or
    on a small set enough passes for `min_steps` steps. With batches of SMALL_SET_BATCH the steps grow so that an
    epoch holds as many images as min_steps batches of SMALLEST_AUTOMATIC_BATCH (at 10 epochs on 190-345 images,
    twice the steps of 8 learnt more than batches of 16: docs/results.md)."""
    automatic = not batch_size
    batch = batch_size or automatic_batch_size(train_images, min_steps)
    steps = min_steps * SMALLEST_AUTOMATIC_BATCH // batch if automatic and batch == SMALL_SET_BATCH else min_steps
    return batch, max(train_images, steps * batch)


class EpochSampler(torch.utils.data.Sampler[int]):
    """The training order of each epoch: `length` indices made of whole shuffled passes over `size` images
    (the last pass cut short), a function of (seed, epoch) only, so a resumed run sees the same batches.

    With length = size this is exactly DistributedSampler's single-process order (randperm seeded with
    seed + epoch). A small data set gets length > size: an epoch of at least a set number of steps.

    With target_share > 0 (and `present`, which images hold a target, and the batch size), each batch holds at
    least that share of images with a target: where it holds fewer, its last images without one are replaced by
    images with one drawn at random, as nnU-Net forces a third of each batch to contain foreground.
    """

    def __init__(
        self, size: int, length: int, seed: int, *, present: list[bool] | None = None, batch_size: int = 1,
        target_share: float = 0.0,
    ) -> None:
        self.size, self.length, self.seed, self.epoch = size, length, seed, 0
        self.with_target = [i for i, flag in enumerate(present or []) if flag]
        self.batch_size, self.target_share = batch_size, target_share

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order __iter__ gives."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        passes = [torch.randperm(self.size, generator=generator) for _ in range(math.ceil(self.length / self.size))]
        order = torch.cat(passes)[: self.length].tolist()
        if self.target_share > 0 and self.with_target:
            order = self.force_targets(order, generator)
        return iter(order)

    def force_targets(self, order: list[int], generator: torch.Generator) -> list[int]:
        """`order` with each batch holding at least target_share of images with a target."""
        with_target = set(self.with_target)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            missing = math.ceil(self.target_share * len(batch)) - sum(index in with_target for index in batch)
            empty_places = [place for place, index in enumerate(batch) if index not in with_target]
            for place in empty_places[::-1][: max(missing, 0)]:
                drawn = int(torch.randint(len(self.with_target), (1,), generator=generator))
                order[start + place] = self.with_target[drawn]
        return order

    def __len__(self) -> int:
        return self.length


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's augmentation on one process: a function of (seed, epoch, rank) only, so a resumed
    run augments as the uninterrupted one did, and each process differently."""
    return seed * 1000 + epoch * 64 + rank


def micro_batch_size(setting: int, batch_size: int, device: torch.device) -> int:
    """Images per forward/backward pass: `setting`, or for 0 (auto) 64 on the CPU and the whole batch elsewhere."""
    if setting == 0:
        setting = CPU_MICRO_BATCH_SIZE if device.type == "cpu" else batch_size
    return min(setting, batch_size)


def backward_in_micro_batches(
    model: nn.Module,
    loss_function: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    micro_batch: int,
    scaler: torch.amp.GradScaler,
    amp: bool,
) -> torch.Tensor:
    """Accumulate the gradients of a batch's loss, `micro_batch` images at a time; return the loss (detached).

    Each slice's loss is weighted by its share of the batch: the cross-entropy terms are the batch's mean, the
    Dice term the weighted mean of each slice's Dice (over all of its pixels). Under DDP the gradients are
    reduced across processes once, with the last slice.
    """
    total = torch.zeros((), device=images.device)
    for start in range(0, len(images), micro_batch):
        last = start + micro_batch >= len(images)
        skip_sync = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(images.device, amp):
                outputs = model(images[start : start + micro_batch])
            share = len(outputs[0]) / len(images)
            loss = loss_function(outputs, labels[start : start + micro_batch]) * share
            scaler.scale(loss).backward()
        total += loss.detach()
    return total


def make_optimizer(model: nn.Module, *, learning_rate: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, device: torch.device, amp: bool) -> tuple:
    """Adam, its learning-rate schedule (warmup_cosine, a step per optimiser step) and the loss scaler, which only
    float16 needs (mixed precision on a GPU without bfloat16)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = functools.partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps)
    use_scaler = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=use_scaler)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: a linear warm-up, then a cosine decay to zero at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
