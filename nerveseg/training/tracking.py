"""TensorBoard logging of a training run (PyTorch's SummaryWriter), written by the main process only.

Each epoch: the losses, the Kaggle Dice (all, empty truths, with a target), the presence accuracy, the
learning rate and the training speed; every PICTURE_INTERVAL epochs (and at the last) a few validation
images with the prediction (red) and the truth (green) over them. The event files go into the run's
folder:  tensorboard --logdir runs
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from nerveseg.transforms import collate_keep_sizes, network_input

PICTURE_INTERVAL = 5
SCALARS = {  # metrics.csv column -> TensorBoard tag
    "train_loss": "loss/train",
    "val_loss": "loss/validation",
    "val_dice": "kaggle_dice/all",
    "val_dice_empty": "kaggle_dice/empty_truths",
    "val_dice_nonempty": "kaggle_dice/with_target",
    "val_presence_accuracy": "presence/accuracy",
    "lr": "learning_rate",
}


def tensorboard_installed() -> bool:
    """Whether the tensorboard package (which SummaryWriter needs) is there."""
    return importlib.util.find_spec("tensorboard") is not None


def overlay(images: torch.Tensor, predictions: torch.Tensor, truths: torch.Tensor) -> torch.Tensor:
    """RGB pictures (N, 3, H, W) in [0, 1]: the image in grey, the prediction tinted red, the truth green."""
    grey = network_input(images.cpu()).expand(-1, 3, -1, -1).clone()
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    for mask, colour in ((predictions.cpu() > 0.5, red), (truths.cpu() > 0, green)):
        grey = torch.where(mask, 0.6 * grey + 0.4 * colour, grey)
    return grey


class TrainingLog:
    """A run's TensorBoard log, or nothing where it is off (`enabled` false, another rank, no tensorboard); its
    pictures show the first few images of the validation set `pictured`.

    The event file is opened with the first completed epoch: a run that stops before leaves none."""

    def __init__(self, run_dir: Path, *, enabled: bool, pictured: Sequence[dict] = ()) -> None:
        self.run_dir, self.enabled, self.writer = run_dir, enabled, None
        self.picture_batch = collate_keep_sizes([pictured[i] for i in range(min(4, len(pictured)))]) if enabled else {}

    def open(self) -> None:
        """Open the event file (once)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when it is used

            self.writer = SummaryWriter(log_dir=str(self.run_dir))

    def epoch(self, row: dict, *, images_per_second: float) -> None:
        """One epoch's figures (a metrics.csv row; blank cells are left out)."""
        if not self.enabled:
            return
        self.open()
        for column, tag in SCALARS.items():
            if row.get(column) not in ("", None):
                self.writer.add_scalar(tag, float(row[column]), row["epoch"])
        self.writer.add_scalar("speed/training_images_per_second", images_per_second, row["epoch"])
        self.writer.flush()

    def wants_pictures(self, epoch: int, last_epoch: int) -> bool:
        """Whether to draw the validation pictures after `epoch`."""
        return self.enabled and (epoch % PICTURE_INTERVAL == 0 or epoch == last_epoch)

    @torch.no_grad()
    def pictures(self, model: torch.nn.Module, epoch: int) -> None:
        """The model's predictions on the pictured validation images, drawn over them."""
        batch = self.picture_batch
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        mask_logits, _ = model(network_input(batch["image"].to(device)))
        model.train(was_training)
        pictures = overlay(batch["image"], torch.sigmoid(mask_logits.float()), batch["label"])
        self.open()
        self.writer.add_images("validation/prediction_red_truth_green", pictures, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
