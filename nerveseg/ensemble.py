"""Averaging probabilities: over the models of the folds (an ensemble), and over a few shifted and zoomed views
of each image (test-time augmentation).

Both wrap models and are models themselves: called on images, they return (mask logits, presence logits)
like one network, the logits of the mean probabilities. So validation, prediction and the ONNX export run
them exactly as they run a single model.
"""

import torch
import torch.nn.functional as F
from torch import nn


def to_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)): the logits whose sigmoid gives `probabilities` back (kept finite)."""
    probabilities = probabilities.clamp(1e-7, 1 - 1e-7)
    return torch.log(probabilities) - torch.log1p(-probabilities)


class Ensemble(nn.Module):
    """The mean of several models' mask and presence probabilities (the fold models of train.py --folds)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = [member(images) for member in self.members]
        masks = torch.stack([torch.sigmoid(mask.float()) for mask, _ in outputs]).mean(0)
        if outputs[0][1] is None:
            return to_logits(masks), None
        presences = torch.stack([torch.sigmoid(presence.float()) for _, presence in outputs]).mean(0)
        return to_logits(masks), to_logits(presences)


def augmentation_views(*, zoom: float, shift: float, flip: bool) -> list[tuple[float, float, float, bool]]:
    """The views of test-time augmentation, as (zoom, shift_x, shift_y, mirrored): the image itself; zoomed in
    and out by `zoom`; shifted by `shift` of its sides down-right and up-left; and mirrored where training
    mirrored (flip). Small changes of the kind the probe makes, within what training augmented."""
    views = [(1.0, 0.0, 0.0, False)]
    if zoom > 0:
        views += [(1 + zoom, 0.0, 0.0, False), (1 - zoom, 0.0, 0.0, False)]
    if shift > 0:
        views += [(1.0, shift, shift, False), (1.0, -shift, -shift, False)]
    if flip:
        views += [(1.0, 0.0, 0.0, True)]
    return views


def affine_theta(zoom: float, shift_x: float, shift_y: float, mirrored: bool) -> torch.Tensor:
    """The (1, 2, 3) affine_grid matrix that shows the image zoomed, shifted (shares of its sides) and mirrored,
    and the one that takes a map of that view back to the image's own frame."""
    mirror = -1.0 if mirrored else 1.0
    forward = torch.tensor([[mirror / zoom, 0.0, -2 * shift_x], [0.0, 1 / zoom, -2 * shift_y]])
    matrix = forward[:, :2].inverse()
    back = torch.cat([matrix, -(matrix @ forward[:, 2:])], dim=1)
    return torch.stack([forward, back])


class TestTimeAugmentation(nn.Module):
    """A model's probabilities averaged over the views of augmentation_views, each mapped back to the image's
    own frame, for images of the network's `size` (height, width). Near the borders, where a view shows nothing
    of the image, only the views that do count."""

    __test__ = False  # not a pytest test class

    def __init__(self, model: nn.Module, *, size: tuple[int, int], zoom: float, shift: float, flip: bool) -> None:
        super().__init__()
        self.model = model
        self.views = augmentation_views(zoom=zoom, shift=shift, flip=flip)
        # Each view but the first (the image itself): its sampling grid, the grid back, and over all of them how
        # many views saw each point of the image. Constants, so that the ONNX export holds them as such.
        shifted = self.views[1:]
        grids = torch.zeros(0, *size, 2)
        if shifted:  # (forward, back) of each view
            thetas = torch.cat([affine_theta(*view) for view in shifted])
            grids = F.affine_grid(thetas, [len(thetas), 1, *size], align_corners=False)
        self.register_buffer("view_grids", grids[0::2], persistent=False)
        self.register_buffer("back_grids", grids[1::2], persistent=False)
        seen = F.grid_sample(torch.ones(len(shifted), 1, *size), grids[1::2], align_corners=False)
        self.register_buffer("coverage", 1 + seen.sum(0, keepdim=True), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        count = images.shape[0]
        mask_logits, presence_logits = self.model(images)
        mask_sum = torch.sigmoid(mask_logits.float())
        presence_sum = None if presence_logits is None else torch.sigmoid(presence_logits.float())
        for grid, back in zip(self.view_grids, self.back_grids, strict=True):
            shown = F.grid_sample(images, grid.expand(count, -1, -1, -1).to(images.dtype), mode="bilinear",
                                  padding_mode="zeros", align_corners=False)
            mask_logits, presence_logits = self.model(shown)
            mask_sum = mask_sum + F.grid_sample(torch.sigmoid(mask_logits.float()), back.expand(count, -1, -1, -1),
                                                mode="bilinear", padding_mode="zeros", align_corners=False)
            if presence_sum is not None:
                presence_sum = presence_sum + torch.sigmoid(presence_logits.float())
        masks = to_logits(mask_sum / self.coverage)
        return masks, None if presence_sum is None else to_logits(presence_sum / len(self.views))


def augmentation_for_training(*, scale: float, shift: float, flip_prob: float) -> dict:
    """The test-time augmentation of a model trained with these augmentation settings: zooms and shifts half as
    large as the largest that training used, and mirroring only where training mirrored."""
    return {"zoom": scale / 2, "shift": shift / 2, "flip": flip_prob > 0}


def augmentation_for(settings: dict) -> dict:
    """The test-time augmentation of a model whose checkpoint saved these (lower-case) training settings."""
    return augmentation_for_training(scale=settings["scale"], shift=settings["shift"], flip_prob=settings["flip_prob"])
