"""Validation: loss and the Kaggle Dice at each image's original size, exact across processes."""


import torch
from torch import nn

from nerveseg.device import autocast
from nerveseg.distributed import Process, all_reduce_sum
from nerveseg.metrics import DiceTally, kaggle_dice
from nerveseg.model import presence_probabilities
from nerveseg.postprocess import (
    MIN_AREA_FRACTIONS,
    PRESENCE_THRESHOLDS,
    THRESHOLDS,
    TUNING_PLANES,
    PostProcessing,
    default_postprocessing,
    full_size_masks,
    tuning_scores,
)
from nerveseg.progress import progress
from nerveseg.transforms import network_input, unpack_mask


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_function: nn.Module,
    process: Process,
    *,
    amp: bool,
    rule: PostProcessing | None = None,
    tune: bool = False,
    quiet: bool = True,
) -> tuple[dict, torch.Tensor | None]:
    """Validation loss and Kaggle Dice at original size, of the masks that `rule` makes (by default threshold
    0.5, and presence 0.5 where the model has a presence output), over every process's share.

    With tune=True, also the summed Dice of every post-processing choice (see postprocess.choose_postprocessing).
    Every process runs this on its own share; the sums are reduced, so all get the same figures.
    """
    model.eval()
    tally, loss_sum, batches = DiceTally(), 0.0, 0
    scores = None
    if tune:
        shape = (len(TUNING_PLANES), len(PRESENCE_THRESHOLDS), 2, len(THRESHOLDS), len(MIN_AREA_FRACTIONS))
        scores = torch.zeros(shape, dtype=torch.float64)
    for batch in progress(loader, desc="validation", quiet=quiet):
        images = network_input(batch["image"].to(process.device))
        labels = batch["label"].to(process.device).float()
        with autocast(process.device, amp):
            outputs = model(images)
        loss_sum += float(loss_function(outputs, labels)) * len(images)
        batches += len(images)
        mask_logits, presence_logits = outputs
        presences = presence_probabilities(presence_logits, len(images))
        rule = rule or default_postprocessing(has_presence=presence_logits is not None)
        sizes = [tuple(size.tolist()) for size in batch["original_size"]]
        full_size = full_size_masks(torch.sigmoid(mask_logits.float()), presences, sizes, rule)
        for (probability, mask), presence, bits, size in zip(full_size, presences, batch["full_label"], sizes,
                                                             strict=True):
            probability, truth = probability.cpu(), unpack_mask(bits, size)
            mask = torch.from_numpy(mask).bool()[None]  # any() of uint8 is uint8
            tally.add(kaggle_dice(mask[None], truth[None]), ~truth.any().reshape(1), ~mask.any().reshape(1))
            if tune:
                scores += tuning_scores(probability, presence, truth, has_presence=presence_logits is not None)
    totals = all_reduce_sum(
        torch.cat([tally.as_tensor(), torch.tensor([loss_sum, batches], dtype=torch.float64)]), process
    )
    tally = DiceTally.from_tensor(totals[:5])
    metrics = tally.summary()
    metrics["loss"] = float(totals[5] / max(float(totals[6]), 1.0))
    metrics["all_empty_baseline"] = tally.count_empty / max(metrics["images"], 1)
    if tune:
        scores = all_reduce_sum(scores, process)
    model.train()
    return metrics, scores


