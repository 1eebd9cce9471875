"""The end-to-end chain: train -> predict the test cases -> evaluate -> report, in one tracked run.

Used by ``medseg demo`` and by ``pipelines/``. Each step is one library call; this module only wires them
and records the results in the training run's MLflow entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medseg.config import Config, config_hash
from medseg.errors import DatasetError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_folder
from medseg.io.dataset import load_dataset
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_report
from medseg.tracking import MlflowTracker
from medseg.training.trainer import FitResult, fit

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """Where everything went."""

    fit: FitResult
    predictions: Path
    evaluation: Path
    report: Path
    tracking_uri: str
    run_id: str | None
    test_dice: dict[str, float | None]
    n_failed: int


def train_predict_evaluate(cfg: Config, out_dir: str | Path, show_progress: bool = True) -> PipelineResult:
    """Trains on ``cfg.data.dataset``'s training cases, then predicts, evaluates and reports its test cases.

    Layout: ``out/run`` (run folder with model and MLflow store), ``out/predictions``, ``out/evaluation``
    (``metrics.csv``, ``summary.json``, ``report.html``).

    Raises:
        DatasetError: ``DATASET_NO_TEST_LABELS`` when the dataset has no labelled test cases.
        MedsegError: From any step.
    """
    out = Path(out_dir)
    dataset = load_dataset(cfg.data.dataset or "")
    if not dataset.test or any(c.label is None for c in dataset.test):
        raise DatasetError("DATASET_NO_TEST_LABELS", f"{dataset.root} needs imagesTs/ with labels in labelsTs/")
    run_dir = out / "run"
    tracker = MlflowTracker.for_run_dir(cfg.tracking, run_dir, run_name=f"{dataset.name}-{cfg.model.name}")
    tracker.set_tags({"medseg.dataset": dataset.name, "medseg.config_hash": config_hash(cfg)})
    try:
        result = fit(cfg, run_dir, tracker, show_progress=show_progress)
        log.info("predicting %d test case(s)", len(dataset.test))
        predictor = Predictor.from_model_dir(result.model_dir, cfg.train.device)
        test_images = dataset.test[0].image.parent
        cases = predict_folder(predictor, test_images, out / "predictions", overwrite=True)
        n_failed = sum(c.status != "ok" for c in cases)
        labels = {k: v for k, v in dataset.labels.items() if k != 0}
        context = {
            "Model": str(result.model_dir.resolve()),
            "Dataset": dataset.name,
            "MLflow run": f"{tracker.run_id} ({tracker.uri})",
            "Config hash": config_hash(cfg),
        }
        window = cfg.data.intensity.window if cfg.data.intensity.scheme == "ct_window" else None
        summary = evaluate_folders(
            out / "predictions", test_images.parent / "labelsTs", out / "evaluation", labels, test_images, context, window
        )
        report = write_report(out / "evaluation")
        test_dice = {name: summary[name]["dice"]["mean"] for name in labels.values()}
        tracker.log_metrics({f"test_dice_{k}": v for k, v in test_dice.items() if v is not None})
        tracker.log_artifact(out / "evaluation", "evaluation")
        tracker.log_artifact(out / "predictions" / "manifest.json", "predictions")
        tracker.close("FINISHED" if n_failed == 0 else "FAILED")
    except BaseException:
        tracker.close("FAILED")
        raise
    return PipelineResult(
        result, out / "predictions", out / "evaluation", report, tracker.uri, tracker.run_id, test_dice, n_failed
    )

