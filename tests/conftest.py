"""Shared fixtures: small synthetic downloads, their clean copies and a trained run, made once per session."""

import os
from pathlib import Path

import pytest
import torch

from nerveseg.cleaning import synthetic
from tests.helpers import FAST_TRAINING, run_script

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # make test: pytest -n auto, one worker per core
    # The workers share the cores: each, and every script it starts, computes with its share of them, since
    # torch's default of a thread per core in every worker would oversubscribe the machine.
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_download(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """A TINY synthetic Kaggle download (folders), and its planted contradictory pairs. Do not modify it."""
    root = tmp_path_factory.mktemp("tiny") / "download"
    planted = synthetic.write_kaggle_download(root, synthetic.TINY, workers=1)
    return root, planted


@pytest.fixture(scope="session")
def train_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic download for training tests: 6 subjects of 10 frames."""
    root = tmp_path_factory.mktemp("small") / "download"
    spec = synthetic.SyntheticSpec(n_subjects=6, frames_per_subject=10, n_test=6, n_contradictions=1, seed=3)
    synthetic.write_kaggle_download(root, spec, workers=1)
    return root


@pytest.fixture(scope="session")
def train_clean(train_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train_download, cleaned. Do not modify it."""
    output = tmp_path_factory.mktemp("small-clean") / "clean"
    result = run_script(
        "data_cleaning.py", "--source", str(train_download), "--output", str(output), "--quiet", cwd=output.parent
    )
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="session")
def trained_run(train_clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch training run on train_clean; returns its working folder (model at 2D_Nerve_Segmentation.pt)."""
    work = tmp_path_factory.mktemp("trained")
    result = run_script(
        "train.py", "--data-dir", str(train_clean), "--max-epochs", "2", "--run-name", "first", *FAST_TRAINING, cwd=work
    )
    assert result.returncode == 0, result.stderr
    return work
