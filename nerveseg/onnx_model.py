"""Exporting a trained model to ONNX: the graph, and the metadata that makes it as complete as its checkpoint.

The ONNX graph maps images (N, 1, height, width), floats in [0, 1], to probabilities: the mask's
(N, 1, height, width) and, for a model with a presence output, the presence's (N,). The batch size is
free. What prediction needs besides the weights (the network's image size, the intensity scaling, the
post-processing and presence rule) and the record of the model (its configuration, epoch and validation
figures) are stored in the graph's metadata under METADATA_KEY, as JSON. export.py writes such a graph;
nerveseg/predictors.py runs it (and checks it against PyTorch).
"""

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

METADATA_KEY = "nerveseg"
OPSET = 17
CHECKPOINT_FIELDS = ("model_config", "preprocessing", "postprocessing", "epoch", "metrics")


class Probabilities(nn.Module):
    """A model whose outputs pass through the sigmoid: what the ONNX graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask_logits, presence_logits = self.model(images)
        if presence_logits is None:
            return (torch.sigmoid(mask_logits),)
        return torch.sigmoid(mask_logits), torch.sigmoid(presence_logits)


def onnx_graph(model: nn.Module, image_size: tuple[int, int], *, has_presence: bool) -> bytes:
    """The model (on the CPU, in eval mode) as an ONNX graph with a free batch size.

    PyTorch's TorchScript-based exporter (dynamo=False) is used: it needs no extra package and exports this
    network exactly; the newer exporter would add onnxscript for no gain here.
    """
    outputs = ["mask_probability", "presence_probability"] if has_presence else ["mask_probability"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter warns that it is deprecated and about instance norm in eval
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Probabilities(model).eval(), (torch.rand(1, 1, *image_size),), buffer, input_names=["image"],
            output_names=outputs, dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
            opset_version=OPSET, dynamo=False,
        )
    return buffer.getvalue()


def add_metadata(graph: bytes, metadata: dict) -> bytes:
    """The graph with `metadata` stored as JSON under METADATA_KEY."""
    import onnx  # only exporting needs it

    model = onnx.load_from_string(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    return model.SerializeToString()


def is_our_onnx(path: Path) -> bool:
    """Whether `path` is an ONNX model that export.py wrote (its metadata carries the checkpoint format's tag), which
    a new export may replace; any other file is a user's."""
    import onnx
    from google.protobuf.message import DecodeError

    from nerveseg.checkpoint import FORMATS

    try:
        if not path.is_file() or path.stat().st_size >= 2**31:  # protobuf's bound: no graph of ours is larger
            return False
        model = onnx.load_model(path, load_external_data=False)
    except (OSError, DecodeError):
        return False
    texts = [entry.value for entry in model.metadata_props if entry.key == METADATA_KEY]
    try:
        metadata = json.loads(texts[0]) if texts else None
    except ValueError:
        return False
    return isinstance(metadata, dict) and metadata.get("format") in FORMATS
