"""predict.py on DICOM files and videos: every frame an image `<file>#<frame>` with its time and its area in mm²,
truths given as DICOM or per frame, a DICOM SEG per DICOM input that reads back as predict.py's masks, an overlay
video per input video, each video one entry of the report, non-image and broken files skipped with a reason."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import media
from tests.helpers import run_script

pytest.importorskip("highdicom")
pytest.importorskip("av")


@pytest.fixture(scope="module")
def predicted(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """predict.py --dicom-seg true on a folder of DICOM files, a video, a PNG and broken files; (inputs, output)."""
    root = tmp_path_factory.mktemp("media")
    inputs, truths = root / "inputs", root / "truths"
    frames = media.nerve_frames(3, subject=2)
    media.write_dicom(inputs / "cine.dcm", [np.stack([image] * 3, -1) for image, _ in frames], jpeg=True)
    media.write_dicom(truths / "cine_mask.dcm", [mask.astype(np.uint8) * 255 for _, mask in frames])
    media.write_dicom(inputs / "one.dcm", [frames[0][0]], pixel_size_cm=(0.02, 0.02), pixel_spacing=True)
    media.write_structured_report(inputs / "report.dcm")
    whole = media.write_dicom(root / "whole.dcm", [image for image, _ in frames]).read_bytes()
    (inputs / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    sweep = media.moving_nerve(8)
    media.write_video(inputs / "clip.mp4", [image for image, _ in sweep])
    for number, (_, mask) in enumerate(sweep, start=1):
        Image.fromarray(mask.astype(np.uint8) * 255).save(truths / f"clip#{number}_mask.png")
    Image.fromarray(frames[1][0]).save(inputs / "plain.png")
    output = root / "predicted"
    result = run_script("predict.py", "--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--input",
                        str(inputs), "--masks", str(truths), "--output", str(output), "--pictures",
                        str(root / "pictures"), "--dicom-seg", "true", "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr
    return inputs, output


def read_rows(output: Path) -> dict[str, dict]:
    with open(output / "images.csv", newline="") as file:
        return {row["img"]: row for row in csv.DictReader(file)}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture) > 0


@pytest.mark.slow
def test_every_frame_is_an_image_with_its_time_and_area(predicted):
    _, output = predicted
    rows = read_rows(output)
    segmented = [name for name, row in rows.items() if not row["skipped_because"]]  # skips come first in a batch
    assert segmented == ["cine#1", "cine#2", "cine#3", "clip#1", "clip#2", "clip#3", "clip#4", "clip#5", "clip#6",
                         "clip#7", "clip#8", "one", "plain"]
    assert sorted(set(rows) - set(segmented)) == ["cut", "report"]
    assert rows["report"]["skipped_because"] == "a DICOM Basic Text SR Storage without pixel data, not an image"
    assert rows["cut"]["skipped_because"].startswith("a truncated DICOM file")
    for name in ("clip#1", "cine#2", "one", "plain"):
        assert (output / "masks" / f"{name}.png").is_file() and rows[name]["presence"]
    assert rows["clip#4"]["time_s"] == f"{3 / 30:.3f}" and rows["plain"]["time_s"] == ""
    assert rows["cine#2"]["time_s"] == f"{1 / 30:.3f}"
    area = int(rows["cine#2"]["mask_area"])
    assert float(rows["cine#2"]["mask_area_mm2"]) == pytest.approx(area * 0.1 * 0.12, abs=0.01)
    assert float(rows["one"]["mask_area_mm2"]) == pytest.approx(int(rows["one"]["mask_area"]) * 0.2 * 0.2, abs=0.01)
    assert rows["plain"]["mask_area_mm2"] == "" and rows["clip#2"]["mask_area_mm2"] == ""
    assert all(rows[name]["dice"] for name in ("cine#1", "cine#2", "cine#3", "clip#1", "clip#8"))  # truths found
    assert not rows["one"]["dice"] and not rows["plain"]["dice"]


@pytest.mark.slow
def test_dicom_seg_reads_back_as_the_masks(predicted):
    import highdicom
    import pydicom

    inputs, output = predicted
    for name, frames in (("cine", 3), ("one", 1)):
        source = pydicom.dcmread(inputs / f"{name}.dcm", stop_before_pixels=True)
        seg = highdicom.seg.segread(output / "dicom-seg" / f"{name}.dcm")
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
        if frames == 1:
            pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                                       segment_numbers=[1])
        else:
            pixels = seg.get_pixels_by_source_frame(source_sop_instance_uid=source.SOPInstanceUID,
                                                    source_frame_numbers=[1, 2, 3], segment_numbers=[1])
        names = [name] if frames == 1 else [f"{name}#{frame}" for frame in range(1, frames + 1)]
        masks = np.stack([read_png(output / "masks" / f"{frame}.png") for frame in names])
        assert np.array_equal(pixels[..., 0] > 0, masks)
        assert np.array_equal(pydicom.dcmread(output / "dicom-seg" / f"{name}.dcm").pixel_array.reshape(masks.shape)
                              > 0, masks)


@pytest.mark.slow
def test_a_video_gets_its_overlay_and_one_report_entry(predicted):
    import av

    _, output = predicted
    with av.open(str(output / "videos" / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.average_rate, stream.codec_context.width, stream.codec_context.height) == (30, 580, 420)
        pictures = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(pictures) == 8
    mask = read_png(output / "masks" / "clip#1.png")
    if mask.any():  # the outline is drawn in red where the mask's edge is
        edge = pictures[0][mask & ~np.roll(mask, 3, axis=1)]
        assert (edge[:, 0].astype(int) - edge[:, 1]).mean() > 40
    page = (output / "report.html").read_text()
    assert page.count('"video",null,0,null') == 1 and "clip#3" not in page and "8 frames segmented" in page


def test_presence_over_time_is_the_median_of_the_window_across_batches():
    import torch

    from nerveseg.inference.presence_over_time import PresenceOverTime, median_presence

    raw = [0.9, 0.9, 0.1, 0.9, 0.9, 0.2, 0.1, 0.8, 0.1, 0.1]  # a video's frames 1..10, then an image

    class Frames:
        data = [{"id": f"v#{n}", "image_path": "v.mp4", "frame": n} for n in range(1, 11)]
        data.append({"id": "a", "image_path": "a.png", "frame": 0})

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int) -> dict:
            value = raw[index] if index < len(raw) else 0.5
            return {**self.data[index], "image": torch.full((1, 2, 2), value), "error": ""}

    def predictor(images: torch.Tensor) -> tuple[None, list[float]]:
        return None, [float(image.mean()) for image in images]

    dataset = Frames()
    over_time = PresenceOverTime(5, dataset, predictor)
    decided = []
    for start, stop in ((0, 4), (4, 8), (8, 11)):
        items = [dataset[index] for index in range(start, stop)]
        batch = {key: [item[key] for item in items] for key in ("id", "image_path", "frame")}
        decided += over_time(batch, list(range(len(items))), predictor(torch.stack([i["image"] for i in items]))[1])
    assert decided[:10] == pytest.approx(median_presence(raw, 5)) and decided[10] == 0.5
    assert median_presence(raw, 5)[2] == 0.9 and median_presence(raw, 1) == raw  # the lone 0.1 is outvoted
    assert PresenceOverTime(1, dataset, predictor)({"image_path": ["v.mp4"], "frame": [3], "id": ["v#3"]}, [0],
                                                   [0.1]) == [0.1]


@pytest.mark.slow
def test_data_cleaning_reads_own_dicom(tmp_path):
    frames = media.nerve_frames(3, subject=3)
    source = tmp_path / "exams"
    media.write_dicom(source / "cine.dcm", [image for image, _ in frames])
    media.write_dicom(source / "cine_mask.dcm", [mask.astype(np.uint8) * 255 for _, mask in frames])
    media.write_dicom(source / "one.dcm", [frames[0][0]])
    Image.fromarray(frames[0][1].astype(np.uint8) * 255).save(source / "one_mask.png")
    media.write_structured_report(source / "notes_mask.dcm")  # a mask file that is not an image
    media.write_dicom(source / "notes.dcm", [frames[1][0]])
    result = run_script("data_cleaning.py", "--source", str(source), "--output", str(tmp_path / "clean"), "--quiet",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "clean" / "manifest.csv", newline="") as file:
        manifest = {row["id"]: row for row in csv.DictReader(file)}
    for number, (image, mask) in enumerate(frames, start=1):
        name = f"cine#{number}"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "clean" / manifest[name]["image"])), image)
        assert np.array_equal(read_png(tmp_path / "clean" / manifest[name]["mask"]), mask)
    assert read_png(tmp_path / "clean" / manifest["one"]["mask"]).sum() == frames[0][1].sum()
    assert "without pixel data" in manifest["notes"]["reason"] and not manifest["notes"]["image"]
