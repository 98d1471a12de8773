"""DICOM SEG out: predict.py's masks of a DICOM input as one DICOM Segmentation object that references it, frame for
frame, so that a PACS viewer, OHIF or 3D Slicer shows the outline over the scan (predict.py --dicom-seg).

highdicom writes the object (patient, study, segment description, references). Ultrasound cine loops have no
Frame of Reference, and highdicom builds a Segmentation of such a source for one frame only; so the object is
built for the first frame and given every frame after it: its bits, and a per-frame reference to the source's
frame of the same number. highdicom and pydicom read it back frame for frame (tests/test_dicom_outputs.py).
"""

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nerveseg.dicom import require_pydicom
from nerveseg.errors import UserError

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage: the single-frame class highdicom builds from
SERIES_NUMBER = 9001  # the segmentations' series, after the scanner's own


def require_highdicom() -> object:
    """highdicom, or a UserError naming the extra to install."""
    require_pydicom()
    try:
        import highdicom
    except ImportError:
        raise UserError('--dicom-seg needs the "dicom" extra: pip install "nerveseg[dicom]" (highdicom)') from None
    return highdicom


def segmentation(source_path: str | Path, masks: np.ndarray, *, software: str, series_uid: str,
                 instance_number: int, label: str = "nerve") -> object:
    """A DICOM Segmentation (a highdicom Segmentation, a pydicom Dataset) of the DICOM file at `source_path`:
    `masks` (frames, rows, columns) bool, one a source frame, as a binary segment called `label`."""
    hd = require_highdicom()
    pydicom = require_pydicom()
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if masks.shape != (frames, source.Rows, source.Columns):
        raise ValueError(f"{masks.shape[0]} masks of {masks.shape[1:]} for {frames} frames of "
                         f"{(source.Rows, source.Columns)}")
    first = copy.deepcopy(source)
    if "NumberOfFrames" in first:  # built as one frame (see the module's docstring), then given the others
        del first.NumberOfFrames
        first.SOPClassUID = US_IMAGE
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("3057000", "SCT", "Nerve"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="nerveseg", version=software, family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence")))
    seg = hd.seg.Segmentation(
        source_images=[first], pixel_array=masks[:1].astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=series_uid, series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=instance_number, manufacturer="nerveseg", manufacturer_model_name="nerveseg predict.py",
        software_versions=software, device_serial_number="none", omit_empty_frames=False)
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if measures and "SliceThickness" not in measures[0]:  # 2-D ultrasound has none, and readers require one
        del seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    if frames > 1:
        template = seg.PerFrameFunctionalGroupsSequence[0]
        per_frame = []
        for number in range(1, frames + 1):
            item = copy.deepcopy(template)
            item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber = number
            per_frame.append(item)
        seg.PerFrameFunctionalGroupsSequence = per_frame
        seg.NumberOfFrames = frames
        seg.PixelData = pydicom.pixels.pack_bits(masks.astype(np.uint8))
        references = [*seg.SourceImageSequence, *seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence,
                      *(item.DerivationImageSequence[0].SourceImageSequence[0] for item in per_frame)]
        for reference in references:
            reference.ReferencedSOPClassUID = source.SOPClassUID
    return seg


def write_dicom_segs(folder: Path, sources: Sequence[tuple[str, str, int]], read_mask: object, *,
                     software: str) -> list[str]:
    """Write folder/<id>.dcm, a Segmentation, for each DICOM input (id, path, frames), its masks read with
    `read_mask(id of a frame)` (None where the frame was skipped: an empty frame); one series for the run.
    Returns the written files' names below `folder`."""
    hd = require_highdicom()
    series_uid, written = hd.UID(), []
    for number, (identifier, path, frames) in enumerate(sources, start=1):
        names = [identifier] if frames == 1 else [f"{identifier}#{frame}" for frame in range(1, frames + 1)]
        masks = [read_mask(name) for name in names]
        shape = next((mask.shape for mask in masks if mask is not None), None)
        if shape is None:
            continue  # no frame was segmented: nothing to reference
        stack = np.stack([mask if mask is not None else np.zeros(shape, bool) for mask in masks]).astype(bool)
        target = folder / f"{identifier}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            segmentation(path, stack, software=software, series_uid=series_uid, instance_number=number).save_as(target)
        except OSError as error:
            target.unlink(missing_ok=True)
            raise UserError(f"cannot write {target}: {error.strerror}; free some space or choose another --output") \
                from None
        written.append(f"{identifier}.dcm")
    return written
