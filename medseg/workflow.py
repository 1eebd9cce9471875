"""End-to-end chains: train -> predict -> evaluate -> report, in one tracked run.

Used by ``medseg train`` (validation cases), ``medseg demo`` and ``pipelines/`` (test cases). Each step is
one library call; this module wires them and records results in the training run's MLflow entry.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from medseg.config import Config, config_hash, load_config, planned
from medseg.errors import ConfigError, DatasetError, InputError
from medseg.fsutil import read_json, write_json, write_text
from medseg.inference.manifest import qc_records
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_files
from medseg.io.dataset import Case, load_configured
from medseg.io.readers import files_by_id
from medseg.metrics.catalogue import names
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_overlays, write_report
from medseg.tracking import MlflowTracker, resolve_tracking_uri
from medseg.training.folds import load_or_make_splits
from medseg.training.tracker import NullTracker, Tracker, Trackers, tracked_run
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


def shown_uri(uri: str) -> str:
    """A tracking URI as reports show it: a local file store by its file name only (no path of this machine)."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return f"local store {Path(uri[len(scheme):]).name}"
    return uri


def summary_metrics(summary: dict, prefix: str) -> dict[str, float]:
    """Flattens an evaluation summary to MLflow metrics: ``<prefix>_<metric>_<label>`` (means) and lesion F1."""
    out = {}
    for label, metrics in summary.items():
        for metric in names("mlflow"):
            if metric in metrics and metrics[metric]["mean"] is not None:
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
    dataset = load_configured(cfg.data)
    labels = {k: v for k, v in dataset.labels.items() if k != 0}
    log.info("predicting %d %s case(s)", len(cases), name)
    predictor = Predictor.from_model_dir(fit_result.model_dir, cfg.train.device)
    results = predict_files(
        predictor, [c.images if len(c.images) > 1 else c.image for c in cases], out / "predictions", overwrite=True
    )
    ok = [c for c, r in zip(cases, results) if r.status == "ok"]
    if not ok:
        raise InputError(
            "PREDICTION_FAILED", f"none of the {len(cases)} {name} case(s) could be predicted",
            f"see {out / 'predictions' / 'manifest.json'} for each case's error",
        )
    context = {
        # the network and its folder as the user sees it: "unet 3D (run/model)", not "model of run run"
        "Model": f"{cfg.model.name} {len(planned(cfg.data.patch_size, 'data.patch_size'))}D ({fit_result.model_dir.parent.name}/{fit_result.model_dir.name})",
        "Dataset": f"{dataset.name} ({name} cases)",
        "MLflow run": f"{tracker.run_id} ({shown_uri(tracking_uri)})",
        "Config hash": config_hash(cfg),
    }
    window = report_window(cfg)
    assert ok[0].label is not None  # evaluation cases carry labels (load_dataset)
    summary = evaluate_folders(
        out / "predictions", ok[0].label.parent, out / "evaluation", settings=cfg.evaluation, labels=labels,
        context=context, window=window, cases=[c.id for c in ok], qc=qc_records(out / "predictions"),
    )
    write_overlays(out / "evaluation", out / "predictions", ok[0].label.parent, ok[0].image.parent)
    report = write_report(out / "evaluation")
    tracker.log_metrics(summary_metrics(summary, name))
    tracker.log_artifact(out / "evaluation", name)
    return EvaluationResult(out / "predictions", out / "evaluation", report, summary, len(cases) - len(ok))


def report_window(cfg: Config) -> tuple[float, float] | None:
    """Display window of the report's images: the configured intensity window (``data.intensity.window``, e.g.
    the CT window the model was trained with), else None (the report chooses one from the image)."""
    window = cfg.data.intensity.window
    return (float(window[0]), float(window[1])) if window is not None else None


def train_and_validate(
    cfg: Config,
    run_dir: Path,
    tracker: Tracker,
    show_progress: bool = True,
    resume: bool = False,
    split: tuple[list[str], list[str]] | None = None,
    teachers: list[Path] | None = None,
) -> tuple[FitResult, EvaluationResult | None]:
    """Trains (or resumes; with ``teachers``, distils them), then evaluates the best model on the validation
    cases (``run_dir/validation``).

    Under ``torchrun`` only rank 0 evaluates; other ranks get ``None``.
    """
    result = fit(cfg, run_dir, tracker, show_progress=show_progress, resume=resume, split=split, teachers=teachers)
    if not result.is_main:
        return result, None
    resolved = load_config(run_dir / "config.yaml")
    dataset = load_configured(resolved.data)
    by_id = {c.id: c for c in dataset.training}
    val_ids = read_json(run_dir / "splits.json", "SPLITS_MISMATCH", "split record")["val"]
    cases = [by_id[i] for i in val_ids]
    evaluation = evaluate_model(result, resolved, cases, run_dir / "validation", "val", tracker, tracker.uri)
    return result, evaluation


RESUMABLE_KEYS = {"train.epochs", "train.early_stopping", "train.val_every", "tracking.tensorboard",
                  "tracking.tensorboard_dir"}


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's saved configuration with ``overrides`` applied (only epochs, early stopping, val_every and the
    TensorBoard switch and folder).

    Raises:
        ConfigError: ``RESUME_CONFIG_CHANGED`` when another key is overridden.
    """
    changed = sorted({o.partition("=")[0].strip() for o in overrides} - RESUMABLE_KEYS)
    if changed:
        raise ConfigError(
            "RESUME_CONFIG_CHANGED", f"cannot change {', '.join(changed)} when resuming",
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may change; start a new run for other changes",
        )
    return load_config(run_dir / "config.yaml", overrides)


def check_inputs(cfg: Config, run_dir: Path) -> None:
    """Checks every training case as ``medseg validate`` does, in the pass that fingerprints the dataset, before
    anything else of the run is written (tracking store, run.json, splits); the fingerprint is then saved as
    ``RUN/fingerprint.json``, where training reads it instead of reading the cases again. A resumed run was checked
    when it started. Only rank 0 of a ``torchrun`` job checks.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` / ``CONFIG_INVALID_VALUE`` for the network, loss or optimizer
            (:func:`medseg.training.optim.check_config`), before anything is read.
        DatasetError / InputError: the first failing check's code, naming every failing case.
    """
    import os

    from medseg.plan.fingerprint import load_or_compute
    from medseg.training.optim import check_config

    check_config(cfg)  # network, loss and optimizer: before a case is read
    if int(os.environ.get("RANK", "0")) != 0 or cfg.data.dataset is None:
        return
    dataset = load_configured(cfg.data)
    unknown = sorted(set(cfg.labels) - {str(v) for v in dataset.labels.values()})
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], [str(v) for v in dataset.labels.values()], n=1)
        raise ConfigError("CONFIG_INVALID_VALUE", f"labels: {', '.join(unknown)} is not a label of the dataset",
                          f"did you mean {close[0]!r}?" if close else
                          f"the dataset's labels: {', '.join(str(v) for v in dataset.labels.values())}")
    if (run_dir / "fingerprint.json").is_file():
        load_or_compute(dataset, run_dir / "fingerprint.json", cfg.plan.ct_clip_percentiles)
        return
    from medseg.plan.fingerprint import compute_fingerprint

    # raises before the run folder is created
    fingerprint = compute_fingerprint(dataset, clip_percentiles=cfg.plan.ct_clip_percentiles)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "fingerprint.json", fingerprint.to_json())


def open_run_tracker(cfg: Config, run_dir: Path, run_name: str, resume: bool, store_dir: Path | None = None) -> Tracker:
    """The MLflow run of ``run_dir`` (reopened on resume via ``run.json``); a null tracker on non-zero ranks."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return NullTracker()
    record = run_dir / "run.json"
    if resume and record.is_file():
        saved = read_json(record, "CHECKPOINT_UNREADABLE", "run record")
        tracker = MlflowTracker(saved["tracking_uri"], cfg.tracking.experiment, run_id=saved["mlflow_run_id"])
    else:
        store = store_dir or run_dir
        store.mkdir(parents=True, exist_ok=True)
        uri = resolve_tracking_uri(cfg.tracking, store)
        artifact_dir = store / "mlartifacts" if uri.startswith("sqlite:") else None
        tracker = MlflowTracker(uri, cfg.tracking.experiment, run_name=run_name, artifact_dir=artifact_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(record, {"mlflow_run_id": tracker.run_id, "tracking_uri": uri})
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics()
    if cfg.tracking.tensorboard:
        return Trackers(tracker, _tensorboard(cfg, run_dir, resume))
    return tracker


def _tensorboard(cfg: Config, run_dir: Path, resume: bool):
    """The TensorBoard writer of a run: ``tracking.tensorboard_dir`` (a fold's events in ``DIR/<fold folder>``) or
    ``RUN/tensorboard``; a resumed run drops the events after its last checkpoint's epoch."""
    from medseg.tracking import TensorBoardTracker

    log_dir = run_dir / "tensorboard"
    if cfg.tracking.tensorboard_dir:
        log_dir = Path(cfg.tracking.tensorboard_dir)
        if run_dir.name.startswith("fold_"):
            log_dir = log_dir / run_dir.name
    progress = run_dir / "checkpoints" / "last.json"
    purge = None
    if resume and progress.is_file():
        purge = int(read_json(progress, "CHECKPOINT_UNREADABLE", "checkpoint record")["epoch"]) + 1
    return TensorBoardTracker(log_dir, purge_step=purge)


@dataclass
class CrossValidationResult:
    """Per-fold results and the pooled evaluation of every fold's validation cases."""

    folds: list[dict]
    summary_path: Path
    pooled: EvaluationResult | None


def cross_validate(cfg: Config, root: Path, folds: list[int | str], resume: bool = False, show_progress: bool = True) -> CrossValidationResult:
    """Trains the given folds in sequence (``root/fold_K``), each validated on its held-out cases, then evaluates
    all validation predictions together (``root/cv``) and writes ``root/cv_summary.json``.

    Splits come from ``root/splits.json`` (made once with ``seed`` and ``data.folds``, then reused). Fold ``all``
    trains on every case and validates on the training cases. All folds log to one MLflow store.
    """
    dataset = load_configured(cfg.data)
    check_inputs(cfg, root)
    splits = load_or_make_splits(root / "splits.json", [c.id for c in dataset.training], cfg.data.folds, cfg.seed)
    everything = sorted(c.id for c in dataset.training)
    results = []
    for fold in folds:
        run_dir = root / f"fold_{fold}"
        split = (everything, everything) if fold == "all" else (splits[int(fold)]["train"], splits[int(fold)]["val"])
        can_resume = resume and (run_dir / "checkpoints" / "last.pt").is_file()
        done = _finished_fold(run_dir, fold) if can_resume else None
        if done is not None:  # trained and validated before: its run stays as it ended
            log.info("fold %s finished before; reusing its results", fold)
            results.append(done)
            continue
        fold_cfg = resume_config(run_dir, []) if can_resume else cfg
        if (root / "fingerprint.json").is_file() and not (run_dir / "fingerprint.json").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)  # the folds share the one checked fingerprint
            shutil.copy2(root / "fingerprint.json", run_dir / "fingerprint.json")
        tracker = open_run_tracker(fold_cfg, run_dir, f"fold_{fold}", can_resume, store_dir=root)
        tracker.set_tags({"medseg.fold": str(fold), "medseg.dataset": dataset.name})
        with tracked_run(tracker):
            result, evaluation = train_and_validate(fold_cfg, run_dir, tracker, show_progress, can_resume, split)
        if evaluation is not None:
            results.append({"fold": fold, "best_epoch": result.best_epoch, "best_val_dice_mean": result.best_metric,
                            "val_dice": evaluation.mean_dice, "run_dir": str(run_dir)})
    numeric = [r for r in results if r["fold"] != "all"]
    pooled = _pool_folds(cfg, root, numeric) if len(numeric) > 1 else None
    labels = sorted({k for r in numeric for k in r["val_dice"]})
    summary = {
        "folds": results,
        "mean_over_folds": {lab: _mean([r["val_dice"][lab] for r in numeric]) for lab in labels},
        "std_over_folds": {lab: _std([r["val_dice"][lab] for r in numeric]) for lab in labels},
        "pooled": pooled.summary if pooled else None,
    }
    write_json(root / "cv_summary.json", summary, default=lambda v: None)
    return CrossValidationResult(results, root / "cv_summary.json", pooled)


def _finished_fold(run_dir: Path, fold: int | str) -> dict | None:
    """The result of a fold that trained and validated to the end (its validation summary exists), else None."""
    from medseg.models.folder import INFO, read_info

    summary_path = run_dir / "validation" / "evaluation" / "summary.json"
    if not (summary_path.is_file() and (run_dir / "model" / INFO).is_file()):
        return None
    summary, info = read_json(summary_path, "EVAL_DIR_INVALID", "summary"), read_info(run_dir / "model")
    return {"fold": fold, "best_epoch": info.get("epoch"), "best_val_dice_mean": info.get("val_dice_mean"),
            "val_dice": {name: m["dice"]["mean"] for name, m in summary.items()}, "run_dir": str(run_dir)}


def _mean(values: list) -> float | None:
    finite = [v for v in values if v is not None and v == v]
    return sum(finite) / len(finite) if finite else None


def _std(values: list) -> float | None:
    finite = [v for v in values if v is not None and v == v]
    if len(finite) < 2:
        return None
    mean = sum(finite) / len(finite)
    return (sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) ** 0.5


def _pool_folds(cfg: Config, root: Path, folds: list[dict]) -> EvaluationResult:
    """Evaluates every fold's validation predictions together, against the training labels."""
    dataset = load_configured(cfg.data)
    pooled = root / "cv" / "predictions"
    pooled.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        for path in files_by_id(Path(fold["run_dir"]) / "validation" / "predictions").values():
            shutil.copy2(path, pooled / path.name)  # label files only (not manifest.json, provenance.json)
    labels = {k: v for k, v in dataset.labels.items() if k != 0}
    first = dataset.training[0]
    assert first.label is not None  # training cases carry labels (load_dataset)
    ids = sorted(files_by_id(pooled))
    summary = evaluate_folders(
        pooled, first.label.parent, root / "cv" / "evaluation", settings=cfg.evaluation, labels=labels,
        context={"Dataset": f"{dataset.name} (cross-validation, {len(folds)} folds)"}, cases=ids,
    )
    write_overlays(root / "cv" / "evaluation", pooled, first.label.parent, first.image.parent)
    report = write_report(root / "cv" / "evaluation")
    return EvaluationResult(pooled, root / "cv" / "evaluation", report, summary, 0)


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
    dataset = load_configured(cfg.data)
    if not dataset.test or any(c.label is None for c in dataset.test):
        raise DatasetError("DATASET_NO_TEST_LABELS", f"{dataset.root} needs imagesTs/ with labels in labelsTs/")
    run_dir = out / "run"
    check_inputs(cfg, run_dir)
    tracker = open_run_tracker(cfg, run_dir, f"{dataset.name}-{cfg.model.name}", resume=False)
    tracker.set_tags({"medseg.dataset": dataset.name, "medseg.config_hash": config_hash(cfg)})
    with tracked_run(tracker) as run:
        result, _ = train_and_validate(cfg, run_dir, tracker, show_progress)
        test = evaluate_model(result, cfg, dataset.test, out, "test", tracker, tracker.uri)
        tracker.log_artifact(out / "predictions" / "manifest.json", "predictions")
        if test.n_failed:
            run.fail()
    return PipelineResult(result, test, tracker.uri, tracker.run_id)
