"""The ``medseg`` command line. Each command is a few lines calling the library; heavy imports stay inside.

Exit codes: 0 when everything succeeded; 1 when some cases failed (listed one line each); 2 for a usage,
configuration or input error, printed as one line ``error: CODE: message (hint: ...)`` without a traceback;
3 for an unexpected internal error (one line; ``MEDSEG_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer

import medseg
from medseg.errors import DatasetError, MedsegError
from medseg.inference.formats import help_text as output_help

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="medseg: medical image segmentation — data, training, inference, evaluation, reports.",
)

SET_HELP = "Override a config key, e.g. --set train.epochs=3 (repeatable)."
THREADS_HELP = ("CPU threads for torch/OpenMP/BLAS: auto (this process's share of the CPUs, split with the other medseg "
                "processes running here) or a number.")


def _tensorboard_option():
    return typer.Option(None, "--tensorboard", metavar="DIR", help=(
        "Also write TensorBoard event files (scalars, validation overlays, graph) into DIR: tracking.tensorboard, "
        "needs medseg[tensorboard]; `tensorboard --logdir DIR` shows them."))


def _threads_option():
    return typer.Option("auto", "--threads", envvar="MEDSEG_THREADS", help=THREADS_HELP)


def _dicom_option():
    return typer.Option([], "--dicom", metavar="KEY=VALUE", help=(
        "DICOM stack tolerance (repeatable): min_slices, orientation, step_relative, step_floor_mm, drift_px; "
        "defaults: the model's inference.dicom (configs/base.yaml)."))


def _claim_threads(value: str) -> None:
    """Takes this process's CPU share (see medseg.threads) before any heavy work starts."""
    from medseg import threads

    n = threads.claim(threads.parse_threads(value))
    logging.getLogger(__name__).debug("using %d CPU thread(s)", n)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medseg {medseg.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Show the version."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, markup=False, console=_stderr_console())
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "onnxscript", "onnx_ir", "torch.onnx", "pynetdicom",
                  "dicomweb_client", "absl", "jax", "litert_torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # LiteRT export's environment: torchao's kernels for other GPUs and torch.export's deprecation notices
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # a damaged header is reported once, by its code


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@app.command("sample-data")
def sample_data(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (ct3d/ and derm2d/ are written inside)."),
    cases: int = typer.Option(16, "--cases", "-n", min=2, help="Cases per dataset (a quarter go to the test split)."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed; the same seed gives the same voxels and pixels (and, with the locked encoders, the same bytes)."),
) -> None:
    """Write the deterministic synthetic datasets (3D CT-like and 2D dermoscopy-like) in MSD layout."""
    from medseg.sample_data import write_sample_data

    roots = write_sample_data(out, cases=cases, seed=seed)
    for kind, root in roots.items():
        typer.echo(f"{kind}: {root}")


@app.command()
def validate(
    dataset: Path = typer.Argument(..., help="Dataset folder (MSD, nnU-Net v2 raw, images/+labels/, DICOM studies with RTSTRUCT/SEG) or a CSV manifest."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the findings as JSON here."),
    config: str | None = typer.Option(None, "--config", "-c", help="Config whose data.labels maps RTSTRUCT/SEG ROI names to labels (DICOM studies)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a dataset's integrity (files, readability, NaN/Inf, channels, image/label geometry, label values).

    For DICOM studies, also lists per case the ROIs found, the label each went to and the unmatched ones.
    Prints a table of problems per case; exits 1 when there is any."""
    from dataclasses import asdict

    from rich.table import Table

    from medseg.config import load_config
    from medseg.fsutil import check_output_file, write_json
    from medseg.io.dataset import dicom_cache
    from medseg.io.validate import validate_dataset

    if json_out:
        check_output_file(json_out)
    data = load_config(config, set_).data
    report = validate_dataset(dataset, data.labels, dicom_cache(data))
    console = _stderr_console()
    typer.echo(
        f"{report.layout} dataset: {report.n_training} training, {report.n_test} test case(s); "
        f"labels {report.labels}"
    )
    if report.sources:
        _print_roi_table(report.sources)
    if json_out:
        payload = {**asdict(report), "root": Path(report.root).name, "ok": report.ok}
        write_json(json_out, payload, default=str)
    if report.ok:
        typer.echo("no problems found")
        return
    table = Table("case", "code", "problem", title=f"{len(report.problems)} problem(s)")
    for case_id, problems in report.by_case().items():
        for i, p in enumerate(problems):
            table.add_row(case_id if i == 0 else "", p.code, p.message)
    console.print(table)
    raise typer.Exit(1)


def _print_roi_table(sources: dict) -> None:
    """The DICOM-study cases: which ROIs made each label, which matched nothing, what was skipped."""
    from rich.table import Table

    table = Table("case", "label <- ROIs", "unmatched ROIs", "notes", title="RTSTRUCT/SEG ROIs per case")
    for case_id, case in sources["cases"].items():
        labels = "; ".join(f"{label} <- {', '.join(rois)}" for label, rois in case["labels"].items())
        table.add_row(case_id, labels or "-", ", ".join(case["unmatched"]) or "-", "; ".join(case["notes"]) or "-")
    _stderr_console().print(table)
    if sources.get("unlabelled_series"):
        typer.echo(f"{sources['unlabelled_series']} image series without an RTSTRUCT/SEG (not cases)", err=True)


@app.command()
def plan(
    dataset: Path = typer.Argument(..., help="Dataset folder (MSD, nnU-Net v2 raw, images/+labels/) or CSV manifest."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the plan here (default: print it)."),
    config: str | None = typer.Option(None, "--config", "-c", help="Config whose 'plan' budgets to use."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    gpu: bool = typer.Option(False, "--gpu/--cpu", help="Plan for the GPU or the CPU memory budget."),
) -> None:
    """Fingerprint a dataset and derive the plan (spacing, patch, batch, network, normalisation) as JSON."""
    from medseg.config import load_config
    from medseg.fsutil import atomic_write, check_output_file
    from medseg.io.dataset import load_dataset
    from medseg.plan.fingerprint import compute_fingerprint
    from medseg.plan.planner import make_plan

    cfg = load_config(config, set_)
    if out is not None:
        check_output_file(out)
    fingerprint = compute_fingerprint(load_dataset(dataset, labels=cfg.data.labels), clip_percentiles=cfg.plan.ct_clip_percentiles)
    made = make_plan(fingerprint, cfg.plan, on_gpu=gpu)
    if out is None:
        typer.echo(made.to_json())
        return
    atomic_write(out, lambda tmp: tmp.write_text(made.to_json()))
    atomic_write(out.with_name(out.stem + ".fingerprint.json"), lambda tmp: tmp.write_text(fingerprint.to_json()))
    typer.echo(f"plan: {out}")
    for note in made.notes:
        typer.echo(f"  {note}")


@app.command()
def train(
    config: str | None = typer.Option(None, "--config", "-c", help="Preset name (demo, smoke, ...) or YAML path."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<time>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its last checkpoint."),
    fold: str | None = typer.Option(None, "--fold", help="Train one cross-validation fold: K or all."),
    folds: str | None = typer.Option(None, "--folds", help="Train folds in sequence, e.g. 0-4; then pool them."),
    tensorboard: Path | None = _tensorboard_option(),
    threads: str = _threads_option(),
) -> None:
    """Train a model, then evaluate it on the validation cases; all tracked in MLflow. Works under torchrun."""
    from medseg.config import load_config, with_tensorboard
    from medseg.training.folds import parse_folds
    from medseg.workflow import cross_validate, resume_config

    run_dir = _start_run(threads, resume, out, config, "a config")
    if fold is not None or folds is not None:
        cfg = with_tensorboard(load_config(config, set_) if config else resume_config(run_dir / "fold_0", set_), tensorboard)
        selected = parse_folds(fold if fold is not None else folds or "", cfg.data.folds)
        result = cross_validate(cfg, run_dir, selected, resume=resume)
        for r in result.folds:
            typer.echo(f"fold {r['fold']}: best validation Dice {r['best_val_dice_mean']:.3f} at epoch {r['best_epoch']}")
        if result.pooled is not None:
            typer.echo(f"cross-validation report: {result.pooled.report}")
        typer.echo(f"summary: {result.summary_path}")
        return
    cfg = resume_config(run_dir, set_) if resume else load_config(config, set_)
    _train_tracked(with_tensorboard(cfg, tensorboard), run_dir, resume, "model")


def _start_run(threads: str, resume: bool, out: Path | None, config: str | None, what: str) -> Path:
    """Common start of train and distill: the CPU share, the argument checks, the run folder (writable: probed
    before the dataset is read, without creating it)."""
    from medseg.fsutil import check_output_dir, remove_stale_partials

    _claim_threads(threads)
    if resume and out is None:
        raise MedsegError("CONFIG_MISSING_KEY", "--resume needs -o RUN, the run folder to continue")
    if config is None and not resume:
        raise MedsegError("CONFIG_MISSING_KEY", f"give {what} with -c (a preset name or a YAML file)")
    run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    check_output_dir(run_dir, "run folder", create=False)
    if resume:
        remove_stale_partials(run_dir)  # a checkpoint or model folder half-written when the run was killed
    return run_dir


def _train_tracked(cfg, run_dir: Path, resume: bool, name: str, teachers: list[Path] | None = None) -> None:
    """Checks the inputs (a new run), trains and validates in the run's MLflow run, and prints where things are."""
    from medseg.training.tracker import tracked_run
    from medseg.workflow import check_inputs, open_run_tracker, train_and_validate

    if not resume:
        check_inputs(cfg, run_dir)  # every training case checked before anything of the run is written
    tracker = open_run_tracker(cfg, run_dir, run_dir.name, resume)
    with tracked_run(tracker):
        result, validation = train_and_validate(cfg, run_dir, tracker, resume=resume, teachers=teachers)
    if validation is None:  # a non-zero torchrun rank
        return
    extra = f"; {len(teachers)} teacher(s)" if teachers else ""
    typer.echo(f"{name}: {result.model_dir} (best validation Dice {result.best_metric:.3f} at epoch {result.best_epoch}{extra})")
    typer.echo(f"validation report: {validation.report}")
    typer.echo(f"MLflow: {tracker.uri} run {tracker.run_id}")


@app.command()
def distill(
    model: list[Path] = typer.Option([], "--model", "-m", help="Teacher model folder; repeat for an ensemble (e.g. the folds of a cross-validation)."),
    config: str | None = typer.Option(None, "--config", "-c", help="The student: a preset name or YAML path (its model section is the student network)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<time>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its last checkpoint (teachers from its teachers.json)."),
    tensorboard: Path | None = _tensorboard_option(),
    threads: str = _threads_option(),
) -> None:
    """Distil one or more trained models into one student: it learns the teachers' averaged softened predictions
    (temperature-scaled KL, distill section) besides the labels. Same tracking, checkpoints, resume and model
    folder as train; the model folder records its teachers."""
    from medseg.config import load_config, with_tensorboard
    from medseg.training.distill import saved_teacher_paths, student_config
    from medseg.workflow import resume_config

    run_dir = _start_run(threads, resume, out, config, "the student's config")
    teachers = list(model) or (saved_teacher_paths(run_dir) if resume else [])
    if not teachers:
        raise MedsegError("CONFIG_MISSING_KEY", "give at least one teacher with -m MODEL_DIR")
    cfg = resume_config(run_dir, set_) if resume else student_config(teachers, load_config(config, set_))
    _train_tracked(with_tensorboard(cfg, tensorboard), run_dir, resume, "student", teachers)


@app.command()
def prune(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder written by `medseg train` (a MONAI UNet)."),
    ratio: float = typer.Option(..., "--ratio", "-r", help="Share of every layer's channels to remove, e.g. 0.25 or 0.5."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<time>)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="The training dataset (needed to fine-tune)."),
    finetune: str = typer.Option("distill", "--finetune", help="distill (labels + the unpruned model's predictions), train (labels only) or none."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Fine-tuning epochs (default: a quarter of the model's train.epochs)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to the fine-tuning run."),
    threads: str = _threads_option(),
) -> None:
    """Remove channels from a trained network (structured pruning, torch-pruning), then fine-tune the narrower
    network briefly. Writes RUN/pruned (pruned, not fine-tuned) and, fine-tuned, RUN/model as train does."""
    from medseg.config import load_config
    from medseg.fsutil import check_output_dir
    from medseg.models.folder import CONFIG, ModelFolder
    from medseg.training.prune import prune_network, record_pruning, save_pruned

    _claim_threads(threads)
    if finetune not in ("distill", "train", "none"):
        raise MedsegError("CONFIG_INVALID_VALUE", f"--finetune {finetune!r} is not distill, train or none")
    if finetune != "none" and dataset is None:
        raise MedsegError("CONFIG_MISSING_KEY", "fine-tuning needs the training data: give --dataset DIR",
                          "or --finetune none for the pruned network alone")
    run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    check_output_dir(run_dir, "run folder", create=False)
    folder = ModelFolder.read(model)
    net = folder.load_network("cpu")
    if net is None:
        raise MedsegError("MODEL_DIR_INVALID", f"{folder.name} is an exported ({folder.format}) model folder",
                          "prune the PyTorch model folder it was exported from")
    result = prune_network(net, folder.config, folder.in_channels, len(folder.labels), folder.spatial_dims, ratio)
    pruned = save_pruned(folder, result, ratio, run_dir / "pruned")
    share = result.parameters_after / result.parameters_before
    typer.echo(f"pruned: {pruned} (model.channels {list(result.cfg.model.channels or ())}, {result.parameters_after} "
               f"parameters = {share:.0%} of {result.parameters_before})")
    if finetune == "none":
        return
    n = epochs or max(1, folder.config.train.epochs // 4)
    cfg = load_config(pruned / CONFIG, [f"data.dataset={dataset}", f"model.pretrained={pruned}", f"train.epochs={n}", *set_])
    _train_tracked(cfg, run_dir, False, "pruned model", [model] if finetune == "distill" else None)
    record = {**ModelFolder.read(pruned).info["pruning"], "finetune": finetune, "finetune_epochs": n}
    for name in ("model", "model_last"):
        record_pruning(run_dir / name, record)


def _pacs_option():
    return typer.Option([], "--pacs", metavar="KEY=VALUE", help=(
        "DICOM networking setting (repeatable): uid_root, token_env, timeout_s, retries, backoff_s, max_series_mb, "
        "idle_s, max_queue, max_incoming_mb, allowed_calling_aets, send_retries; defaults: the model's pacs section."))


def _select_option():
    return typer.Option([], "--select", metavar="KEY=VALUE", help=(
        "Series selection rule (repeatable): modalities, description_regex, min_slices, orientation; defaults: the "
        "model's inference.series_selection."))


@app.command()
def predict(
    input: str = typer.Option(..., "--input", "-i", help="An image file, a DICOM series folder, a folder of cases (image files and DICOM series), or a DICOMweb study URL http(s)://host:port/dicom-web/studies/<StudyInstanceUID>."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: not inside an input folder, nor the folder of an input file (a folder beside it is fine)."),
    model: list[Path] = typer.Option(..., "--model", "-m", help="Model folder from `medseg train` or `medseg import-nnunet`, or an nnU-Net v2 results folder (TRAINER__PLANS__CONFIGURATION); repeat for an ensemble (probabilities averaged)."),
    folds: list[str] = typer.Option([], "--folds", help="nnU-Net results folder: the folds to ensemble (0 1 2 3 4 or all; repeat or space-separate); default: every fold with the checkpoint."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="nnU-Net results folder: final (checkpoint_final.pth) or best."),
    combine: bool = typer.Option(False, "--combine", help="nnU-Net models with disjoint labels (e.g. TotalSegmentator's parts, one -m each): one label map, a voxel taking the most probable label the models predict there (not an ensemble)."),
    output_type: str = typer.Option("nifti", "--output-type", "-t", help=output_help()),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or mps."),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto, torch, onnxruntime, openvino, tensorrt (NVIDIA GPU, ONNX folder) or litert (tflite folder)."),
    tta: bool | None = typer.Option(None, "--tta/--no-tta", help="Mirror test-time augmentation (default: the model's inference.tta)."),
    fast: bool = typer.Option(False, "--fast", help="Lower overlap (inference.fast_overlap) and no TTA."),
    overlap: float | None = typer.Option(None, "--overlap", min=0.0, max=0.95, help="Sliding-window overlap."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Skip cases whose outputs are complete (recorded hash matches)."),
    shard: str = typer.Option("0/1", "--shard", help="i/n: predict every n-th case starting at i (split a folder across workers); auto: i and n from a Slurm array job or a Kubernetes indexed Job."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write float16 class probabilities (.npz)."),
    stats: bool = typer.Option(False, "--stats", help="Volume in mL per label per case (stats.csv and manifest)."),
    preview: bool = typer.Option(False, "--preview", help="PNG overlay of three orthogonal slices per case (previews/)."),
    allow_tilt: bool = typer.Option(False, "--allow-tilt", help="Resample gantry-tilted DICOM series instead of refusing them."),
    dicom: list[str] = _dicom_option(),
    threads: str = _threads_option(),
    qc: bool | None = typer.Option(None, "--qc/--no-qc", help="Quality control per case: verdict ok/review with reasons in manifest.json (default: the model's inference.qc.enabled)."),
    save_uncertainty: bool = typer.Option(False, "--save-uncertainty", help="Also write the voxel uncertainty map (uncertainty/, NIfTI 0..1) on the input grid; --preview then shows it."),
    explain: bool = typer.Option(False, "--explain", help="Also write Grad-CAM saliency maps per label (saliency/, NIfTI 0..1; see medseg explain); --preview and the review report then show them."),
    push: str | None = typer.Option(None, "--push", metavar="[URL]", help="DICOMweb input: store the DICOM results by STOW-RS on the same server (--push alone) or on another DICOMweb root (--push URL)."),
    token_file: Path | None = typer.Option(None, "--token-file", help="DICOMweb bearer token from this file (first line); otherwise from $MEDSEG_DICOMWEB_TOKEN (pacs.token_env). Never give a token on the command line."),
    ca_bundle: Path | None = typer.Option(None, "--ca-bundle", help="CA certificates (PEM) that sign the DICOMweb server's TLS certificate; verification is always on."),
    pacs: list[str] = _pacs_option(),
    select: list[str] = _select_option(),
) -> None:
    """Segment a file, a DICOM series, a folder of cases or a DICOMweb study; writes labels on each input's grid,
    manifest.json and provenance.json. Exit code 1 when any case failed (or a push failed)."""
    from medseg.errors import require_exists
    from medseg.inference.discovery import parse_shard
    from medseg.inference.options import prediction_settings
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_folder
    from medseg.pacs.dicomweb import is_url, parse_endpoint, predict_study, read_token

    web = is_url(input)
    if web:
        parse_endpoint(input, need_study=True)
        if push not in (None, "same"):
            parse_endpoint(push, need_study=False)
    else:
        require_exists(Path(input), "input")
        if push is not None:
            raise MedsegError("DICOMWEB_URL_INVALID", "--push needs a DICOMweb study URL as input (-i http(s)://...)")
    parse_shard(shard)  # a bad --shard is refused before the model loads
    _claim_threads(threads)
    predictor = Predictor.from_model_dir(model if len(model) > 1 else model[0], device, backend, tta=tta, fast=fast,
                                         overlap=overlap, folds=[f for x in folds for f in x.replace(",", " ").split()], checkpoint=checkpoint,
                                         combine=combine)
    _say_nnunet_mode(predictor)
    if explain:
        predictor.explainer()  # an exported model is refused before any case is read
    settings = prediction_settings(
        predictor.cfg, dicom=dicom, pacs=pacs, select=select, shard=shard, overwrite=overwrite, resume=resume,
        output_type=output_type, save_probabilities=save_probabilities, stats=stats, preview=preview,
        allow_tilt=allow_tilt, qc=qc, save_uncertainty=save_uncertainty, explain=explain,
        progress=logging.getLogger().getEffectiveLevel() <= logging.INFO,
    )
    if web:
        results = predict_study(predictor, input, out, settings.run, settings.pacs, settings.selection,
                                token=read_token(settings.pacs, token_file), ca_bundle=ca_bundle, push=push)
    else:
        results = predict_folder(predictor, Path(input), out, options=settings.run)
    _report_cases(results, out)


def _report_cases(results, out: Path) -> None:
    """The console summary of a prediction run; exit code 1 when a case (or its delivery) failed."""
    failed = [r for r in results if r.status == "failed"]
    skipped = [r for r in results if r.status == "skipped"]
    undelivered = [r for r in results if r.delivery and r.delivery["status"] == "failed"]
    resumed = sum(r.resumed for r in results)
    typer.echo(
        f"{len(results) - len(failed) - len(skipped)} of {len(results)} case(s) written to {out}"
        + (f" ({resumed} already complete)" if resumed else "")
    )
    delivered = [r for r in results if r.delivery and r.delivery["status"] == "ok"]
    if delivered:
        typer.echo(f"{len(delivered)} case(s) stored to {delivered[0].delivery['to']}")
    review = [r for r in results if r.qc and r.qc["verdict"] == "review"]
    if review:
        typer.echo(f"{len(review)} case(s) flagged for review (manifest.json; `medseg report {out}`): "
                   + ", ".join(r.case_id for r in sorted(review, key=lambda r: r.qc["score"])[:10])
                   + (" ..." if len(review) > 10 else ""))
    for r in skipped:
        typer.echo(f"skipped: {r.case_id}: {r.error}", err=True)
    for r in failed:
        typer.echo(f"failed: {r.case_id}: {r.error}", err=True)
    for r in undelivered:
        typer.echo(f"not delivered: {r.case_id}: {r.delivery['error']}", err=True)
    if failed or undelivered:
        raise typer.Exit(1)


@app.command()
def explain(
    model: Path = typer.Option(..., "--model", "-m", help="PyTorch model folder (from `medseg train`)."),
    input: Path = typer.Option(..., "--input", "-i", help="An image file or a DICOM series folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <case>_saliency_<label>.nii.gz (and .png for 2D), <case>_explain.json."),
    label: list[str] = typer.Option([], "--label", "-l", help="Label name to explain; repeatable (default: every foreground label)."),
    layer: str | None = typer.Option(None, "--layer", help="Module name of the explained layer (default: the last decoder stage)."),
    method: str = typer.Option("gradcam", "--method", help="gradcam or gradcampp (MONAI's GradCAM / GradCAM++)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    threads: str = _threads_option(),
) -> None:
    """Where the model looked: a Grad-CAM saliency map per label on the input grid (docs/inference-and-performance.md)."""
    from medseg.errors import require_exists
    from medseg.inference.explain import Explainer, write_explanation
    from medseg.io.readers import case_id, read_volume

    require_exists(input, "input")
    _claim_threads(threads)
    explainer = Explainer.from_model_dir(model, device, layer, method)
    names = explainer.label_values(label)  # an unknown name is refused before the image is read
    volume = read_volume(input)
    explanation = explainer.explain(volume, label)
    written = write_explanation(explanation, volume, out, case_id(input), overwrite)
    empty = explanation.facts["empty"]
    typer.echo(f"{len(names)} saliency map(s) ({method} on {explainer.layer}) in {out}"
               + (f"; empty (the label was not predicted): {', '.join(empty)}" if empty else ""))
    logging.getLogger(__name__).info("wrote %s", ", ".join(p.name for p in written.values()))


@app.command()
def serve(
    model: list[Path] = typer.Option(..., "--model", "-m", help="Model folder; repeat for an ensemble."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results, manifest.json, and .incoming/ (received, unprocessed instances)."),
    port: int = typer.Option(11112, "--port", "-p", min=0, max=65535, help="DICOM port to listen on (0: any free port, printed)."),
    ae_title: str = typer.Option("MEDSEG", "--ae-title", help="This listener's AE title."),
    dest: str | None = typer.Option(None, "--dest", metavar="AE@HOST:PORT", help="C-STORE each series' DICOM results to this peer (e.g. the PACS)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 listens on every interface (see docs/pacs.md, security notes)."),
    output_type: str = typer.Option("dicom-seg", "--output-type", "-t", help=output_help()),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or mps."),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto, torch, onnxruntime, openvino, tensorrt (NVIDIA GPU, ONNX folder) or litert (tflite folder)."),
    tta: bool | None = typer.Option(None, "--tta/--no-tta", help="Mirror test-time augmentation (default: the model's inference.tta)."),
    allow_tilt: bool = typer.Option(False, "--allow-tilt", help="Resample gantry-tilted series instead of refusing them."),
    dicom: list[str] = _dicom_option(),
    threads: str = _threads_option(),
    pacs: list[str] = _pacs_option(),
    select: list[str] = _select_option(),
) -> None:
    """A DICOM listener (C-STORE SCP): segments each received series once it has been idle for pacs.idle_s seconds
    and C-STOREs the results to --dest. Runs until SIGTERM/SIGINT, then finishes the case in progress."""
    import signal

    from medseg.inference.formats import parse_output_type
    from medseg.inference.options import prediction_settings
    from medseg.inference.predictor import Predictor
    from medseg.pacs.listener import Listener, parse_dest

    parse_output_type(output_type)
    target = parse_dest(dest) if dest else None
    _claim_threads(threads)
    predictor = Predictor.from_model_dir(model if len(model) > 1 else model[0], device, backend, tta=tta)
    settings = prediction_settings(predictor.cfg, dicom=dicom, pacs=pacs, select=select, overwrite=True,
                                   output_type=output_type, allow_tilt=allow_tilt, progress=False)
    listener = Listener(predictor, out, settings.pacs, settings.selection, settings.run, ae_title=ae_title,
                        host=host, port=port, dest=target)
    listener.start()
    typer.echo(f"listening as {ae_title} on {host}:{listener.port}" + (f"; results to {target}" if target else ""))
    signal.signal(signal.SIGTERM, listener.request_stop)
    signal.signal(signal.SIGINT, listener.request_stop)
    listener.wait()
    typer.echo("stopping: finishing the case in progress")
    listener.stop()
    c = listener.counts
    typer.echo(f"stopped: {c['received']} instance(s) received, {c['series_done']} series processed, "
               f"{c['refused']} refused, {c['malformed']} malformed, {c['aborted']} aborted association(s)")


@app.command("serve-http")
def serve_http(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (a container: /opt/ml/model)."),
    port: int = typer.Option(8080, "--port", "-p", min=0, max=65535, help="TCP port (SageMaker: 8080)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or mps."),
    max_body_mb: float = typer.Option(512.0, "--max-body-mb", min=0.001, help="Largest request body (larger: 413)."),
    queue: int = typer.Option(2, "--queue", min=0, help="Requests that may wait for the one in progress (more: 503)."),
    threads: str = _threads_option(),
) -> None:
    """HTTP inference server with SageMaker's contract: GET /ping, POST /invocations (NIfTI, NRRD or a zip of one
    DICOM series in; the label map, DICOM-SEG or JSON out); see docs/serving-http.md."""
    from medseg.deploy.http import Service, serve
    from medseg.errors import require_exists

    require_exists(model, "model folder")
    _claim_threads(threads)
    serve(Service(model, device, int(max_body_mb * 2**20), queue), host, port)


@app.command()
def convert(
    input: Path = typer.Option(..., "--input", "-i", help="DICOM folder (all series in it), DICOM file, or any image file."),
    out: Path = typer.Option(..., "--out", "-o", help="OUT.nii.gz / .nii / .nrrd / .mha, or a folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    allow_tilt: bool = typer.Option(False, "--allow-tilt", help="Resample gantry-tilted series (recorded) instead of refusing."),
    dicom: list[str] = _dicom_option(),
    config: str | None = typer.Option(None, "--config", "-c", help="Config whose data.labels maps RTSTRUCT/SEG ROIs to labels (default: one label per ROI name)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Convert DICOM series (one output per series, named by index and UID hash) or any image to NIfTI/NRRD/MHA.

    A series labelled by an RTSTRUCT or DICOM-SEG in the folder also gets its label map (<output>_labels) and a JSON
    naming each value and the ROIs it came from."""
    from medseg.config import load_config
    from medseg.io.convert import convert as run_convert
    from medseg.io.dicom_geometry import configured_tolerances

    labels = load_config(config, set_).data.labels if (config or set_) else None
    report = run_convert(input, out, overwrite=overwrite, allow_tilt=allow_tilt,
                         tolerances=configured_tolerances(None, dicom), labels=labels)
    for r in report.results:
        if r.status == "ok":
            note = f" ({'; '.join(r.notes)})" if r.notes else ""
            typer.echo(f"{r.name}: {r.output}  shape {r.shape} spacing {r.spacing}{note}")
        elif r.status == "skipped":
            typer.echo(f"skipped: {r.name}: {r.error}", err=True)
        else:
            typer.echo(f"failed: {r.name}: {r.error}", err=True)
    for reason, count in report.skipped.items():
        typer.echo(f"skipped {count} file(s): {reason}", err=True)
    if not report.ok:
        raise typer.Exit(1)


def _say_nnunet_mode(predictor: Any) -> None:
    """Tells whether an nnU-Net model predicts exactly as nnU-Net (its mirroring, tile step 0.5, exact resampling)."""
    if predictor.nnunet_departures:
        typer.echo(f"nnU-Net model: results are not nnU-Net-exact: {'; '.join(predictor.nnunet_departures)}", err=True)


@app.command("import-nnunet")
def import_nnunet(
    results: Path = typer.Argument(..., help="nnU-Net v2 results folder: TRAINER__PLANS__CONFIGURATION with plans.json, dataset.json, fold_k/."),
    out: Path = typer.Option(..., "--out", "-o", help="medseg model folder to write."),
    folds: list[str] = typer.Option([], "--folds", help="Folds to import (0 1 2 3 4 or all); default: every fold with the checkpoint."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="final (checkpoint_final.pth) or best."),
) -> None:
    """Import an nnU-Net v2 results folder as a medseg model folder (every fold; nnU-Net's preprocessing recorded),
    which every medseg command then uses: predict, serve, export, evaluate, report."""
    from medseg.models.nnunet import import_results_folder

    folder = import_results_folder(results, out, [f for x in folds for f in x.replace(",", " ").split()] or None, checkpoint)
    typer.echo(f"imported: {folder}")


@app.command()
def export(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder written by `medseg train`."),
    format: str = typer.Option(..., "--format", "-f", help="onnx, torchscript, tflite (LiteRT, 2D networks), or mlflow (an MLflow pyfunc model)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Exported model folder (default MODEL_<format>)."),
    quantize: str | None = typer.Option(None, "--quantize", help="int8: dynamic int8 quantisation (ONNX) or static post-training quantisation calibrated on the training cases (tflite)."),
    calibration: Path | None = typer.Option(None, "--calibration", help="tflite int8: the training dataset whose cases calibrate the int8 ranges."),
) -> None:
    """Export the network to ONNX, TorchScript or LiteRT as a model folder `medseg predict` loads directly."""
    from medseg.deploy.export import export_model
    from medseg.models.folder import ModelFolder

    folder = export_model(model, format, out, quantize, calibration=calibration)
    if format == "mlflow":
        typer.echo(f"exported: {folder} (MLflow pyfunc model: mlflow.pyfunc.load_model, mlflow models serve)")
        return
    parity = ModelFolder.read(folder).info["parity"]
    if "label_agreement" in parity:
        typer.echo(f"exported: {folder} (labels equal to PyTorch's on {parity['label_agreement']:.2%} of calibration pixels)")
        return
    typer.echo(f"exported: {folder} (max |logit difference| to PyTorch {parity['max_abs_logit_diff']:.2e})")


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", "-p", help="Folder of predicted label maps (NIfTI or PNG)."),
    ref: Path = typer.Option(..., "--ref", "-r", help="Folder of reference label maps."),
    out: Path = typer.Option(..., "--out", "-o", help="Evaluation folder."),
    images: Path | None = typer.Option(None, "--images", help="Folder of the images (for report overlays)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Dataset folder whose dataset.json names the labels."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model folder (its labels and provenance go in the report)."),
    metadata: Path | None = typer.Option(None, "--metadata", help="CSV with a 'case' column and subgroup columns."),
    window: tuple[float, float] | None = typer.Option(
        None, "--window", help="Display window of the images in the report, e.g. --window -160 240 (CT, HU)."
    ),
    config: str | None = typer.Option(None, "--config", "-c", help="Config whose 'evaluation' section to use."),
    set_: list[str] = typer.Option([], "--set", help="e.g. --set evaluation.nsd_tolerance_mm=1 (repeatable)."),
    threads: str = _threads_option(),
) -> None:
    """Per-case metrics (metrics.csv) and their summary with confidence intervals (summary.json)."""

    from medseg.config import load_config
    from medseg.inference.manifest import qc_records
    from medseg.io.dataset import load_dataset
    from medseg.metrics.evaluate import evaluate_folders
    from medseg.reporting.report import write_overlays

    _claim_threads(threads)
    cfg = load_config(config, set_)
    settings = cfg.evaluation
    labels: dict[int, str] | None = None
    context: dict = {}
    if model is not None:
        from medseg.models.folder import ModelFolder
        from medseg.models.nnunet import is_results_folder, origin_label, read_results_folder, records

        if is_results_folder(model):  # an nnU-Net results folder: its labels and origin
            info = records(read_results_folder(model))[2]
            labels = {k: v for k, v in info["labels"].items() if k != 0}
            context = {"Model": model.resolve().name, "Origin": origin_label(info)}
        else:
            folder = ModelFolder.read(model)
            labels = {k: v for k, v in folder.labels.items() if k != 0}
            context = {"Model": folder.name, "Dataset": folder.info.get("dataset"), "Config hash": folder.info.get("config_hash"),
                       **({"Origin": origin_label(folder.info)} if origin_label(folder.info) else {})}
    if dataset is not None:
        labels = {k: v for k, v in load_dataset(dataset, labels=cfg.data.labels).labels.items() if k != 0}
    from medseg.io.dicom_labels import is_study_folder

    if is_study_folder(ref):  # DICOM studies with RTSTRUCT/SEG references: rasterised into OUT/dicom-references
        ref, dicom_images, roi_sources = _dicom_references(ref, out, cfg.data.labels, model, labels)
        images = images or dicom_images
        context = {**context, "Reference ROIs": roi_sources}
    summary = evaluate_folders(pred, ref, out, settings=settings, labels=labels, metadata=metadata, context=context,
                               window=window, qc=qc_records(pred))
    write_overlays(out, pred, ref, images)
    for name, metrics in summary.items():
        dice = metrics["dice"]
        text = "n/a" if dice["mean"] is None else f"{dice['mean']:.3f} (95% CI {dice['ci_low']:.3f}-{dice['ci_high']:.3f})"
        typer.echo(f"{name}: mean Dice {text}, n={dice['n']}")
    typer.echo(f"written: {out / 'metrics.csv'}, {out / 'summary.json'}")
    _log_to_active_mlflow_run(out, summary)


def _dicom_references(ref: Path, out: Path, rules: Any, model: Path | None,
                      labels: dict[int, str] | None) -> tuple[Path, Path, str]:
    """A folder of DICOM studies as evaluation references: the ROI rules are the config's data.labels, else the
    model's training config's, else the label names matched exactly; the labelled series are rasterised into
    ``OUT/dicom-references``. Returns the label and image folders and which ROIs each label came from."""
    from medseg.io.dicom_labels import exact_rules, label_rules, materialise, roi_summary

    if rules is None and model is not None:
        from medseg.models.folder import ModelFolder

        rules = ModelFolder.read(model).config.data.labels
    if rules is not None:
        parsed = label_rules(rules)
    elif labels:
        parsed = exact_rules(labels)
    else:
        raise DatasetError("LABEL_RULES_MISSING", f"{ref.name} holds DICOM studies; nothing says which ROIs are which label",
                           "give -c CONFIG with data.labels, or --model / --dataset whose label names the ROIs carry")
    folder, sources = materialise(ref, parsed, out / "dicom-references")
    for case, code, message in sources["problems"]:
        typer.echo(f"reference {case}: {code}: {message}", err=True)
    return folder / "labels", folder / "images", roi_summary(sources)


def _log_to_active_mlflow_run(eval_dir: Path, summary: dict) -> None:
    """Logs an evaluation to the MLflow run named by MLFLOW_RUN_ID (and MLFLOW_TRACKING_URI), if any."""
    import os

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from medseg.tracking import MlflowTracker
    from medseg.workflow import summary_metrics

    tracker = MlflowTracker(os.environ.get("MLFLOW_TRACKING_URI", ""), "", run_id=run_id, reopen="attach")
    tracker.log_metrics(summary_metrics(summary, "eval"))
    tracker.log_artifact(eval_dir, "evaluation")
    typer.echo(f"logged to MLflow run {run_id}")


@app.command()
def report(
    eval_dir: Path = typer.Argument(..., help="Folder written by `medseg evaluate`, or by `medseg predict` (review report)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML path (default EVAL_DIR/report.html, PRED_DIR/review.html)."),
    pdf: bool = typer.Option(True, "--pdf/--no-pdf", help="Also write report.pdf beside the HTML (evaluation reports)."),
    static: bool = typer.Option(False, "--static", help="Figures only: no interactive viewers in the HTML."),
    all_viewers: bool = typer.Option(False, "--all-viewers", help="Review report: a viewer for every case, not only those to review."),
) -> None:
    """Render the self-contained HTML report (and its PDF version) of an evaluation folder, or the review-first
    report of a prediction folder (no reference: cases to review first, with the reasons). Each case shown gets an
    interactive volume viewer (NiiVue, offline) beside its figure unless --static."""
    from medseg.reporting.prediction_report import is_prediction_dir, write_prediction_report
    from medseg.reporting.report import write_report
    from medseg.reporting.viewer import niivue_path

    if not static and niivue_path() is None:
        typer.echo("note: NiiVue is not installed, so the report has its static figures only (`make install` "
                   "installs it from npm)", err=True)
    if eval_dir.is_dir() and is_prediction_dir(eval_dir):
        html = write_prediction_report(eval_dir, out, static=static, all_viewers=all_viewers)
        typer.echo(f"review report: {html}")
        return
    html = write_report(eval_dir, out, pdf=pdf, static=static)
    typer.echo(f"report: {html}" + (f" and {html.with_suffix('.pdf')}" if pdf else ""))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", "-o", help="Output folder."),
    config: str = typer.Option("demo", "--config", "-c", help="Preset name or YAML path."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    cases: int = typer.Option(16, "--cases", "-n", min=4, help="Synthetic 3D cases to generate."),
    threads: str = _threads_option(),
) -> None:
    """Sample data -> train -> predict the test cases -> evaluate -> report, tracked in MLflow."""
    from medseg.config import load_config
    from medseg.sample_data import write_sample_data
    from medseg.workflow import train_predict_evaluate

    _claim_threads(threads)
    start = time.perf_counter()
    logging.getLogger(__name__).info("writing synthetic sample data to %s", out / "data")
    roots = write_sample_data(out / "data", cases=cases, seed=0, kinds=("ct3d",))
    cfg = load_config(config, [f"data.dataset={roots['ct3d']}", *set_])
    result = train_predict_evaluate(cfg, out)
    minutes = (time.perf_counter() - start) / 60
    db = result.tracking_uri
    typer.echo("")
    typer.echo(f"Done in {minutes:.1f} min. Test Dice: " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in result.test.mean_dice.items()))
    typer.echo(f"  report:  {result.test.report}")
    typer.echo(f"  model:   {result.fit.model_dir}")
    typer.echo(f"  MLflow:  {db} (run {result.run_id})")
    if db.startswith("sqlite:"):
        typer.echo(f"  open the MLflow UI with:  mlflow ui --backend-store-uri {db} --host 127.0.0.1")
    if result.test.n_failed:
        raise typer.Exit(1)


def optional_push_value(args: list[str]) -> list[str]:
    """``--push`` given without a URL (last, or followed by another option) means the input's own server: it is
    passed on as ``--push same``."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--push" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("same")
    return out


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The exception class ``name`` of Click and of the copy of Click that newer typer releases carry
    (``typer._click``): the command line raises one or the other depending on the installed typer."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _usage_error(exc) -> MedsegError:
    """A Click usage error (unknown option, bad or missing value, unknown command) as a coded one-line error."""
    command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "medseg"
    from medseg.errors import describe

    text = exc.format_message() if hasattr(exc, "format_message") else describe(exc)
    return MedsegError("OPTION_INVALID", " ".join(text.split()), f"see `{command} -h`")


_SIGNALLED: list[int] = []  # the signal that stopped the command (typer turns KeyboardInterrupt into exit 130)


def _stop_on_signals() -> None:
    """SIGTERM (a scheduler stopping a job, `kill`, a container shutting down) stops a command as Ctrl-C does:
    it finishes or abandons the current case cleanly, records it, and exits with a message."""
    import signal

    from medseg.errors import Interrupted

    def handler(signum, frame) -> None:
        _SIGNALLED.append(signum)
        raise Interrupted(signum)

    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # pragma: no cover - not the main thread (embedded use)
        pass


def _interrupted(signum: int) -> None:
    name = "SIGTERM" if signum == 15 else "SIGINT"
    _fail("RUN_INTERRUPTED", f"stopped by {name}", "what was complete is kept and recorded; rerun with --resume to "
          "continue (predict, train)", 128 + signum)


def _fail(code: str, message: str, hint: str | None, status: int) -> None:
    print(f"error: {MedsegError(code, message, hint).one_line()}", file=sys.stderr)
    sys.exit(status)


def main() -> None:
    """Console-script entry point: runs the app; every failure is one line ``error: CODE: message (hint: ...)``:
    exit 2 for a user's mistake or a refused input/output, 3 for an internal error, 128 + N for signal N."""
    from medseg.errors import Interrupted, from_os_error

    _stop_on_signals()
    try:
        status = app(args=optional_push_value(sys.argv[1:]), standalone_mode=False)
        if _SIGNALLED:
            _interrupted(_SIGNALLED[0])
    except _click_exceptions("NoArgsIsHelpError") as exc:
        ctx = getattr(exc, "ctx", None)  # a Click UsageError's context
        typer.echo(ctx.get_help() if ctx is not None else "medseg -h lists the commands")
        sys.exit(2)
    except _click_exceptions("Abort"):  # what older Click makes of Ctrl-C
        _interrupted(_SIGNALLED[0] if _SIGNALLED else 2)
    except _click_exceptions("ClickException") as exc:
        print(f"error: {_usage_error(exc).one_line()}", file=sys.stderr)
        sys.exit(2)
    except MedsegError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        _interrupted(exc.signum if isinstance(exc, Interrupted) else 2)
    except MemoryError:
        _fail("OUT_OF_MEMORY", "the machine ran out of memory", "free memory, use smaller inputs, or --threads 1", 2)
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.ENOTDIR, errno.EEXIST):
            print(f"error: {from_os_error(exc).one_line()}", file=sys.stderr)
            sys.exit(2)
        _internal(exc)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        _internal(exc)
    sys.exit(status if isinstance(status, int) else 0)


def _internal(exc: BaseException) -> None:
    """A wrapped medseg error (MONAI re-raises what a transform raised) as itself; anything else INTERNAL_ERROR."""
    import os

    from medseg.errors import describe, unwrap

    inner = unwrap(exc)
    if isinstance(inner, MedsegError):
        print(f"error: {inner.one_line()}", file=sys.stderr)
        sys.exit(2)
    if isinstance(inner, MemoryError):
        _fail("OUT_OF_MEMORY", "the machine ran out of memory", "free memory, use smaller inputs, or --threads 1", 2)
    if os.environ.get("MEDSEG_DEBUG"):
        raise exc
    cause = exc.__cause__ or exc
    _fail("INTERNAL_ERROR", describe(cause), "rerun with MEDSEG_DEBUG=1 for the traceback and report it", 3)


if __name__ == "__main__":
    main()
