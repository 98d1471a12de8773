"""nerveseg/training/tracking.py: the TensorBoard log of a training run."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import FAST_TRAINING, run_script

pytestmark = pytest.mark.slow  # the test reads the log of a train.py run


def test_training_writes_tensorboard_logs_unless_asked_not_to(trained_run, train_clean, tmp_path):
    events = EventAccumulator(str(trained_run / "runs" / "first"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/validation", "kaggle_dice/all", "kaggle_dice/empty_truths",
            "kaggle_dice/with_target", "learning_rate", "speed/training_images_per_second"} <= scalars
    assert [event.step for event in events.Scalars("kaggle_dice/all")] == [1, 2]
    pictures = events.Images("validation/prediction_red_truth_green")
    assert [picture.step for picture in pictures] == [2]  # every 5 epochs and at the last
    result = run_script("train.py", "--data-dir", str(train_clean), "--max-epochs", "1", "--run-name", "quiet",
                        "--tensorboard", "false", *FAST_TRAINING, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "runs" / "quiet").glob("events.out.tfevents.*"))
