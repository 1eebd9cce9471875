"""Makes nnU-Net v2 results folders with real nnU-Net and predicts with ``nnUNetv2_predict_from_modelfolder``: the
reference side of ``test_nnunet_parity.py``, run as its own process (nnU-Net reads its folders from environment
variables at import).

Usage: ``python nnunet_reference.py WORK`` where ``WORK/raw/Dataset901_Tiny`` holds imagesTr, labelsTr and
dataset.json and ``WORK/inputs`` the images to predict. Writes ``WORK/results/.../fold_k/checkpoint_final.pth``:
nnU-Net's planner plans the dataset (2d and 3d_fullres); nnU-Net's trainer builds the network of the plans, trains
it for 40 iterations on the planned, preprocessed data, and saves its checkpoint (its own format). Then
``WORK/pred/<configuration>_<folds>_<tta|notta>/`` holds nnU-Net's labels and ``--save_probabilities`` files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORK = Path(sys.argv[1])
os.environ.update(nnUNet_raw=str(WORK / "raw"), nnUNet_preprocessed=str(WORK / "preprocessed"),
                  nnUNet_results=str(WORK / "results"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")


def main() -> None:
    import random

    import numpy as np
    import torch

    torch.set_num_threads(2)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.run.run_training import get_trainer_from_args

    ITERATIONS = int(os.environ.get("NNUNET_REFERENCE_ITERATIONS", "40"))
    SEED = int(os.environ.get("NNUNET_REFERENCE_SEED", "0"))
    extract_fingerprints([901], num_processes=1)
    plan_experiments([901])
    preprocess([901], configurations=("2d", "3d_fullres"), num_processes=(1, 1))
    os.environ["nnUNet_n_proc_DA"] = "0"  # the trainer's data augmentation in this process: no workers to clean up

    for configuration in ("3d_fullres", "2d"):
        for fold in (0, 1):
            # nnU-Net's trainer seeds nothing: its weights come from torch's generator and its batches and augmentation
            # from numpy's and random's (in this process, nnUNet_n_proc_DA=0). Seeded, a run makes the same models.
            random.seed(SEED + fold)
            np.random.seed(SEED + fold)
            torch.manual_seed(SEED + fold)
            trainer = get_trainer_from_args("901", configuration, fold, "nnUNetTrainer", "nnUNetPlans", device=torch.device("cpu"))
            trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, trainer.num_epochs = ITERATIONS, 1, 1
            trainer.on_train_start()  # dataloaders, mirroring axes, logger
            trainer.network.train()
            for _ in range(ITERATIONS):
                trainer.train_step(next(trainer.dataloader_train))
            trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
            for loader in (trainer.dataloader_train, trainer.dataloader_val):
                if hasattr(loader, "_finish"):
                    loader._finish()
            print(f"saved {configuration} fold {fold}", flush=True)

    results = WORK / "results" / "Dataset901_Tiny"
    for configuration, folds, tta in (("3d_fullres", ["0"], True), ("3d_fullres", ["0", "1"], True),
                                      ("3d_fullres", ["0"], False), ("2d", ["0"], True), ("2d", ["0", "1"], False)):
        out = WORK / "pred" / f"{configuration}_{'-'.join(folds)}_{'tta' if tta else 'notta'}"
        cmd = [str(Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")), "-i", str(WORK / "inputs"),
               "-o", str(out), "-m", str(results / f"nnUNetTrainer__nnUNetPlans__{configuration}"), "-f", *folds,
               "--save_probabilities", "-device", "cpu", "-npp", "1", "-nps", "1"] + ([] if tta else ["--disable_tta"])
        subprocess.run(cmd, check=True)
        print(f"predicted {out.name}", flush=True)


if __name__ == "__main__":
    main()
