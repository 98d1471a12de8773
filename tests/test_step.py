"""nerveseg/training/steps.py: the loss, the batch and epoch that follow the data, the training step's micro-batches;
and keeping freed memory for reuse."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from nerveseg.model import build_model, model_config
from nerveseg.training.steps import (
    EpochSampler,
    SegmentationLoss,
    automatic_batch_size,
    backward_in_micro_batches,
    epoch_plan,
    micro_batch_size,
)
from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("setting", "batch", "device", "expected"),
    [(0, 128, "cpu", 64), (0, 128, "cuda", 128), (0, 8, "cpu", 8), (200, 128, "cpu", 128), (3, 8, "cuda", 3)],
)
def test_micro_batch_size_auto_and_explicit(setting, batch, device, expected):
    assert micro_batch_size(setting, batch, torch.device(device)) == expected


class MaskLoss(torch.nn.Module):
    """A MONAI loss on the mask logits of the model's (mask, presence) output."""

    def __init__(self, loss_function: torch.nn.Module) -> None:
        super().__init__()
        self.loss_function = loss_function

    def forward(self, outputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(outputs[0], labels)


@pytest.mark.parametrize(
    ("train_images", "expected"),
    [(4518, (128, 4518)), (100_000, (128, 100_000)), (544, (17, 544)), (512, (16, 512)), (511, (8, 512)),
     (354, (8, 512)), (40, (8, 512)), (1024, (32, 1024))],  # full set, huge, small sets, tiny ones
)
def test_the_automatic_batch_gives_small_sets_enough_steps(train_images, expected):
    assert epoch_plan(train_images, batch_size=0, min_steps=32) == expected
    assert automatic_batch_size(train_images, steps_per_pass=32) == expected[0]


def test_a_batch_size_given_keeps_its_steps():
    assert epoch_plan(354, batch_size=8, min_steps=32) == (8, 354)
    assert epoch_plan(354, batch_size=16, min_steps=32) == (16, 512)


def test_an_epoch_of_a_small_set_is_whole_shuffled_passes_that_repeat_exactly():
    sampler = EpochSampler(size=10, length=25, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert len(first) == len(sampler) == 25
    assert sorted(first[:10]) == sorted(first[10:20]) == list(range(10)) and first[:10] != first[10:20]
    assert len(set(first[20:])) == 5  # the third pass, cut short
    assert list(sampler) == first  # a function of (seed, epoch): --resume sees the same batches
    sampler.set_epoch(2)
    assert list(sampler) != first
    one_pass = EpochSampler(size=10, length=10, seed=3)
    one_pass.set_epoch(1)  # a large set: one pass, DistributedSampler's order for one process
    distributed = torch.utils.data.DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=3)
    distributed.set_epoch(1)
    assert list(one_pass) == list(distributed)


def test_each_batch_holds_the_target_share_and_the_order_still_repeats():
    present = [index % 5 == 0 for index in range(40)]  # 8 of 40 images hold a target
    sampler = EpochSampler(size=40, length=64, seed=2, present=present, batch_size=8, target_share=0.33)
    sampler.set_epoch(1)
    order = list(sampler)
    assert len(order) == 64 and list(sampler) == order
    batches = [order[start : start + 8] for start in range(0, 64, 8)]
    assert all(sum(present[index] for index in batch) >= 3 for batch in batches)  # ceil(0.33 x 8)
    plain = EpochSampler(size=40, length=64, seed=2)
    plain.set_epoch(1)
    kept = [mine == theirs for mine, theirs in zip(order, plain, strict=True)]
    assert sum(kept) >= 64 - 3 * 8 and all(keep or present[index] for keep, index in zip(kept, order, strict=True))
    unforced = EpochSampler(size=40, length=64, seed=2, present=present, batch_size=8, target_share=0.0)
    unforced.set_epoch(1)
    assert list(unforced) == list(plain)


def test_the_balanced_presence_loss_weighs_both_kinds_of_image_alike():
    labels = torch.zeros(4, 1, 8, 8)
    labels[0, :, 2:4, 2:4] = 1  # one image of four holds a target
    mask_logits, presence_logits = torch.zeros(4, 1, 8, 8), torch.tensor([-1.0, 0.5, -2.0, 1.0])
    present = torch.tensor([1.0, 0.0, 0.0, 0.0])
    each = torch.nn.functional.binary_cross_entropy_with_logits(presence_logits, present, reduction="none")
    mask_only = SegmentationLoss(0.0)((mask_logits, presence_logits), labels)
    plain = SegmentationLoss(1.0)((mask_logits, presence_logits), labels) - mask_only
    balanced = SegmentationLoss(1.0, balance_presence=True)((mask_logits, presence_logits), labels) - mask_only
    assert float(plain) == pytest.approx(float(each.mean()), rel=1e-5)
    assert float(balanced) == pytest.approx(float(0.5 * each[0] + 0.5 * each[1:].mean()), rel=1e-5)
    # The best constant presence of this batch: the share of targets (0.25) plainly, even odds when balanced.
    logits = torch.linspace(-3, 3, 601)
    losses = [float(SegmentationLoss(1.0, balance_presence=True)((mask_logits, logit.repeat(4)), labels))
              for logit in logits]
    assert abs(float(logits[int(np.argmin(losses))])) < 0.02
    one_kind = torch.ones(4, 1, 8, 8)  # a batch of one kind: the plain mean
    assert float(SegmentationLoss(1.0, balance_presence=True)((mask_logits, presence_logits), one_kind)) == (
        pytest.approx(float(SegmentationLoss(1.0)((mask_logits, presence_logits), one_kind)), rel=1e-6))


def test_deep_supervision_outputs_weigh_half_as_much_at_each_coarser_level():
    torch.manual_seed(0)
    labels = (torch.rand(2, 1, 8, 8) > 0.8).float()
    final, finer, coarser = (torch.randn(2, 1, 8, 8) for _ in range(3))
    loss = SegmentationLoss(0.0)
    deep = float(loss((final, None, [finer, coarser]), labels))
    expected = (float(loss((final, None), labels)) + 0.5 * float(loss((finer, None), labels))
                + 0.25 * float(loss((coarser, None), labels))) / 1.75
    assert deep == pytest.approx(expected, rel=1e-5)


def gradients_and_loss(loss_function, images, labels, micro_batch: int) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    model = build_model(model_config((4, 8, 16), (2, 2), 1, 0.0, presence=False))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = backward_in_micro_batches(
        model, loss_function, images, labels, micro_batch=micro_batch, scaler=scaler, amp=False
    )
    return [p.grad.clone() for p in model.parameters()], float(loss)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(8, 1, 32, 48, generator=generator)
    labels = (torch.rand(8, 1, 32, 48, generator=generator) > 0.8).float()
    labels[::2] = 0  # empty masks too
    return images, labels


def test_slices_of_a_per_image_loss_give_the_whole_batch_gradient(batch):
    """With a loss that is a mean over images (instance norm keeps images apart), slicing changes nothing."""
    loss_function = MaskLoss(DiceCELoss(sigmoid=True, batch=False))
    whole, whole_loss = gradients_and_loss(loss_function, *batch, micro_batch=8)
    sliced, sliced_loss = gradients_and_loss(loss_function, *batch, micro_batch=3)  # slices of 3, 3 and 2
    assert sliced_loss == pytest.approx(whole_loss, rel=1e-6)
    for a, b in zip(whole, sliced, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_batch_dice_becomes_the_weighted_mean_of_each_slices_dice(batch):
    images, labels = batch
    loss_function = MaskLoss(DiceCELoss(sigmoid=True, batch=True))
    _, sliced_loss = gradients_and_loss(loss_function, images, labels, micro_batch=3)
    torch.manual_seed(0)
    model = build_model(model_config((4, 8, 16), (2, 2), 1, 0.0, presence=False))
    with torch.no_grad():
        slices = [
            loss_function(model(images[i : i + 3]), labels[i : i + 3]) * len(labels[i : i + 3]) / 8 for i in (0, 3, 6)
        ]
        whole = float(loss_function(model(images), labels))
    assert sliced_loss == pytest.approx(float(sum(slices)), rel=1e-5)
    assert abs(sliced_loss - whole) > 1e-4  # the documented difference: Dice over each slice, not the batch


FAULTS_OF_A_SECOND_BATCH = textwrap.dedent(
    """
    import resource, sys
    import torch
    from nerveseg.memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults_of_one_batch():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        activations = [torch.ones(16 << 20) for _ in range(3)]  # three 64 MB tensors, then freed
        del activations
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(10):  # the heap grows over the first few (aligned blocks do not fit their freed places)
        faults_of_one_batch()
    print(faults_of_one_batch())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_OF_A_SECOND_BATCH, mode], cwd=ROOT, capture_output=True, text=True
            ).stdout
        )
        for mode in ("default", "keep")
    }
    pages = 3 * (64 << 20) // 4096
    assert faults["default"] > 0.9 * pages  # every page of every batch, again
    assert faults["keep"] < 0.05 * pages, faults


def test_the_presence_loss_follows_the_augmented_mask_and_its_weight():
    from nerveseg.training.steps import SegmentationLoss

    labels = torch.zeros(2, 1, 8, 8)
    labels[1, :, 2:4, 2:4] = 1
    mask_logits = torch.zeros(2, 1, 8, 8)
    presence_logits = torch.tensor([-3.0, 3.0])  # right on both
    plain = SegmentationLoss(0.0)((mask_logits, presence_logits), labels)
    weighted = SegmentationLoss(0.5)((mask_logits, presence_logits), labels)
    wrong = SegmentationLoss(0.5)((mask_logits, -presence_logits), labels)
    expected = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(presence_logits, torch.tensor([0.0, 1.0]))
    assert float(weighted - plain) == pytest.approx(float(expected), rel=1e-5)
    assert float(wrong) > float(weighted) + 1
    assert float(SegmentationLoss(0.5)((mask_logits, None), labels)) == pytest.approx(float(plain))
