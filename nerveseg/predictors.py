"""Running a trained model with PyTorch or with ONNX Runtime: the predictors, and the check of one against the other.

Both kinds of predictor are called the same way, `probabilities, presences = predictor(images)` with
8-bit images as the transforms load them, so predict.py does not care which one runs. An .onnx file
(written by export.py, nerveseg/onnx_model.py) carries its checkpoint's fields in its metadata. On the
2-core CPU ONNX Runtime's forward pass is 1.4 times PyTorch's, but predict.py end to end is no faster
(reading, resizing and writing share the same cores) and needs 0.2 GB more memory, so a .pt checkpoint of a
network trained from scratch runs with PyTorch unless --engine onnxruntime is asked for. The ImageNet encoders'
depthwise convolutions are another matter: ONNX Runtime runs them 3 times faster than PyTorch on the CPU, so a
.pt of one runs with ONNX Runtime there (see docs/performance.md).
"""

import json
from pathlib import Path

import torch
from torch import nn

from nerveseg.checkpoint import (
    FORMATS,
    VERSION,
    check_postprocessing,
    check_records,
    check_request,
    describe_model,
    load_checkpoint,
    upgrade,
)
from nerveseg.device import autocast
from nerveseg.ensemble import TestTimeAugmentation
from nerveseg.errors import UserError
from nerveseg.model import network_of, presence_probabilities
from nerveseg.onnx_model import CHECKPOINT_FIELDS, METADATA_KEY, onnx_graph
from nerveseg.transforms import network_input

ENGINES = ("auto", "torch", "onnxruntime")  # auto: ONNX Runtime for a .onnx, PyTorch for a .pt (but see choose_engine)
ONNX_TOLERANCE = 1e-4  # the largest difference of probabilities allowed between ONNX Runtime and PyTorch


def import_onnxruntime():  # noqa: ANN201 (the module)
    """onnxruntime, or a UserError that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "running an .onnx model needs ONNX Runtime: pip install onnxruntime (it is in requirements.txt), "
            "or predict with the .pt checkpoint"
        ) from None
    onnxruntime.set_default_logger_severity(3)  # errors only: its warnings are about graph details, not the user's
    return onnxruntime


class OnnxPredictor:
    """An ONNX graph run by ONNX Runtime on the CPU."""

    def __init__(self, graph: bytes | str, where: str) -> None:
        onnxruntime = import_onnxruntime()
        try:
            self.session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types, not exported under stable names
            reason = str(error).splitlines()[0][:200]
            raise UserError(f"{where} is not an ONNX model that ONNX Runtime can run ({reason}); export it again "
                            "with python export.py") from None
        names = [output.name for output in self.session.get_outputs()]
        if [item.name for item in self.session.get_inputs()] != ["image"] or names[:1] != ["mask_probability"]:
            raise UserError(f"{where} is an ONNX model of another kind (inputs and outputs are not image -> "
                            "mask_probability); export the model with python export.py")
        self.has_presence = "presence_probability" in names

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """For 8-bit images (N, 1, H, W): mask probabilities (N, 1, H, W) on the CPU, each image's presence."""
        outputs = self.session.run(None, {"image": network_input(images.cpu()).numpy()})
        presences = outputs[1].tolist() if self.has_presence else [1.0] * images.shape[0]
        return torch.from_numpy(outputs[0]), presences


class TorchPredictor:
    """A PyTorch model on its device (mixed precision on CUDA where asked)."""

    def __init__(self, model: nn.Module, device: torch.device, *, amp: bool) -> None:
        self.model, self.device, self.amp = model, device, amp

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """For 8-bit images (N, 1, H, W): mask probabilities on the model's device, each image's presence."""
        with autocast(self.device, self.amp):
            mask_logits, presence_logits = self.model(network_input(images.to(self.device)))
        return torch.sigmoid(mask_logits.float()), presence_probabilities(presence_logits, images.shape[0])


def load_onnx(path: Path) -> tuple[OnnxPredictor, dict]:
    """The predictor of an exported .onnx file and its metadata (checked like a checkpoint's, and against the graph:
    metadata copied from another model would fail mid-run)."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an ONNX model; pass the .onnx file that export.py wrote")
    if not path.is_file():
        raise UserError(f"{path} does not exist; export a model first (python export.py) or pass --checkpoint PATH")
    predictor = OnnxPredictor(path.read_bytes(), str(path))
    text = predictor.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        metadata = json.loads(text) if text else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") not in FORMATS or not set(CHECKPOINT_FIELDS) <= set(
        metadata
    ):
        raise UserError(f"{path} was not written by export.py (its metadata lacks the image size and the "
                        "post-processing); export the model with python export.py")
    if metadata.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer version of this project; update it to read the file")
    check_records(metadata, path)
    check_request(metadata, path)  # the bound a checkpoint is held to, before any image is resized to its size
    check_postprocessing(metadata["postprocessing"], path)
    check_graph_against_metadata(predictor, metadata, path)
    return predictor, upgrade(metadata)


def check_graph_against_metadata(predictor: OnnxPredictor, metadata: dict, path: Path) -> None:
    """Refuse a graph whose image size or presence output is not the one its metadata describes."""
    preprocessing, config = metadata["preprocessing"], metadata["model_config"]
    size = preprocessing.get("image_size") if isinstance(preprocessing, dict) else None
    presence = bool(config.get("presence")) if isinstance(config, dict) else False
    shapes = [item.shape[1:] for item in (predictor.session.get_inputs()[0], predictor.session.get_outputs()[0])]
    if any(shape != [1, *(size or [])] for shape in shapes) or predictor.has_presence != presence:
        graph = f"images {'x'.join(map(str, shapes[0]))}, {'with' if predictor.has_presence else 'without'} a presence"
        described = f"images {'x'.join(map(str, [1, *(size or [])]))}, {'with' if presence else 'without'} a presence"
        raise UserError(f"{path}: its graph takes {graph} output, but its metadata describes {described} output: the "
                        "metadata was copied from another model. Export the model again with python export.py")


def max_difference(first: "OnnxPredictor | TorchPredictor", second: "OnnxPredictor | TorchPredictor",
                   images: torch.Tensor) -> float:
    """The largest difference between two predictors' probabilities (mask and presence) on `images`."""
    (masks_a, presences_a), (masks_b, presences_b) = first(images), second(images)
    masks = (masks_a.cpu() - masks_b.cpu()).abs().max().item()
    presences = (torch.tensor(presences_a) - torch.tensor(presences_b)).abs().max().item()
    return max(masks, presences)


def check_onnx_matches_torch(onnx: OnnxPredictor, torch_predictor: TorchPredictor, images: torch.Tensor, *,
                             what: str, tolerance: float = ONNX_TOLERANCE) -> float:
    """The largest difference of ONNX Runtime's probabilities from PyTorch's on `images`; a UserError where it
    exceeds `tolerance`, the message ending with `what` (what was checked, and what follows)."""
    difference = max_difference(onnx, torch_predictor, images)
    if difference > tolerance:
        raise UserError(f"ONNX Runtime's probabilities differ from PyTorch's by {difference:.2g} (more than "
                        f"{tolerance:g}) {what}")
    return difference


def prediction_model(path: str | Path, device: torch.device, *, fold: int, tta: str) -> tuple[nn.Module, dict]:
    """The model that predicts from a .pt checkpoint (its ensemble, or with `fold` k one fold's model), with
    test-time augmentation where `tta` says so ("auto": where validation chose it, "true", "false"); and the
    checkpoint, its "tta" saying whether augmentation is on and "predicting_with" what predicts, in words."""
    model, checkpoint = load_checkpoint(path, device, fold=fold)
    record = checkpoint["tta"]
    use_tta = record["use"] if tta == "auto" else tta == "true"
    described = describe_model(checkpoint, fold=fold)
    if use_tta:
        size = tuple(checkpoint["preprocessing"]["image_size"])
        model = TestTimeAugmentation(model, size=size, zoom=record["zoom"], shift=record["shift"], flip=record["flip"])
        model = model.to(device).eval()
        described += f", with test-time augmentation ({len(model.views)} views)"
    return model, checkpoint | {"tta": record | {"use": use_tta}, "predicting_with": described}


def choose_engine(engine: str, config: dict, device: torch.device) -> str:
    """The engine that runs a .pt checkpoint: the one asked for; for "auto", ONNX Runtime where the model has an
    ImageNet encoder and runs on the CPU (3 times faster there, docs/performance.md), PyTorch otherwise."""
    if engine != "auto":
        return engine
    return "onnxruntime" if device.type == "cpu" and network_of(config).encoder else "torch"


def load_predictor(path: str | Path, device: torch.device, *, engine: str, amp: bool, fold: int = 0,
                   tta: str = "auto") -> tuple["OnnxPredictor | TorchPredictor", dict, str]:
    """The predictor for a .pt checkpoint (see prediction_model) or an exported .onnx file, its checkpoint fields
    (preprocessing, postprocessing, epoch, ...), and the engine chosen.

    engine "auto": ONNX Runtime for a .onnx file; for a .pt, choose_engine's. ONNX Runtime for a .pt exports the
    model in memory and checks it against PyTorch on a few images first.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if engine == "torch" or device.type != "cpu":
            raise UserError(f"{path} is an ONNX model: it runs with ONNX Runtime on the CPU (--engine auto or "
                            "onnxruntime, --device cpu); for PyTorch or a GPU, predict with the .pt checkpoint")
        if fold or tta != "auto":
            raise UserError(f"{path} is an ONNX model: its ensemble and test-time augmentation were fixed when it "
                            "was exported; leave --fold 0 and --tta auto, or predict with the .pt checkpoint")
        predictor, metadata = load_onnx(path)
        return predictor, metadata, "onnxruntime"
    model, checkpoint = prediction_model(path, device, fold=fold, tta=tta)
    torch_predictor = TorchPredictor(model, device, amp=amp)
    if choose_engine(engine, checkpoint["model_config"], device) != "onnxruntime":
        return torch_predictor, checkpoint, "torch"
    if device.type != "cpu":
        raise UserError("--engine onnxruntime runs on the CPU; pass --device cpu, or --engine torch for the GPU")
    image_size = tuple(checkpoint["preprocessing"]["image_size"])
    has_presence = checkpoint["model_config"]["presence"]
    predictor = OnnxPredictor(onnx_graph(model, image_size, has_presence=has_presence), str(path))
    generator = torch.Generator().manual_seed(0)
    check_images = torch.randint(0, 256, (4, 1, *image_size), dtype=torch.uint8, generator=generator)
    check_onnx_matches_torch(predictor, torch_predictor, check_images,
                             what=f"for {path}; predict with --engine torch (and report this line)")
    return predictor, checkpoint, "onnxruntime"
