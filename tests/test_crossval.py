"""Cross-validation (train.py --folds): the folds, the choices on pooled validation, the ensemble checkpoint,
test-time augmentation, resuming a fold, and prediction with the ensemble or one fold."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nerveseg.checkpoint import load_checkpoint, read_torch_file
from nerveseg.data import read_manifest, split_into_folds
from nerveseg.ensemble import Ensemble, TestTimeAugmentation, augmentation_views, to_logits
from nerveseg.errors import UserError
from nerveseg.metrics import DiceTally, kaggle_dice
from nerveseg.postprocess import PostProcessing, metrics_of_rule, to_mask, tuning_scores
from tests.helpers import FAST_TRAINING, ROOT, read_metrics, run_script, tree_hashes

CV_TRAINING = ("--folds", "2", "--max-epochs", "3", *FAST_TRAINING)


def items_of(subjects: dict[str, int], frames: int = 4) -> list[dict]:
    """Manifest-like items: `frames` frames of each subject, the given number of them with an empty mask."""
    return [{"id": f"{subject}_{n}", "subject": subject, "empty": n < empty}
            for subject, empty in subjects.items() for n in range(frames)]


def test_every_subject_validates_in_exactly_one_fold_and_the_folds_are_balanced():
    never_empty = {f"a{i}": 0 for i in range(6)}
    always_empty = {f"b{i}": 4 for i in range(6)}
    items = items_of(never_empty | always_empty)
    folds = split_into_folds(items, 3, 0.2, seed=0)
    validated = [{item["subject"] for item in val} for _, val in folds]
    assert sorted(s for subjects in validated for s in subjects) == sorted(never_empty | always_empty)
    for (train, val), subjects in zip(folds, validated, strict=True):
        assert not subjects & {item["subject"] for item in train} and len(train) + len(val) == len(items)
        assert sum(s.startswith("b") for s in subjects) == 2 == sum(s.startswith("a") for s in subjects)
    assert split_into_folds(items, 3, 0.2, seed=0) == folds
    assert split_into_folds(items, 3, 0.2, seed=1) != folds
    assert len(split_into_folds(items, 1, 0.25, seed=0)) == 1  # one fold: the one split of --val-fraction
    with pytest.raises(UserError, match="--folds 13 needs at least 13 subjects .* has 12; use --folds 12 or fewer"):
        split_into_folds(items, 13, 0.2, seed=0)


def test_the_figures_of_a_rule_read_from_tuning_scores_are_those_of_applying_it():
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 30, 40, generator=generator) ** 3 for _ in range(8)]
    truths = [(m > 0.5) if i % 3 else torch.zeros_like(m, dtype=torch.bool) for i, m in enumerate(maps)]
    presences = torch.rand(8, generator=generator).tolist()
    tuning = sum(tuning_scores(m, p, t, has_presence=True) for m, p, t in zip(maps, presences, truths, strict=True))
    for rule in (PostProcessing(presence_threshold=0.5), PostProcessing(0.4, True, 0.01, 0.3),
                 PostProcessing(0.7, False, 0.03, 0.6)):
        tally = DiceTally()
        for probability, presence, truth in zip(maps, presences, truths, strict=True):
            mask = torch.from_numpy(to_mask(probability, presence, rule)).bool()[None, None]
            tally.add(kaggle_dice(mask, truth[None]), ~truth.any().reshape(1), ~mask.any().reshape(1))
        read = metrics_of_rule(tuning, rule, images=8, images_empty=3)
        assert read == pytest.approx(tally.summary() | {"all_empty_baseline": 3 / 8})


class Constant(nn.Module):
    """A model whose mask and presence probabilities are `p` everywhere."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_logits(torch.full_like(images, self.p)), to_logits(torch.full(images.shape[:1], self.p))


class Echo(nn.Module):
    """A model that calls each pixel's brightness its probability: a view's mistakes show in its output."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return to_logits(images), None


def test_an_ensemble_averages_probabilities_and_augmentation_maps_each_view_back():
    masks, presences = Ensemble([Constant(0.2), Constant(0.6)])(torch.zeros(3, 1, 16, 16))
    assert torch.sigmoid(masks).sub(0.4).abs().max() < 1e-6 and torch.sigmoid(presences).sub(0.4).abs().max() < 1e-6
    image = torch.full((2, 1, 64, 96), 0.1)
    image[:, :, 20:44, 30:66] = 0.9  # a bright target away from the borders
    mask, presence = TestTimeAugmentation(Echo(), size=(64, 96), zoom=0.05, shift=0.025, flip=True)(image)
    assert presence is None
    back = torch.sigmoid(mask)
    assert back[:, :, 26:38, 38:58].min() > 0.85 and back[:, :, :10].max() < 0.15  # each view mapped back in place
    assert torch.equal(TestTimeAugmentation(Echo(), size=(64, 96), zoom=0, shift=0, flip=False)(image)[0],
                       to_logits(image))  # no views but the image itself: the model's own output
    assert len(augmentation_views(zoom=0.05, shift=0.025, flip=False)) == 5
    assert augmentation_views(zoom=0.05, shift=0.025, flip=True)[-1] == (1.0, 0.0, 0.0, True)


@pytest.fixture(scope="module")
def cross_validated(train_clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-fold, 3-epoch cross-validation on train_clean; its working folder. Do not modify it."""
    work = tmp_path_factory.mktemp("cv")
    result = run_script("train.py", "--data-dir", str(train_clean), "--run-name", "cv", *CV_TRAINING, cwd=work)
    assert result.returncode == 0, result.stderr
    (work / "stdout.txt").write_text(result.stdout)
    return work


@pytest.mark.slow
def test_folds_leave_their_models_a_summary_and_one_ensemble_checkpoint(cross_validated, train_clean):
    run = cross_validated / "runs" / "cv"
    summary = json.loads((run / "summary.json").read_text())
    folds = summary["metrics"]["folds"]
    assert summary["folds"] == 2 and [fold["fold"] for fold in folds] == [1, 2]
    assert not set(folds[0]["subjects"]) & set(folds[1]["subjects"])
    for fold in folds:
        assert [row["epoch"] for row in read_metrics(run / f"fold-{fold['fold']}")] == ["1", "2", "3"]
        best = read_torch_file(run / f"fold-{fold['fold']}" / "best.pt")
        assert fold["best_epoch"] == best["epoch"] and fold["raw"]["dice"] == pytest.approx(best["metrics"]["dice"])
    dice = [fold["postprocessed"]["dice"] for fold in folds]
    assert summary["metrics"]["mean"]["postprocessed"]["dice"] == pytest.approx(np.mean(dice))
    assert summary["metrics"]["sd"]["postprocessed"]["dice"] == pytest.approx(np.std(dice, ddof=1))
    images = [fold["postprocessed"]["images"] for fold in folds]
    pooled = summary["metrics"]["pooled"]["postprocessed"]
    assert pooled["images"] == sum(images) == len(read_manifest(train_clean))
    assert pooled["dice"] == pytest.approx(np.dot(dice, images) / sum(images))
    assert (run / "cross_validation.png").stat().st_size > 10_000
    assert (cross_validated / "Images" / "cross_validation.png").is_file()
    output = (cross_validated / "stdout.txt").read_text()
    assert "cross-validation over 2 folds" in output and "pooled" in output and "test-time augmentation" in output

    model, checkpoint = load_checkpoint(cross_validated / "2D_Nerve_Segmentation.pt")  # weights_only
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert summary["test_time_augmentation"]["use"] == checkpoint["tta"]["use"]
    assert PostProcessing(**checkpoint["postprocessing"]) == PostProcessing(**summary["postprocessing"])
    for member, fold in zip(model.members, (1, 2), strict=True):
        best = read_torch_file(run / f"fold-{fold}" / "best.pt")["state_dict"]
        assert all(torch.equal(value, best[name]) for name, value in member.state_dict().items())
    images = torch.rand(2, 1, 64, 96)
    one, _ = load_checkpoint(cross_validated / "2D_Nerve_Segmentation.pt", fold=2)
    masks = [torch.sigmoid(m(images)[0]) for m in (*model.members, one)]
    assert torch.allclose(torch.sigmoid(model(images)[0]), (masks[0] + masks[1]) / 2, atol=1e-5)
    assert torch.equal(masks[1], masks[2])


@pytest.mark.slow
def test_predict_uses_the_ensemble_or_one_fold_with_or_without_augmentation(cross_validated, train_clean):
    results = {}
    views = {"ensemble": ("--tta", "false"), "fold-1": ("--fold", "1", "--tta", "false"), "tta": ("--tta", "true")}
    for name, options in views.items():  # explicit: with "auto" whether validation chose augmentation decides
        result = run_script("predict.py", "--input", str(train_clean / "test"), "--output", name, "--quiet", *options,
                            cwd=cross_validated)
        assert result.returncode == 0, result.stderr
        results[name] = result.stdout
    assert "(the ensemble of 2 fold models" in results["ensemble"]
    assert "(the model of fold 1)" in results["fold-1"]
    assert "with test-time augmentation (5 views)" in results["tta"]
    refused = run_script("predict.py", "--input", str(train_clean / "test"), "--fold", "3", "--output", "x",
                         cwd=cross_validated)
    assert refused.returncode != 0 and "holds the models of folds 1, 2, not fold 3" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_a_run_stopped_in_fold_2_resumes_there_keeps_fold_1_and_ends_as_if_never_stopped(
    cross_validated, train_clean, tmp_path
):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data-dir", str(train_clean), "--run-name", "cv", *CV_TRAINING],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:
        if line.startswith("fold 2 of 2, epoch   1/3"):
            process.send_signal(signal.SIGINT)  # inside fold 2's epoch 2 (or a little later)
            break
    output = process.communicate(timeout=120)[0]
    run = tmp_path / "runs" / "cv"
    assert process.returncode == 130 and "Traceback" not in output, output
    assert "Continue with: python train.py --resume --run-name cv" in output
    assert not (tmp_path / "2D_Nerve_Segmentation.pt").exists()
    fold_1 = tree_hashes(run / "fold-1")
    resumed = run_script("train.py", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "fold 1 of 2, completed before: kept" in resumed.stdout
    assert "fold 2 of 2, resuming after epoch" in resumed.stdout
    assert tree_hashes(run / "fold-1") == fold_1
    reference = cross_validated / "runs" / "cv"
    for fold in ("fold-1", "fold-2"):
        figures = [[{k: v for k, v in row.items() if "seconds" not in k} for row in read_metrics(folder / fold)]
                   for folder in (run, reference)]
        assert figures[0] == figures[1]  # the same epochs, only their times differ
        weights = read_torch_file(run / fold / "best.pt")["state_dict"]
        expected = read_torch_file(reference / fold / "best.pt")["state_dict"]
        assert all(torch.equal(weights[name], expected[name]) for name in expected)
    pooled = [json.loads((folder / "summary.json").read_text())["metrics"]["pooled"] for folder in (run, reference)]
    for kind in ("raw", "postprocessed"):
        assert pooled[0][kind] == pytest.approx(pooled[1][kind])
