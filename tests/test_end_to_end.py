"""A tiny full run (smoke preset): sample data -> train -> predict -> evaluate -> report, tracked in MLflow."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        # log_model on (as in the demo preset): the network logged with mlflow.pytorch
        [sys.executable, "-m", "medseg", "demo", "-o", str(out), "-c", "smoke", "-n", "4", "--set", "tracking.log_model=true"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_demo_writes_report_with_one_row_per_case(demo_run):
    out, proc = demo_run
    html = (out / "evaluation" / "report.html").read_text()
    with open(out / "evaluation" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["case"] for r in rows} == {"ct_003"} and {r["label"] for r in rows} == {"organ", "lesion"}
    assert html.count('<tr class="case-row"><td class="l">ct_003</td>') == 2  # one row per case and label
    # figures: metric distributions, volume agreement per label (2), the QC score against the true Dice (the demo's
    # predict writes QC, evaluate picks it up), one overlay for the single case
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', html)) == 5
    assert "QC score (from medseg predict, no reference) against the true Dice" in html
    assert (out / "evaluation" / "report.pdf").read_bytes().startswith(b"%PDF")
    assert "not a medical device" in html
    # the display window is the configured CT window (smoke preset: window scheme, [-160, 240] HU), not a guess
    assert json.loads((out / "evaluation" / "evaluation.json").read_text())["window"] == [-160.0, 240.0]
    assert "window [-160, 240]" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained: no external resources
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["organ"]["dice"]["n"] == 1
    assert f"report:  {out / 'evaluation' / 'report.html'}" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout


def test_demo_console_carries_no_third_party_warnings(demo_run):
    """A user's console carries medseg's messages, not third-party deprecations (MLflow's export_model FutureWarning)."""
    _, proc = demo_run
    assert not re.search(r"(Future|Deprecation|User)Warning", proc.stdout + proc.stderr), proc.stderr[-2000:]


def test_demo_run_is_tracked_in_embedded_mlflow(demo_run):
    out, proc = demo_run
    db = out / "run" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("medseg-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.name"] == "unet"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert {"test_dice_organ", "test_hd95_organ", "test_nsd_lesion", "val_dice_organ"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "test", "val", "training_curves.png"} <= artifacts
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert model_files == {"weights.pt", "config.yaml", "model.json", "plan.json"}
    report = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "test")}
    assert {"report.html", "report.pdf", "metrics.csv", "summary.json"} <= report
    assert Path(exp.artifact_location.removeprefix("file://")).is_relative_to(out / "run")


def test_run_folder_is_self_describing(demo_run):
    out, _ = demo_run
    run = out / "run"
    assert {"config.yaml", "splits.json", "history.json", "model", "checkpoints", "validation"} <= {p.name for p in run.iterdir()}
    assert (run / "validation" / "evaluation" / "report.html").is_file()
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"]) == ["ct_000", "ct_001", "ct_002"]
