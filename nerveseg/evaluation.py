"""Validation: loss and the Kaggle Dice at each image's original size, exact across processes."""

import contextlib

import torch
from torch import nn
from tqdm import tqdm

from nerveseg.distributed import Process, all_reduce_sum
from nerveseg.metrics import DiceTally, kaggle_dice
from nerveseg.postprocess import MIN_AREA_FRACTIONS, THRESHOLDS, tuning_scores, upsample
from nerveseg.transforms import network_input, unpack_mask


def collate_keep_sizes(batch: list[dict]) -> dict:
    """Stack the network inputs; keep full-size masks and names as lists (their sizes may differ)."""
    stacked = {key: torch.stack([item[key] for item in batch]) for key in ("image", "label") if key in batch[0]}
    lists = {key: [item[key] for item in batch] for key in batch[0] if key not in stacked}
    return stacked | lists


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_function: nn.Module,
    process: Process,
    amp: bool,
    tune: bool = False,
    quiet: bool = True,
) -> tuple[dict, torch.Tensor | None]:
    """Validation loss and Kaggle Dice (threshold 0.5, at original size) over every process's share.

    With tune=True, also the summed Dice of every post-processing choice (see postprocess.choose).
    Every process runs this on its own share; the sums are reduced, so all get the same figures.
    """
    model.eval()
    tally, loss_sum, batches = DiceTally(), 0.0, 0
    scores = torch.zeros(2, len(THRESHOLDS), len(MIN_AREA_FRACTIONS), dtype=torch.float64) if tune else None
    for batch in tqdm(loader, desc="validation", leave=False, disable=quiet or None):
        images = network_input(batch["image"].to(process.device))
        labels = batch["label"].to(process.device).float()
        with autocast(process.device, amp):
            logits = model(images)
        loss_sum += float(loss_function(logits.float(), labels)) * len(images)
        batches += len(images)
        sizes = [tuple(size.tolist()) for size in batch["original_size"]]
        full_size = upsample(torch.sigmoid(logits.float()), sizes)
        for probability, bits, size in zip(full_size, batch["full_label"], sizes, strict=True):
            probability, truth = probability.cpu(), unpack_mask(bits, size)
            tally.add(kaggle_dice((probability > 0.5)[None], truth[None]), ~truth.any().reshape(1))
            if tune:
                scores += tuning_scores(probability, truth)
    totals = all_reduce_sum(
        torch.cat([tally.as_tensor(), torch.tensor([loss_sum, batches], dtype=torch.float64)]), process
    )
    tally = DiceTally.from_tensor(totals[:4])
    metrics = tally.summary()
    metrics["loss"] = float(totals[4] / max(float(totals[5]), 1.0))
    metrics["all_empty_baseline"] = tally.count_empty / max(metrics["images"], 1)
    if tune:
        scores = all_reduce_sum(scores, process)
    model.train()
    return metrics, scores
