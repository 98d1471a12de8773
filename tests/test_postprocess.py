"""nerveseg/postprocess.py: from probabilities to masks, and choosing the rule on validation."""

import pytest
import torch
import torch.nn.functional as F

from nerveseg import postprocess
from nerveseg.metrics import kaggle_dice
from nerveseg.postprocess import (
    THRESHOLDS,
    PostProcessing,
    choose_postprocessing,
    default_postprocessing,
    metrics_of_rule,
    to_mask,
    tuning_scores,
    upsample,
)


def dice_sum(rule: PostProcessing, maps: list[torch.Tensor], truths: list[torch.Tensor]) -> float:
    """The summed Kaggle Dice of the masks that `rule` makes of full-size probability maps (no presence output)."""
    masks = [torch.from_numpy(to_mask(probability, 1.0, rule)).bool()[None, None] for probability in maps]
    return sum(float(kaggle_dice(mask, truth[None])) for mask, truth in zip(masks, truths, strict=True))


def test_post_processing_never_lowers_the_validation_dice():
    generator = torch.Generator().manual_seed(0)
    for trial in range(3):
        total, maps, truths = 0, [], []
        for index in range(6):
            truth = torch.zeros(1, 42, 58, dtype=torch.bool)
            if index % 2:
                truth[:, 10:20, 20:35] = True
            probability = torch.rand(1, 1, 21, 29, generator=generator) * (0.4 + 0.2 * trial)
            probability[..., 5:10, 10:17] += 0.5 * (index % 2)
            (full,) = upsample(probability.clamp(0, 1), [(42, 58)])
            assert full.shape == truth.shape
            maps.append(full)
            truths.append(truth)
            total = total + tuning_scores(full, 1.0, truth, has_presence=False)
        chosen, best, raw = choose_postprocessing(total, images=6, has_presence=False)
        # the sums it reports are those of applying the rules to the maps, and the chosen one scores no lower
        assert best == pytest.approx(dice_sum(chosen, maps, truths))
        assert raw == pytest.approx(dice_sum(PostProcessing(), maps, truths))
        assert dice_sum(chosen, maps, truths) >= dice_sum(PostProcessing(), maps, truths) - 1e-9
        assert chosen.threshold in THRESHOLDS
    assert best > raw, "on the last trial a higher threshold or a minimum area beats 0.5"


def test_the_presence_rule_empties_images_judged_empty_where_area_cannot():
    """Spurious blobs on empty images as large as the real targets: only presence tells them apart."""
    truths, maps, presences = [], [], []
    for index in range(6):
        truth = torch.zeros(1, 40, 60, dtype=torch.bool)
        probability = torch.full((1, 40, 60), 0.05)
        probability[:, 10:25, 20:40] = 0.95  # the same blob everywhere
        if index % 2:
            truth[:, 10:25, 20:40] = True
        truths.append(truth)
        maps.append(probability)
        presences.append(0.8 if index % 2 else 0.15)
    with_presence = sum(
        tuning_scores(p, q, t, has_presence=True) for p, q, t in zip(maps, presences, truths, strict=True)
    )
    chosen, best, default = choose_postprocessing(with_presence, images=6, has_presence=True)
    assert best == pytest.approx(6.0) and default == pytest.approx(6.0)  # the default 0.5 already separates
    assert 0.15 < chosen.presence_threshold <= 0.8
    without = sum(tuning_scores(p, 1.0, t, has_presence=False) for p, t in zip(maps, truths, strict=True))
    _, best_without, _ = choose_postprocessing(without, images=6, has_presence=False)
    assert best_without == pytest.approx(3.0)  # every choice of threshold and area: all blobs or none
    assert choose_postprocessing(without, images=6, has_presence=False)[0].presence_threshold == 0.0
    assert not to_mask(maps[0], 0.15, chosen).any() and to_mask(maps[1], 0.8, chosen).sum() == 15 * 20


@pytest.mark.parametrize(
    ("gains", "adopted"),
    [([1.0] + [0.0] * 59, False), ([0.2] * 60, True), ([0.3, -0.1] * 30, True), ([1.0, -0.9] * 30, False)],
    ids=["one image flips", "every image gains", "most gain a little", "large gains and losses"],
)
def test_a_rule_replaces_the_default_only_when_its_gain_beats_the_noise(gains, adopted):
    from nerveseg.postprocess import MIN_AREA_FRACTIONS, PRESENCE_THRESHOLDS, default_index

    shape = (len(PRESENCE_THRESHOLDS), 2, len(THRESHOLDS), len(MIN_AREA_FRACTIONS))
    default, other = default_index(has_presence=True), (PRESENCE_THRESHOLDS.index(0.7), 1, 0, 3)
    tuning = torch.zeros(2, *shape, dtype=torch.float64)
    for gain in gains:
        table = torch.full(shape, 0.5, dtype=torch.float64)
        table[other] += gain
        tuning[0] += table
        tuning[1] += (table - table[default]) ** 2
    chosen, best, default_sum = choose_postprocessing(tuning, images=len(gains), has_presence=True)
    assert (chosen.presence_threshold == 0.7 and chosen.keep_largest) == adopted
    assert default_sum == pytest.approx(0.5 * len(gains))  # the sums of the rule kept, and of the default
    assert best == pytest.approx(default_sum + sum(gains) if adopted else default_sum)


def prior_case(empty_images: int, target_images: int) -> tuple[torch.Tensor, int, int]:
    """Summed tuning scores of a validation set where the same blob is drawn on every image: the presence head
    says 0.1 on most empty images, 0.45 on a fifth of them and on every image with a target."""
    tuning = 0
    for index in range(empty_images + target_images):
        truth = torch.zeros(1, 40, 60, dtype=torch.bool)
        probability = torch.full((1, 40, 60), 0.05)
        probability[:, 10:25, 20:40] = 0.95
        has_target = index >= empty_images
        if has_target:
            truth[:, 10:25, 20:40] = True
        presence = 0.45 if has_target or index % 5 == 0 else 0.1
        tuning = tuning + tuning_scores(probability, presence, truth, has_presence=True)
    return tuning, empty_images + target_images, empty_images


def test_the_balanced_rule_does_not_learn_the_share_of_empty_images():
    """20 empty images and 4 with a target: by Kaggle Dice, presence 0.4 finds the 4 targets but marks 4 empty
    images, a tie with the default 0.5 (which calls all 24 empty); as if half were empty, 0.4 (or 0.3) wins clearly."""
    tuning, images, empty = prior_case(20, 4)
    kaggle, best, default = choose_postprocessing(tuning, images=images, has_presence=True)
    assert kaggle.presence_threshold == 0.5 and best == pytest.approx(default) == pytest.approx(20.0)
    balanced, best, default = choose_postprocessing(tuning, images=images, images_empty=empty, has_presence=True,
                                                    balanced=True)
    assert balanced.presence_threshold < 0.45  # 0.3 and 0.4 tie: the first
    assert (best, default) == (pytest.approx(20.0), pytest.approx(20.0))  # Kaggle sums, as before
    # where no image or every image is empty there is nothing to balance: the Kaggle choice
    only_targets, images, _ = prior_case(0, 4)
    assert choose_postprocessing(only_targets, images=images, images_empty=0, has_presence=True,
                                 balanced=True)[0] == choose_postprocessing(only_targets, images=images,
                                                                            has_presence=True)[0]


def test_the_balanced_rule_keeps_the_default_within_the_noise():
    """One target among few images: finding it would be a large balanced gain, but from a single image."""
    tuning, images, empty = prior_case(5, 1)
    balanced = choose_postprocessing(tuning, images=images, images_empty=empty, has_presence=True, balanced=True)[0]
    assert balanced.presence_threshold == 0.5


def test_upsample_gives_each_map_at_its_size_in_order_a_bounded_number_of_pixels_at_a_time(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 1, 8, 12, generator=generator)
    sizes = [(40, 60), (40, 60), (40, 60), (20, 30), (40, 60)]
    one_by_one = [F.interpolate(maps[i : i + 1], size=size, mode="bilinear", align_corners=False)[0]
                  for i, size in enumerate(sizes)]
    calls = []
    interpolate = F.interpolate
    monkeypatch.setattr(postprocess.F, "interpolate", lambda x, **kw: calls.append(len(x)) or interpolate(x, **kw))
    resized = postprocess.upsample(maps, sizes, max_pixels=2 * 40 * 60)
    assert not calls  # lazy: nothing is resized before it is asked for
    for got, expected in zip(resized, one_by_one, strict=True):
        assert torch.equal(got, expected)
    assert calls == [2, 1, 1, 1]  # at most two 40x60 maps at a time; a run of one size ends at another size
    assert len(list(postprocess.upsample(maps, sizes))) == 5
    assert calls[4:] == [3, 1, 1]  # the default bound holds the whole run of 40x60 maps


def test_the_balanced_rule_never_lowers_the_balanced_dice():
    """What the balanced choice guarantees: on the images it is chosen on, the rule scores at least the default
    on its objective, the mean of the Dice of empty truths and of targets (its Kaggle Dice may be lower)."""
    generator = torch.Generator().manual_seed(1)
    default = default_postprocessing(has_presence=True)
    changed = 0
    for trial in range(4):
        tuning, images, empty = 0, 12, 0
        for index in range(images):
            truth = torch.zeros(1, 40, 60, dtype=torch.bool)
            has_target = index % 3 == 0
            truth[:, 10:22, 20:38] = has_target
            empty += not has_target
            probability = torch.rand(1, 40, 60, generator=generator) * (0.5 + 0.15 * trial)
            probability[:, 12:20, 22:36] += 0.4 * has_target
            presence = float(torch.rand((), generator=generator))
            tuning = tuning + tuning_scores(probability.clamp(0, 1), presence, truth, has_presence=True)
        chosen = choose_postprocessing(tuning, images=images, images_empty=empty, has_presence=True, balanced=True)[0]
        scores = [metrics_of_rule(tuning, rule, images=images, images_empty=empty) for rule in (chosen, default)]
        balanced_chosen, balanced_default = ((s["dice_empty"] + s["dice_nonempty"]) / 2 for s in scores)
        assert balanced_chosen >= balanced_default - 1e-9, trial
        changed += chosen != default
    assert changed  # the test reaches rules other than the default
