"""End-to-end chains: train -> predict -> evaluate -> report, in one tracked run.

Used by ``medseg train`` (validation cases), ``medseg demo`` and ``pipelines/`` (test cases). Each step is
one library call; this module wires them and records results in the training run's MLflow entry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medseg.config import Config, config_hash
from medseg.errors import DatasetError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_files
from medseg.io.dataset import Case, load_dataset
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_report
from medseg.tracking import MlflowTracker, Tracker
from medseg.training.trainer import FitResult, fit

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Outcome of :func:`evaluate_model` on a set of cases."""

    predictions: Path
    evaluation: Path
    report: Path
    summary: dict
    n_failed: int

    @property
    def mean_dice(self) -> dict[str, float | None]:
        """Mean Dice per label name."""
        return {name: metrics["dice"]["mean"] for name, metrics in self.summary.items()}


def summary_metrics(summary: dict, prefix: str) -> dict[str, float]:
    """Flattens an evaluation summary to MLflow metrics: ``<prefix>_<metric>_<label>`` (means) and lesion F1."""
    out = {}
    for label, metrics in summary.items():
        for metric in ("dice", "iou", "nsd", "hd95", "assd", "vol_err_pct"):
            if metrics[metric]["mean"] is not None:
                out[f"{prefix}_{metric}_{label}"] = metrics[metric]["mean"]
        f1 = metrics["lesions_pooled"]["f1"]
        if f1 is not None and f1 == f1:
            out[f"{prefix}_lesion_f1_{label}"] = f1
    return out


def evaluate_model(
    fit_result: FitResult, cfg: Config, cases: list[Case], out: Path, name: str, tracker: Tracker, tracking_uri: str
) -> EvaluationResult:
    """Predicts ``cases`` with the run's best model, evaluates them, writes the report and logs it.

    Outputs go to ``out/predictions`` and ``out/evaluation``; MLflow gets ``<name>_<metric>_<label>`` metrics
    and the evaluation folder as the artifact ``<name>/``.
    """
    dataset = load_dataset(cfg.data.dataset or "")
    labels = {k: v for k, v in dataset.labels.items() if k != 0}
    log.info("predicting %d %s case(s)", len(cases), name)
    predictor = Predictor.from_model_dir(fit_result.model_dir, cfg.train.device)
    results = predict_files(predictor, [c.image for c in cases], out / "predictions", overwrite=True)
    ok = [c for c, r in zip(cases, results) if r.status == "ok"]
    context = {
        "Model": str(fit_result.model_dir.resolve()),
        "Dataset": f"{dataset.name} ({name} cases)",
        "MLflow run": f"{tracker.run_id} ({tracking_uri})",
        "Config hash": config_hash(cfg),
    }
    window = cfg.data.intensity.window if cfg.data.intensity.scheme == "ct_window" else None
    summary = evaluate_folders(
        out / "predictions", ok[0].label.parent, out / "evaluation", settings=cfg.evaluation, labels=labels,
        images_dir=ok[0].image.parent, context=context, window=window, cases=[c.id for c in ok],
    )
    report = write_report(out / "evaluation")
    tracker.log_metrics(summary_metrics(summary, name))
    tracker.log_artifact(out / "evaluation", name)
    return EvaluationResult(out / "predictions", out / "evaluation", report, summary, len(cases) - len(ok))


def train_and_validate(cfg: Config, run_dir: Path, tracker: MlflowTracker, show_progress: bool = True) -> tuple[FitResult, EvaluationResult]:
    """Trains, then evaluates the best model on the validation cases (``run_dir/validation``)."""
    result = fit(cfg, run_dir, tracker, show_progress=show_progress)
    dataset = load_dataset(cfg.data.dataset or "")
    by_id = {c.id: c for c in dataset.training}
    val_ids = json.loads((run_dir / "splits.json").read_text())["val"]
    evaluation = evaluate_model(result, cfg, [by_id[i] for i in val_ids], run_dir / "validation", "val", tracker, tracker.uri)
    return result, evaluation


@dataclass
class PipelineResult:
    """Where everything went."""

    fit: FitResult
    test: EvaluationResult
    tracking_uri: str
    run_id: str | None


def train_predict_evaluate(cfg: Config, out_dir: str | Path, show_progress: bool = True) -> PipelineResult:
    """Trains on ``cfg.data.dataset``'s training cases and evaluates its labelled test cases.

    Layout: ``out/run`` (run folder: model, MLflow store, ``validation/``), ``out/predictions`` and
    ``out/evaluation`` (``metrics.csv``, ``summary.json``, ``report.html``, ``report.pdf``) for the test cases.

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
        result, _ = train_and_validate(cfg, run_dir, tracker, show_progress)
        test = evaluate_model(result, cfg, dataset.test, out, "test", tracker, tracker.uri)
        tracker.log_artifact(out / "predictions" / "manifest.json", "predictions")
        tracker.close("FINISHED" if test.n_failed == 0 else "FAILED")
    except BaseException:
        tracker.close("FAILED")
        raise
    return PipelineResult(result, test, tracker.uri, tracker.run_id)
