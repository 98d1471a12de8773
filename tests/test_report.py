"""predict.py's report.html, seen in a real browser (headless Chromium), and the uncertainty figure."""

import csv
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.ensemble import Ensemble, TestTimeAugmentation
from nerveseg.errors import UserError
from nerveseg.inference.records import ImageResult, Summary
from nerveseg.inference.report import FULL_SIZE_LIMIT, Report, describe_prediction, page
from nerveseg.inference.uncertainty import MemberOutputs, roc_auc, single_model_uncertainty, uncertainty_check
from nerveseg.model import build_model, model_config
from nerveseg.postprocess import PostProcessing
from tests.helpers import NO_SPACE, run_script

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium here: apt-get install chromium (.ci/run installs it where it runs as root)"
)
ERRORS = {"miss", "false empty", "stray mask"}
# Names a page must show as they are, never as markup or script
ODD_NAMES = ['plain name 1', 'quote "double" \'single\'', "<img src=x onerror=alert(1)>", "A&B é ü 中"]


def browser(*arguments: str, url: str, cwd: Path) -> subprocess.CompletedProcess:
    """Headless Chromium as root in a container: no sandbox, no GPU, a new empty profile, no network of its own."""
    with tempfile.TemporaryDirectory() as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
        return subprocess.run([CHROMIUM, *flags, *arguments, url], cwd=cwd, capture_output=True, text=True,
                              timeout=120)


def shown_cards(page_path: Path, view: str) -> tuple[list[dict], int]:
    """The cards of the page as the browser made them, opened at `view` (#sort=...&filter=...): the visible ones
    in their order (name, kind, Dice), and how many there are in all."""
    result = browser("--dump-dom", url=page_path.as_uri() + view, cwd=page_path.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    cards = re.findall(r'<figure class="card" data-index="\d+"( hidden="")?>(.*?)</figure>', result.stdout)
    shown = []
    for hidden, body in cards:
        if hidden:
            continue
        name = re.search(r'<div class="name">(.*?)</div>', body).group(1)
        kind = re.search(r'<span class="kind [^"]*">(.*?)</span>', body).group(1)
        dice = re.search(r"Dice ([0-9.]+|–)", body)
        shown.append({"name": name, "kind": kind, "dice": None if not dice or dice.group(1) == "–" else
                      float(dice.group(1)), "body": body})
    return shown, len(cards)


def unescape(text: str) -> str:
    """The text of an element as dumped by the browser."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")


@pytest.fixture(scope="module")
def predicted(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A prediction of 10 images with odd names and truths (empty and not), and one unreadable file."""
    root = tmp_path_factory.mktemp("report")
    images, truths = root / "images", root / "truths"
    images.mkdir()
    truths.mkdir()
    rng = np.random.default_rng(5)
    names = ODD_NAMES + [f"n{number}" for number in range(6)]
    truth_is_empty = {}
    for number, name in enumerate(names):
        image = rng.integers(0, 120, (90, 130), dtype=np.uint8)
        truth = np.zeros((90, 130), np.uint8)
        if number % 2:
            truth[20:60, 30:90] = 255
            image[20:60, 30:90] += 100
        Image.fromarray(image).save(images / f"{name}.png")
        Image.fromarray(truth).save(truths / f"{name}.png")
        truth_is_empty[name] = not truth.any()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_script("predict.py", "--checkpoint", str(trained_run / "2D_Nerve_Segmentation.pt"), "--input",
                        str(images), "--masks", str(truths), "--output", "out", "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "out" / "images.csv", newline="", encoding="utf-8") as file:
        rows = {row["img"]: row for row in csv.DictReader(file)}
    return {"root": root, "page": root / "out" / "report.html", "rows": rows, "truth_is_empty": truth_is_empty,
            "stdout": result.stdout, "images": images, "checkpoint": str(trained_run / "2D_Nerve_Segmentation.pt")}


@pytest.mark.slow
def test_images_csv_holds_an_uncertainty_and_the_page_its_pictures(predicted):
    rows = predicted["rows"]
    assert set(rows) == {*predicted["truth_is_empty"], "broken"}
    for name in predicted["truth_is_empty"]:
        assert 0 <= float(rows[name]["uncertainty"]) <= 1
    assert rows["broken"]["skipped_because"] and not rows["broken"]["uncertainty"]
    pictures = sorted(path.name for path in (predicted["root"] / "out" / "report").iterdir())
    assert len(pictures) == 2 * 10  # a thumbnail and a full-size view of each readable image (10 <= FULL_SIZE_LIMIT)
    for full in (predicted["root"] / "out" / "report").glob("*-full.jpg"):
        with Image.open(full) as view:
            assert view.size == (130, 90)  # the image's own size
    assert "uncertainty: " in predicted["stdout"] and "AUC" in predicted["stdout"]


@pytest.mark.slow
def test_the_page_fetches_nothing_and_names_stay_text(predicted):
    text = predicted["page"].read_text(encoding="utf-8")
    assert not re.search(r"(https?|wss?|ftp)://", text)  # no address of the network anywhere in the page
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text).group(1)
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy
    assert "<img src=x" not in text and "onerror=alert(1)>" not in text  # only as \u003c...\u003e in the JSON


@pytest.mark.slow
@needs_chromium
def test_the_browser_shows_a_card_per_image_sorted_and_filtered(predicted):
    rows, truth_is_empty = predicted["rows"], predicted["truth_is_empty"]
    cards, total = shown_cards(predicted["page"], "#sort=name&filter=all")
    assert total == len(cards) == 11
    names = [unescape(card["name"]) for card in cards]
    assert sorted(names) == sorted(rows) and names == sorted(names)
    for name in ODD_NAMES:
        assert name in names  # spaces, quotes, <, & and non-ASCII letters as they are
    assert sum(card["body"].count("<img ") for card in cards) == 10  # no injected image element

    worst_first, _ = shown_cards(predicted["page"], "#sort=dice&filter=all")
    dices = [card["dice"] for card in worst_first if card["dice"] is not None]
    assert dices == sorted(dices) and dices[0] == min(float(row["dice"]) for row in rows.values() if row["dice"])
    assert worst_first[-1]["kind"] == "skipped"  # no Dice: last

    def expected_kind(name: str) -> str:
        row = rows[name]
        return ImageResult(name, "", area=int(row["mask_area"]), truth_empty=truth_is_empty[name],
                           dice=float(row["dice"])).kind()

    errors, _ = shown_cards(predicted["page"], "#sort=name&filter=errors")
    wrong = sorted(name for name in truth_is_empty if expected_kind(name) in ERRORS)
    assert [unescape(card["name"]) for card in errors] == wrong
    assert all(card["kind"] in ERRORS for card in errors)
    empty_truths, _ = shown_cards(predicted["page"], "#sort=name&filter=empty-truths")
    assert [unescape(card["name"]) for card in empty_truths] == sorted(n for n, e in truth_is_empty.items() if e)
    skipped, _ = shown_cards(predicted["page"], "#filter=skipped")
    assert [card["name"] for card in skipped] == ["broken"]


@pytest.mark.slow
@needs_chromium
def test_a_picture_opens_at_full_size(predicted):
    name = ODD_NAMES[2]  # the view of any image can be opened by the address, as a click opens it
    result = browser("--dump-dom", url=predicted["page"].as_uri() + "#view=" + urllib.parse.quote(name),
                     cwd=predicted["root"])
    viewer = re.search(r'<div id="viewer"( hidden="")?><img id="viewer-image" alt="" src="([^"]+)"[^>]*><p '
                       r'id="viewer-caption">(.*?)</p>', result.stdout)
    assert viewer and not viewer.group(1), result.stdout[-3000:]
    assert viewer.group(2).endswith("-full.jpg") and unescape(viewer.group(3)).startswith(name)
    with Image.open(predicted["page"].parent / viewer.group(2)) as view:
        assert view.size == (130, 90)


@pytest.mark.slow
@needs_chromium
def test_no_request_leaves_the_page(predicted, tmp_path):
    def requests_of_pages(url: str) -> list[str]:
        """The network requests that pages made (the browser's own, initiator "not an origin", left out)."""
        log = tmp_path / "net.json"
        result = browser(f"--log-net-log={log}", "--dump-dom", url=url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        events = json.loads(log.read_text(encoding="utf-8"))
        kind = events["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        starts = [event.get("params", {}) for event in events["events"] if event["type"] == kind]
        return [start["url"] for start in starts if "url" in start and start.get("initiator") != "not an origin"
                and not start["url"].startswith(("file:", "data:"))]

    control = tmp_path / "control.html"  # the check can fail: a page that asks for a picture on the network
    control.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/picture.png">', encoding="utf-8")
    assert requests_of_pages(control.as_uri()) == ["http://127.0.0.1:9/picture.png"]
    assert requests_of_pages(predicted["page"].as_uri() + "#sort=dice") == []


@pytest.mark.slow
@needs_chromium
def test_a_screenshot_of_the_page_is_not_blank(predicted, tmp_path):
    picture = tmp_path / "screenshot.png"
    result = browser(f"--screenshot={picture}", "--window-size=1000,700", url=predicted["page"].as_uri(),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    assert pixels.shape == (700, 1000, 3)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text and pictures
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 10  # the outlines (and the legend) are drawn


@pytest.mark.slow
def test_a_new_report_replaces_the_old_one_and_report_false_writes_none(predicted):
    root, chosen = predicted["root"], root_subset(predicted)
    model = ("--checkpoint", predicted["checkpoint"])
    result = run_script("predict.py", *model, "--input", str(chosen), "--output", "out", "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (root / "out" / "report.html").read_text(encoding="utf-8")
    assert '"n0"' in text and '"n1"' not in text and "broken" not in text
    assert sorted(path.name for path in (root / "out" / "report").iterdir()) == ["0-full.jpg", "0.jpg"]
    assert not list(root.glob(".out*")) and not list((root / "out").glob(".*tmp"))  # nothing left aside
    result = run_script("predict.py", *model, "--input", str(chosen), "--output", "out", "--report", "false",
                        "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (root / "out" / "report.html").exists() and not (root / "out" / "report").exists()


def root_subset(predicted: dict) -> Path:
    """A folder of one of the predicted images (n0)."""
    folder = predicted["root"] / "one"
    folder.mkdir(exist_ok=True)
    shutil.copy(predicted["images"] / "n0.png", folder / "n0.png")
    return folder


def test_a_page_of_5508_images_stays_under_2_mb_and_its_json_cannot_end_the_script(tmp_path):
    report, summary = Report(tmp_path, images=5508), Summary()
    assert not report.full_size and 5508 > FULL_SIZE_LIMIT
    image, mask = np.zeros((8, 12), np.uint8), np.zeros((420, 580), np.uint8)
    started = time.perf_counter()
    for number in range(5508):
        mask[100:200, 200:300] = number % 3 == 0
        result = ImageResult(f"{number + 1}", f"data/clean/test/{number + 1}.tif", presence=0.73,
                             area=int(mask.sum()), uncertainty=0.1234)
        if number % 5:
            result.dice, result.truth_empty = 0.5, not mask.any()
        report.add(result, network_image=image, mask=mask, truth=mask.astype(bool) if number % 5 else None)
        summary.add(result)
    report.add_skipped(name="</script><script>alert(1)</script>", file="x.tif", reason="not an image")
    report.write(tmp_path / "report.html", about=[("model", "m.pt")], summary=summary, has_truths=True)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < 2_000_000, len(text)
    assert text.count("</script>") == 2 and "alert(1)" in text  # the template's two; the name's stays inside JSON
    assert len(list((tmp_path / "report").iterdir())) == 5508
    assert time.perf_counter() - started < 120  # loose here (shared CPU); benchmarks/report_page.py measures it


@pytest.mark.parametrize(("mask_is_empty", "truth_is_empty", "dice", "kind"), [
    (True, True, 1.0, "true empty"),
    (False, True, 0.0, "stray mask"),
    (True, False, 0.0, "false empty"),
    (False, False, 0.7, "hit"),
    (False, False, 0.2, "miss"),
    (True, None, None, "empty"),
    (False, None, None, "mask"),
])
def test_kind_of_case(mask_is_empty, truth_is_empty, dice, kind):
    result = ImageResult("a", "a.png", area=0 if mask_is_empty else 5, truth_empty=truth_is_empty, dice=dice)
    assert result.kind() == kind


def test_roc_auc_and_the_uncertainty_check():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5  # ties count half
    assert roc_auc([0.3, 0.6, 0.4, 0.7], [False, True, True, False]) == 0.5
    assert roc_auc([0.1, 0.2], [True, True]) is None
    dices = [0.9] * 18 + [0.1, 0.2]
    check = uncertainty_check([0.1] * 18 + [0.9, 0.8], dices)
    assert check["top_tenth"] == 2 and check["wrong_in_top_tenth"] == 1.0 and check["wrong_in_rest"] == 0.0
    assert check["auc"] == 1.0
    assert uncertainty_check([0.5] * 9, [0.1] * 9) is None


def test_one_model_is_unsure_near_its_thresholds():
    post = PostProcessing(threshold=0.5, presence_threshold=0.5)
    sure = torch.zeros(1, 8, 8)
    sure[0, 2:6, 2:6] = 0.99
    assert single_model_uncertainty(sure, 0.99, post) == pytest.approx(0.02)
    assert single_model_uncertainty(sure, 0.5, post) == 1.0  # presence right at its threshold
    assert single_model_uncertainty(sure, 0.01, post) == pytest.approx(0.02)  # surely empty: the pixels do not count
    doubtful = sure.clone()
    doubtful[0, 2:6, 2:4] = 0.55  # half the mask's pixels near the threshold
    assert single_model_uncertainty(doubtful, 0.99, post) == pytest.approx(0.5)


def test_members_disagree_only_when_they_differ_and_the_prediction_is_unchanged():
    torch.manual_seed(0)
    config = model_config((4, 8), (2,), 0, 0.0)
    images = torch.rand(3, 1, 32, 48)
    post = PostProcessing(threshold=0.5, presence_threshold=0.0)

    class Predictor:
        def __init__(self, model):
            self.model = model

    def network(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(config).eval()

    same = network(0)
    for model, disagreeing in ((Ensemble([same, same]), False), (Ensemble([network(0), network(1)]), True),
                               (TestTimeAugmentation(network(0), size=(32, 48), zoom=0.05, shift=0.03, flip=True),
                                True),
                               (TestTimeAugmentation(Ensemble([network(0), network(1)]), size=(32, 48), zoom=0.05,
                                                     shift=0.0, flip=False), True)):
        with torch.no_grad():
            before = model(images)
            members = MemberOutputs(Predictor(model), post)
            after = model(images)
            figures = members.uncertainty(torch.sigmoid(after[0]), torch.sigmoid(after[1]).tolist())
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # the hooks change nothing
        folds = len(model.members) if isinstance(model, Ensemble) else len(getattr(model.model, "members", [1]))
        views = 1 if isinstance(model, Ensemble) else len(model.views)
        assert members.members == folds * views and not members.recorded  # each batch's records used up
        assert len(figures) == 3 and all(0 <= figure <= 1 for figure in figures)
        assert (max(figures) > 0) == disagreeing, figures
    single = MemberOutputs(Predictor(network(0)), post)
    assert single.members == 0


def test_page_escapes_what_would_end_its_script():
    text = page({"columns": [], "rows": [["</script><!--\u2028&"]], "summary": [], "has_truths": False,
                 "full_size_limit": 1})
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    assert json.loads(data)["rows"] == [["</script><!--\u2028&"]]
    assert "<" not in data and "&" not in data


def test_a_page_with_nan_or_infinite_figures_is_still_json_its_script_can_read():
    text = page({"columns": ["presence", "dice"], "rows": [[float("nan"), float("inf")], [0.5, -float("inf")]],
                 "summary": [("Kaggle Dice", float("nan"))], "has_truths": True, "full_size_limit": 1})
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON: the page's JSON.parse stops at it")

    assert json.loads(data, parse_constant=refuse)["rows"] == [[None, None], [0.5, None]]


def test_a_full_disk_while_writing_a_thumbnail_is_a_clear_error(tmp_path, monkeypatch):
    report = Report(tmp_path, images=5000)

    def full_disk(picture, path, **options):
        Path(path).write_bytes(b"part")
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UserError, match="cannot write .*0.jpg: No space left on device"):
        report.add(ImageResult("a", "a.png", presence=0.5, uncertainty=0.0), network_image=np.zeros((8, 8), np.uint8),
                   mask=np.zeros((8, 8), np.uint8), truth=None)
    assert not (tmp_path / "report" / "0.jpg").exists()  # no partial picture left


def report_of(folder: Path, names: list[str]) -> dict:
    """A report of thumbnails only (no file is read again) for images called `names`, in that order; its data."""
    report = Report(folder, images=5000)
    for name in names:
        report.add(ImageResult(name, f"in/{name}.png", presence=0.5, uncertainty=0.1),
                   network_image=np.zeros((8, 8), np.uint8), mask=np.zeros((8, 8), np.uint8), truth=None)
    report.add_skipped(name="3", file="in/3.png", reason="not an image")
    about = describe_prediction("m.pt", {"epoch": 1}, engine="torch", input_folder="in", masks_folder="")
    report.write(folder / "report.html", about=about, summary=Summary(), has_truths=False)
    text = (folder / "report.html").read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))


def test_the_page_lists_the_images_in_natural_order_and_its_summary_rows_are_named_once(tmp_path):
    data = report_of(tmp_path, ["10", "2", "1", "b10", "b9"])
    assert [row[0] for row in data["rows"]] == ["1", "2", "3", "10", "b9", "b10"]  # images.csv's order
    labels = [label for label, _ in data["summary"]]
    assert len(labels) == len(set(labels)), labels


def test_names_that_reorder_the_text_or_are_not_utf8_are_shown_as_they_are(tmp_path):
    names = ["scan\u202egnp.exe", "x\u2066y\u2069", os.fsdecode(b"bad\xff\xfe")]
    data = report_of(tmp_path, names)
    shown = {row[0]: row[1] for row in data["rows"]}
    assert set(shown) == {"scan\\u202egnp.exe", "x\\u2066y\\u2069", "bad\\xff\\xfe", "3"}
    assert shown["bad\\xff\\xfe"] == "in/bad\\xff\\xfe.png"
    (tmp_path / "report.html").read_text(encoding="utf-8")  # valid UTF-8


def test_the_page_says_its_pictures_are_in_report_beside_it(tmp_path):
    report_of(tmp_path, ["1", "2"])
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "The pictures are in the folder report/ beside this page" in text


@pytest.mark.slow
@needs_chromium
def test_a_page_moved_without_its_pictures_says_where_they_are(tmp_path):
    report_of(tmp_path, ["1", "2"])
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(tmp_path / "report.html", moved / "report.html")
    result = browser("--dump-dom", url=(moved / "report.html").as_uri(), cwd=moved)
    note = re.search(r'<p class="pictures missing" id="pictures">(.*?)</p>', result.stdout, re.S)
    assert note and note.group(1).startswith("The pictures did not load: they are in the folder report/"), note
    shutil.move(tmp_path / "report", moved / "report")
    result = browser("--dump-dom", url=(moved / "report.html").as_uri(), cwd=moved)
    assert '<p class="pictures" id="pictures">The pictures are in the folder report/' in result.stdout
