"""The checkpoint format, written by train.py and read by predict.py (and anything else).

A checkpoint is a plain dict that torch.load(..., weights_only=True) reads: no pickled objects, so
loading a file from elsewhere cannot run code. The weights are the unwrapped model's state_dict, with
no "module." (DistributedDataParallel) or "_orig_mod." (torch.compile) prefixes.

Version 2 added the presence output (model_config["presence"]) and its rule
(postprocessing["presence_threshold"]). A version 1 checkpoint still loads, as a model without presence:
its config has no "presence" and its post-processing no presence threshold, so every image counts as
possibly holding a target, exactly as that model was tuned.

Version 3 added the ensemble of train.py --folds K: instead of "state_dict", "ensemble" lists the K fold models
({"fold", "epoch", "state_dict", "metrics"}), whose probabilities are averaged; and "tta", the test-time
augmentation and whether validation chose it ({"use", "zoom", "shift", "flip"}). A file without "tta" is
predicted without it.

Settings were added along the way (presence_weight, folds, model, ...): a checkpoint or a run's last.pt made
before one has not saved it. `upgrade` fills in, once at load, everything an earlier version lacks, with the
value that version worked with, so that the code reading a checkpoint never has to ask what is there.
"""

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nerveseg.ensemble import Ensemble, augmentation_for
from nerveseg.errors import UserError
from nerveseg.files import atomic_write
from nerveseg.model import build_model, size_multiple
from nerveseg.network_bounds import check_network_request
from nerveseg.postprocess import PostProcessing

FORMAT = "nerveseg-checkpoint"  # the format tag; model_config["model"] says which network (model.NETWORKS)
FORMATS = (FORMAT, "nerveseg-unet")  # every tag read: "nerveseg-unet" until 2026-12-07, whatever the network
VERSION = 3
ADDED_SETTINGS = {"presence_weight": 0.0, "min_steps_per_epoch": 1, "folds": 1, "model": "unet",  # what runs made
                  "presence_balance": False, "presence_signal": "head", "target_share": 0.0,  # before them used
                  "augmentation": "light", "scale": 0.1, "shift": 0.05, "flip_prob": 0.0, "encoder_weights": "imagenet",
                  "frozen_stages": 0}
ADDED_MODEL_CONFIG = {"model": "unet", "presence": False}  # before version 2: the UNet, without presence output


def upgrade(checkpoint: dict) -> dict:
    """A checkpoint, a run's last.pt or an export's metadata of any earlier version, with what later versions
    added: its saved settings (where it has them), its model_config and, for one that holds weights, its
    test-time augmentation (not chosen, the views its training settings imply)."""
    upgraded = dict(checkpoint)
    if isinstance(checkpoint.get("settings"), dict):
        upgraded["settings"] = {**ADDED_SETTINGS, **checkpoint["settings"]}
    if isinstance(checkpoint.get("model_config"), dict):
        upgraded["model_config"] = {**ADDED_MODEL_CONFIG, **checkpoint["model_config"]}
    if "tta" not in checkpoint and ("state_dict" in checkpoint or "ensemble" in checkpoint):
        upgraded["tta"] = {"use": False, **augmentation_for({**ADDED_SETTINGS, **(checkpoint.get("settings") or {})})}
    return upgraded


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_torch(path: str | Path, value: Any) -> None:
    """torch.save, atomically (temporary file, fsync, rename)."""
    with atomic_write(path, "wb") as file:
        try:
            torch.save(value, file)
        except RuntimeError as error:
            if isinstance(error.__context__, OSError):  # torch reports a failed write (full disk) as RuntimeError
                raise error.__context__ from None  # atomic_write turns it into a UserError that names the file
            raise


def make_checkpoint(
    model: nn.Module,
    *,
    model_config: dict,
    preprocessing: dict,
    postprocessing: dict,
    settings: dict,
    epoch: int,
    metrics: dict,
) -> dict:
    """Everything inference needs, and the record of how the model was made."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model_config,
        "state_dict": {name: value.detach().cpu().clone() for name, value in unwrap(model).state_dict().items()},
        "preprocessing": preprocessing,  # image_size (height, width) the network sees, intensity scaling
        "postprocessing": postprocessing,  # threshold, keep_largest, min_area_fraction, presence_threshold
        "settings": settings,
        "epoch": epoch,
        "metrics": metrics,
    }


def ensemble_checkpoint(members: list[dict], *, postprocessing: dict, tta: dict, metrics: dict) -> dict:
    """The checkpoint of the fold models' ensemble, from each fold's best checkpoint (make_checkpoint): their
    weights, epochs and validation figures, and what is shared (configuration, preprocessing, settings)."""
    first = members[0]
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_config": first["model_config"],
        "ensemble": [
            {"fold": fold, "epoch": member["epoch"], "state_dict": member["state_dict"], "metrics": member["metrics"]}
            for fold, member in enumerate(members, start=1)
        ],
        "preprocessing": first["preprocessing"],
        "postprocessing": postprocessing,
        "tta": tta,
        "settings": first["settings"],
        "epoch": None,  # each fold model has its own best epoch
        "metrics": metrics,
    }


def read_torch_file(path: str | Path) -> Any:
    """torch.load with weights_only=True, and a clear message for each way it can fail."""
    path = Path(path)
    if path.is_dir():
        inside = [path / name for name in ("best.pt", "2D_Nerve_Segmentation.pt") if (path / name).is_file()]
        raise UserError(f"{path} is a folder, not a checkpoint; pass the file"
                        + (f": {inside[0]}" if inside else " (a run's model is RUN_FOLDER/best.pt)"))
    if not path.is_file():
        raise UserError(f"{path} does not exist; train a model first (python train.py) or pass --checkpoint PATH")
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is already an ONNX model (export.py wrote it): predict with it (python predict.py "
                        f"--checkpoint {path}); to export again, pass the .pt checkpoint it was exported from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        if is_onnx_model(path):
            raise UserError(f"{path} is an ONNX model (as export.py writes), named like a checkpoint: rename it to "
                            f"{path.with_suffix('.onnx').name} and pass that to --checkpoint (predict.py runs it)"
                            ) from None
        if isinstance(error, pickle.UnpicklingError):
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            raise UserError(
                f"{path} holds Python objects that safe loading refuses (weights_only=True"
                f"{f', it refers to {refused[1]}' if refused else ''}), so it was not loaded and nothing in it was "
                "run. Only use checkpoints written by train.py."
            ) from None
        raise UserError(
            f"{path} is not a readable checkpoint (truncated or another kind of file: {error}); "
            "train again or copy it again"
        ) from None


def is_onnx_model(path: Path) -> bool:
    """Whether the file is an ONNX model: a graph of at least one node that the onnx package reads."""
    import onnx  # only here: reading a checkpoint does not need it
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(path, load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError):
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint of ours (read safely), which a new model may replace."""
    try:
        checkpoint = read_torch_file(path)
    except UserError:
        return False
    return isinstance(checkpoint, dict) and checkpoint.get("format") in FORMATS


def check_postprocessing(values: object, path: str | Path) -> None:
    """Refuse a stored post-processing rule that is unusable (see PostProcessing.from_dict), naming the file."""
    try:
        PostProcessing.from_dict(values)
    except ValueError as error:
        raise UserError(f"{path} has an unusable post-processing rule ({error}); it was damaged or edited: use the "
                        "file train.py wrote, or train again") from None


def check_request(checkpoint: dict, path: str | Path) -> None:
    """Refuse, before any network is built, a checkpoint whose configuration and image size ask for more memory than
    any model here needs (network_bounds.check_network_request) or whose image size does not suit its network."""
    preprocessing = checkpoint["preprocessing"]
    size = preprocessing.get("image_size") if isinstance(preprocessing, dict) else None
    try:
        check_network_request(checkpoint["model_config"], size)
    except ValueError as error:
        raise UserError(f"{path} asks for a network beyond what it may ({error}); it was damaged or edited: use the "
                        "file train.py wrote, or train again") from None
    multiple = size_multiple(checkpoint["model_config"])
    if not all(side >= multiple and side % multiple == 0 for side in size):
        raise UserError(
            f"{path}: its image size {size} does not suit its network (height and width must be multiples of "
            f"{multiple}); it was damaged or edited: use the file train.py wrote, or train again"
        )


def check_weights(weights: object, config: dict, path: str | Path) -> None:
    """Refuse weights that do not fit the network `config` describes, compared on a network without memory (on the
    meta device: shapes only) before the real one is built; and weights that are not all finite numbers."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the point here
            build_model(config).load_state_dict(weights)
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError, AssertionError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UserError(
            f"{path} does not match the model it describes ({'; '.join(lines[:2])[:400]}); it was damaged or edited: "
            "use the file train.py wrote, or train again"
        ) from None
    for name, value in weights.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{path} holds weights that are not numbers (NaN or infinite, in {name}): the training "
                            "that wrote it diverged, or the file was damaged. Use another checkpoint (an earlier "
                            "epoch's, or a run's best.pt), or train again")


RECORDS = ("model_config", "preprocessing", "postprocessing", "settings", "metrics", "tta")  # dicts, where present


def check_records(checkpoint: dict, path: str | Path) -> None:
    """Refuse a checkpoint (or an ONNX model's metadata) whose records are not dicts (settings edited to a list:
    it would fail after all the work), naming the first."""
    for key in RECORDS:
        if checkpoint.get(key) is not None and not isinstance(checkpoint[key], dict):
            raise UserError(f"{path}: its {key} is a {type(checkpoint[key]).__name__}, not a record of names and "
                            "values; it was damaged or edited: use the file train.py wrote, or train again")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", *, fold: int = 0) -> tuple[nn.Module, dict]:
    """The model (in eval mode, on `device`) and the checkpoint dict. For an ensemble checkpoint the model is the
    Ensemble of its fold models, or with `fold` k only the model of fold k."""
    checkpoint = read_torch_file(path)
    if isinstance(checkpoint, dict) and {"optimizer", "history", "settings"} <= checkpoint.keys():
        best = Path(path).parent / "best.pt"
        settings = checkpoint["settings"] if isinstance(checkpoint["settings"], dict) else {}
        published = settings.get("model_path")
        raise UserError(f"{path} is a training run's state for --resume (last.pt), not a model; predict with the "
                        f"run's best model{f' {best}' if best.is_file() else ' (best.pt, written at its end)'}"
                        + (f" or the published {published}" if published else ""))
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in FORMATS:
        raise UserError(f"{path} is not a checkpoint written by train.py (no '{FORMAT}' format tag)")
    if checkpoint.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer version of this project; update it to read the file")
    check_records(checkpoint, path)
    checkpoint = upgrade(checkpoint)
    weights = "ensemble" if "ensemble" in checkpoint else "state_dict"
    needed = ("model_config", weights, "preprocessing", "postprocessing", "epoch")
    missing = [key for key in needed if key not in checkpoint]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it was damaged or edited: use the file train.py wrote")
    members = checkpoint["ensemble"] if weights == "ensemble" else [{"fold": 0, "state_dict": checkpoint["state_dict"]}]
    if fold:
        folds = [member["fold"] for member in members]
        if fold not in folds:
            held = f"the models of folds {', '.join(map(str, folds))}" if weights == "ensemble" else "one model"
            raise UserError(f"{path} holds {held}, not fold {fold}; pass one of those to --fold, or 0 for all")
        members = [member for member in members if member["fold"] == fold]
    check_request(checkpoint, path)
    for member in members:
        check_weights(member.get("state_dict") if isinstance(member, dict) else None, checkpoint["model_config"], path)
    models = [build_model(checkpoint["model_config"]) for _ in members]
    for model, member in zip(models, members, strict=True):
        model.load_state_dict(member["state_dict"])
    check_postprocessing(checkpoint["postprocessing"], path)
    model = models[0] if len(models) == 1 else Ensemble(models)
    return model.to(device).eval(), checkpoint


def describe_model(checkpoint: dict, *, fold: int = 0) -> str:
    """Which model predicts, in words: "epoch 12", "the ensemble of 5 fold models", "the model of fold 2"."""
    if "ensemble" not in checkpoint:
        return f"epoch {checkpoint['epoch']}"
    if fold:
        return f"the model of fold {fold}"
    return f"the ensemble of {len(checkpoint['ensemble'])} fold models"
