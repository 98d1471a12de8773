"""nnU-Net v2's side of the peer benchmark: plan, train or predict one dataset. Run by nnunet.py, in a Python that
has nnunetv2 (benchmarks/peers/requirements.txt), with nnUNet_raw, nnUNet_preprocessed and nnUNet_results set.

    python benchmarks/peers/nnunet_worker.py plan --dataset 501
    python benchmarks/peers/nnunet_worker.py train --dataset 501 --epochs 10 --iterations 21 --val-iterations 4
    python benchmarks/peers/nnunet_worker.py predict --dataset 501 --output predictions/

nnU-Net's own command-line tools look trainers up by importing every trainer module, and some of those (the
Primus trainers) import timm and torchvision, which fail beside a CPU-only torch; this worker builds its trainer
and its predictor from Python directly, so nothing imports them. Each command ends by writing a JSON of what it
did (--report).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

CONFIGURATION = "2d"  # nnU-Net's configuration for 2-D images
PLANS = "nnUNetPlans"  # the plans of nnU-Net's default planner (ExperimentPlanner)
FOLD = 0  # the one fold of splits_final.json: train.py's split


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """nnU-Net's default trainer with its number of epochs and iterations set (class attributes, set before it is
    made), and optionally a limit on the CPU time of its process; everything else (network, loss with deep
    supervision, augmentation, poly SGD, foreground sampling) is nnU-Net's."""

    epochs = 1000  # nnU-Net's defaults
    iterations_per_epoch = 250
    val_iterations_per_epoch = 50
    cpu_seconds = 0.0  # a limit on the process's CPU time (0: none): see on_epoch_end

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:  # noqa: B008 (nnU-Net reads this signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.val_iterations_per_epoch
        self.epoch_cpu_seconds: list[float] = []

    def on_epoch_start(self) -> None:
        self.epoch_started = time.process_time()
        super().on_epoch_start()

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end; under a CPU limit, after the first epoch, the number of epochs becomes what the
        rest of the limit buys at that epoch's CPU time (at least one), and the poly schedule is stretched to it."""
        super().on_epoch_end()
        self.epoch_cpu_seconds.append(time.process_time() - self.epoch_started)
        if self.cpu_seconds and self.current_epoch == 1:
            left = self.cpu_seconds - time.process_time()
            self.num_epochs = 1 + max(0, math.floor(left / self.epoch_cpu_seconds[0]))
            self.lr_scheduler.max_steps = self.num_epochs

    def run_training(self) -> None:
        """nnU-Net's loop (nnUNetTrainer.run_training), reading num_epochs at every epoch, as on_epoch_end may
        change it."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()


def plan(dataset: int) -> dict:
    """Fingerprint, plan and preprocess the 2d configuration; the plan nnU-Net chose."""
    extract_fingerprints([dataset], check_dataset_integrity=True, num_processes=os.cpu_count() or 1)
    plan_experiments([dataset])
    preprocess([dataset], plans_identifier=PLANS, configurations=(CONFIGURATION,), num_processes=(os.cpu_count() or 1,))
    return describe_plan(dataset)


def describe_plan(dataset: int) -> dict:
    """The network, batch and patch of the 2d plan, and the network's parameter count."""
    name = maybe_convert_to_dataset_name(dataset)
    plans_manager = PlansManager(Path(os.environ["nnUNet_preprocessed"], name, f"{PLANS}.json"))
    configuration = plans_manager.get_configuration(CONFIGURATION)
    dataset_json = load_json(str(Path(os.environ["nnUNet_preprocessed"], name, "dataset.json")))
    network = build_network(plans_manager, configuration, dataset_json)
    kwargs = configuration.network_arch_init_kwargs
    return {
        "network": configuration.network_arch_class_name.rsplit(".", 1)[-1],
        "stages": kwargs["n_stages"],
        "features": list(kwargs["features_per_stage"]),
        "parameters": sum(p.numel() for p in network.parameters()),
        "batch_size": configuration.batch_size,
        "patch_size": list(configuration.patch_size),
        "deep_supervision": True,
    }


def build_network(plans_manager: PlansManager, configuration, dataset_json: dict) -> torch.nn.Module:
    """The plan's network, as nnU-Net's trainer builds it (without deep supervision, for inference)."""
    return nnUNetTrainer.build_network_architecture(
        plans_manager,
        configuration,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )


def train(dataset: int, *, epochs: int, iterations: int, val_iterations: int, cpu_seconds: float,
          device: torch.device) -> dict:
    """Train fold 0 (train.py's split) with the budget trainer; no final validation (the benchmark predicts the
    held-out images instead)."""
    name = maybe_convert_to_dataset_name(dataset)
    preprocessed = Path(os.environ["nnUNet_preprocessed"], name)
    nnUNetTrainerBudget.epochs = epochs
    nnUNetTrainerBudget.iterations_per_epoch = iterations
    nnUNetTrainerBudget.val_iterations_per_epoch = val_iterations
    nnUNetTrainerBudget.cpu_seconds = cpu_seconds
    plans = load_json(str(preprocessed / f"{PLANS}.json")) | {"continue_training": False}  # as nnUNetv2_train does
    trainer = nnUNetTrainerBudget(
        plans=plans,
        configuration=CONFIGURATION,
        fold=FOLD,
        dataset_json=load_json(str(preprocessed / "dataset.json")),
        device=device,
    )
    trainer.run_training()
    return {
        "epochs": trainer.num_epochs,
        "iterations_per_epoch": iterations,
        "val_iterations_per_epoch": val_iterations,
        "batch_size": trainer.batch_size,
        "images_seen": trainer.num_epochs * iterations * trainer.batch_size,
        "epoch_cpu_seconds": [round(t, 1) for t in trainer.epoch_cpu_seconds],
        "cpu_seconds": round(time.process_time(), 1),
        "output_folder": trainer.output_folder,
    }


def predict(dataset: int, output: Path, *, device: torch.device) -> dict:
    """Predict the raw dataset's imagesTs with the final checkpoint, writing nnU-Net's masks and probabilities."""
    name = maybe_convert_to_dataset_name(dataset)
    model_folder = Path(os.environ["nnUNet_results"], name, f"{nnUNetTrainerBudget.__name__}__{PLANS}__{CONFIGURATION}")
    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    dataset_json = load_json(str(model_folder / "dataset.json"))
    configuration = plans_manager.get_configuration(CONFIGURATION)
    # nnU-Net's own checkpoint, just written by train: it holds numpy values, so it needs weights_only=False
    checkpoint = torch.load(model_folder / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    network = build_network(plans_manager, configuration, dataset_json)
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [checkpoint["network_weights"]],
                                    dataset_json, nnUNetTrainerBudget.__name__,
                                    checkpoint["inference_allowed_mirroring_axes"])
    images = Path(os.environ["nnUNet_raw"], name, "imagesTs")
    workers = max(1, (os.cpu_count() or 1) // 2)
    predictor.predict_from_files(str(images), str(output), save_probabilities=True, overwrite=True,
                                 num_processes_preprocessing=workers, num_processes_segmentation_export=workers)
    return {"predictions": str(output), "images": len(list(images.glob("*.png")))}


def main() -> None:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "train", "predict"))
    parser.add_argument("--dataset", type=int, required=True, help="nnU-Net dataset id (the folder DatasetNNN_*)")
    parser.add_argument("--epochs", type=int, default=nnUNetTrainerBudget.epochs, help="train: epochs")
    parser.add_argument("--iterations", type=int, default=nnUNetTrainerBudget.iterations_per_epoch,
                        help="train: training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=nnUNetTrainerBudget.val_iterations_per_epoch,
                        help="train: validation iterations per epoch (nnU-Net's pseudo-Dice, for its best checkpoint)")
    parser.add_argument("--cpu-seconds", type=float, default=0.0,
                        help="train: a limit on this process's CPU time; after the first epoch, the number of epochs "
                        "becomes what the rest of it buys (0: none, --epochs holds)")
    parser.add_argument("--output", type=Path, help="predict: folder for the masks and probabilities")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--report", type=Path, help="write what the command did to this JSON file")
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    if device.type == "cpu":
        # as nnU-Net's own nnUNetv2_train does on the CPU, but only the cores this process may use (taskset)
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if arguments.command == "plan":
        result = plan(arguments.dataset)
    elif arguments.command == "train":
        result = train(arguments.dataset, epochs=arguments.epochs, iterations=arguments.iterations,
                       val_iterations=arguments.val_iterations, cpu_seconds=arguments.cpu_seconds, device=device)
    else:
        if arguments.output is None:
            parser.error("predict needs --output")
        result = predict(arguments.dataset, arguments.output, device=device)
    if arguments.report:
        arguments.report.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
