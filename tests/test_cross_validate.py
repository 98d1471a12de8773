"""benchmarks/cross_validate.py: its ways of choosing the rule agree with train.py's, and its re-weighting."""

import importlib.util

import pytest
import torch

from nerveseg.postprocess import PRESENCE_THRESHOLDS, choose_postprocessing, rule_index, tuning_scores
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def cross_validate():
    spec = importlib.util.spec_from_file_location("cross_validate", ROOT / "benchmarks" / "cross_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_image(seed: int, images: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Tuning scores of images with random blobs, truths and presence probabilities."""
    generator = torch.Generator().manual_seed(seed)
    scores, empty = [], []
    for _ in range(images):
        truth = torch.zeros(1, 20, 30, dtype=torch.bool)
        probability = torch.rand(1, 20, 30, generator=generator) * 0.4
        has_target = bool(torch.rand(1, generator=generator) < 0.3)
        if has_target:
            truth[:, 5:12, 8:20] = True
        if has_target or torch.rand(1, generator=generator) < 0.4:
            probability[:, 5:12, 8:20] += 0.55
        presence = float(torch.rand(1, generator=generator) * 0.6 + 0.3 * has_target)
        scores.append(tuning_scores(probability, presence, truth, has_presence=True))
        empty.append(not has_target)
    return torch.stack(scores), torch.tensor(empty)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("balanced", [False, True])
def test_without_the_gate_it_takes_the_best_rule_and_with_it_train_py_s(cross_validate, seed, balanced):
    scores, empty = per_image(seed)
    dice = scores[:, 0]
    weights = torch.where(empty, 0.5 / empty.sum(), 0.5 / (~empty).sum()) if balanced else torch.ones(len(empty))
    objective = torch.einsum("n,n...->...", weights.double(), dice)
    ungated = cross_validate.choose(scores, empty, balanced=balanced, gate=False)
    assert ungated[0] > 0 and objective[ungated] >= objective[1:].max() - 1e-9  # the best rule using presence
    chosen = choose_postprocessing(scores.sum(0), images=len(empty), images_empty=int(empty.sum()),
                                   has_presence=True, balanced=balanced)[0]
    gated = cross_validate.choose(scores, empty, balanced=balanced, gate=True)
    assert gated == rule_index(chosen) and objective[gated] <= objective[ungated] + 1e-9


def test_re_weighting_mixes_the_dice_of_empty_truths_and_targets(cross_validate):
    scores, empty = per_image(0)
    rule = (PRESENCE_THRESHOLDS.index(0.5), 0, 4, 0)
    figures = cross_validate.figures(scores, empty, rule, [0.0, 0.25, 1.0])
    dice = scores[(slice(None), 0, *rule)]
    assert figures["dice"] == pytest.approx(float(dice.mean()))
    assert figures["mixes"]["1.00"] == pytest.approx(figures["dice_empty"])
    assert figures["mixes"]["0.00"] == pytest.approx(figures["dice_nonempty"])
    assert figures["mixes"]["0.25"] == pytest.approx(0.25 * figures["dice_empty"] + 0.75 * figures["dice_nonempty"])
