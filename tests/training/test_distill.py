"""`medseg distill`: an ensemble of smoke-trained teachers distilled into a smaller student end to end (tracking,
model folder with its teachers, resume from teachers.json), refusals before anything is written, and the loss
against an independent reference (torch's kl_div)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import load_config
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.training.distill import Teacher, Teachers, combined_loss, distillation_loss


@pytest.fixture(scope="module")
def second_teacher(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second smoke model (another seed): with ``smoke_model`` a two-member ensemble."""
    from medseg.training.trainer import fit

    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "seed=1"])
    return fit(cfg, tmp_path_factory.mktemp("teacher"), show_progress=False).model_dir


def _invoke(*args: str):
    return CliRunner().invoke(app, ["-q", *args])


def test_distill_two_teachers_end_to_end_and_resume(smoke_model: Path, second_teacher: Path, tiny_dataset: Path,
                                                   tmp_path: Path, monkeypatch):
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    run = tmp_path / "student"
    result = _invoke("distill", "-m", str(smoke_model), "-m", str(second_teacher), "-c", "smoke", "-o", str(run),
                     "--set", f"data.dataset={tiny_dataset}", "--set", "model.channels=[2, 4]")
    assert result.exit_code == 0, result.output + repr(result.exception)

    info = json.loads((run / "model" / "model.json").read_text())
    hashes = [json.loads((t / "model.json").read_text())["weights_sha256"] for t in (smoke_model, second_teacher)]
    assert [t["weights_sha256"] for t in info["teachers"]] == hashes
    assert all("path" not in t for t in info["teachers"])  # the model folder travels: no paths of this machine
    assert info["distill"] == {"temperature": 2.0, "weight": 0.5}
    saved = json.loads((run / "teachers.json").read_text())
    assert [Path(t["path"]) for t in saved["teachers"]] == [smoke_model.resolve(), second_teacher.resolve()]

    predictor = Predictor.from_model_dir(run / "model", "cpu")  # the student is an ordinary model folder
    assert predictor.cfg.model.channels == (2, 4)
    image = read_volume(sorted((tiny_dataset / "imagesTs").iterdir())[0])
    assert predictor.predict(image).same_grid(image)

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    (mlrun,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert mlrun.data.params["distill.teachers"] == "2" and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["distill.teacher_sha256"] == ",".join(h[:16] for h in hashes)

    # resume without -m: the run's teachers.json names them; two more epochs on the same MLflow run
    resumed = _invoke("distill", "--resume", "-o", str(run), "--set", "train.epochs=4")
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    history = json.loads((run / "history.json").read_text())
    epochs = history["epochs"] if isinstance(history, dict) else history
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert len(client.search_runs(client.search_experiments()[0].experiment_id)) == 1

    # resume with other teachers is refused
    other = _invoke("distill", "--resume", "-o", str(run), "-m", str(smoke_model), "--set", "train.epochs=5")
    assert other.exit_code != 0 and getattr(other.exception, "code", None) == "RESUME_MISMATCH"


def test_mismatched_preprocessing_is_refused_before_the_run_is_written(smoke_model: Path, tiny_dataset: Path, tmp_path: Path):
    run = tmp_path / "bad"
    result = _invoke("distill", "-m", str(smoke_model), "-c", "smoke", "-o", str(run),
                     "--set", f"data.dataset={tiny_dataset}", "--set", "data.intensity.window=[-100, 200]")
    assert getattr(result.exception, "code", None) == "DISTILL_TEACHER_MISMATCH"
    assert "[-100.0, 200.0]" in str(result.exception) and "[-160.0, 240.0]" in str(result.exception)
    assert not run.exists()


def test_refusals(smoke_model: Path, smoke_model_2d: Path, tiny_dataset: Path, tmp_path: Path):
    no_teacher = _invoke("distill", "-c", "smoke", "-o", str(tmp_path / "a"), "--set", f"data.dataset={tiny_dataset}")
    assert getattr(no_teacher.exception, "code", None) == "CONFIG_MISSING_KEY"
    missing = _invoke("distill", "-m", str(tmp_path / "nowhere"), "-c", "smoke", "-o", str(tmp_path / "b"),
                      "--set", f"data.dataset={tiny_dataset}")
    assert getattr(missing.exception, "code", None) == "MODEL_NOT_FOUND"
    with pytest.raises(Exception) as info:  # a 3D CT model and a 2D RGB model are not one task
        Teachers.load([smoke_model, smoke_model_2d], torch.device("cpu"), 2.0)
    assert getattr(info.value, "code", None) == "DISTILL_TEACHER_MISMATCH"
    not_a_run = _invoke("distill", "--resume", "-o", str(smoke_model.parent))
    assert getattr(not_a_run.exception, "code", None) == "CHECKPOINT_NOT_FOUND"


def test_distillation_loss_against_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 3, 4, 5, 6, generator=g)
    for temperature in (1.0, 2.0, 4.0):
        targets = torch.softmax(teacher / temperature, dim=1)
        reference = F.kl_div(F.log_softmax(student / temperature, dim=1), targets, reduction="sum") / (2 * 4 * 5 * 6)
        assert torch.allclose(distillation_loss(student, targets, temperature), reference * temperature**2, rtol=1e-5)
        assert float(distillation_loss(teacher, targets, temperature)) < 1e-6  # a student that is the teacher: KL 0
    hard = torch.tensor(0.7)
    soft = distillation_loss(student, torch.softmax(teacher / 2, dim=1), 2.0)
    assert torch.allclose(combined_loss(hard, [torch.zeros_like(student), student], torch.softmax(teacher / 2, dim=1), 2.0, 0.25),
                          0.75 * hard + 0.25 * soft)  # deep supervision: the soft term reads the final output


def test_soft_targets_average_the_members_and_pad_to_their_divisor(smoke_model: Path, second_teacher: Path):
    from medseg.models.folder import load_model_dir

    members = []
    for path in (smoke_model, second_teacher):
        net, cfg, plan, info = load_model_dir(path)
        members.append(Teacher(net, cfg, plan, info, path))
    teachers = Teachers(members, temperature=3.0)
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        expected = sum(torch.softmax(m.net(x) / 3.0, dim=1) for m in members) / 2
    assert torch.allclose(teachers.soft_targets(x), expected, atol=1e-6)
    odd = torch.randn(1, 1, 15, 13, 7)  # not a multiple of the teachers' divisor (2): padded, then cropped back
    targets = teachers.soft_targets(odd)
    assert targets.shape == (1, 3, 15, 13, 7) and torch.allclose(targets.sum(dim=1), torch.ones(1, 15, 13, 7), atol=1e-5)
