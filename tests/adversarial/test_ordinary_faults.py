"""Class 3: ordinary mistakes and faults get their own codes (exit 2, or a manifest row), never INTERNAL_ERROR:
an output on a read-only disk or where a file is, a full disk, a damaged evaluation or prediction folder given to
``medseg report``, unsupported voxel types, absurd spacings, a DICOM series without StudyTime, an allocation
failure, and weights that hold pickled code."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from adversarial_helpers import (
    assert_coded,
    enospc,
    fuzz_settings,
    read_only_folder,
    tmpfs,
)
from hypothesis import given
from hypothesis import strategies as st

from medseg.inference.predictor import Predictor


@pytest.fixture
def no_prediction(monkeypatch):
    """Fails the test if any case reaches the network (an output check must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a case was predicted before the output was checked")

    monkeypatch.setattr(Predictor, "predict_case", refuse)


def test_read_only_output_is_refused_before_any_case(tmp_path: Path, cli, smoke_model: Path, case_folder: Path,
                                                     no_prediction):
    with read_only_folder(tmp_path / "ro") as ro:
        assert_coded(cli("predict", "-i", case_folder, "-o", ro / "out", "-m", smoke_model), "OUTPUT_NOT_WRITABLE")
        assert_coded(cli("evaluate", "-p", case_folder, "-r", case_folder, "-o", ro / "eval"), "OUTPUT_NOT_WRITABLE")
        assert_coded(cli("convert", "-i", next(case_folder.iterdir()), "-o", ro / "x.nii.gz"), "OUTPUT_NOT_WRITABLE")


def test_output_naming_an_existing_file(tmp_path: Path, cli, smoke_model: Path, case_folder: Path, no_prediction):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    assert_coded(cli("predict", "-i", case_folder, "-o", existing, "-m", smoke_model), "OUTPUT_IS_FILE")
    assert_coded(cli("predict", "-i", case_folder, "-o", existing / "sub", "-m", smoke_model), "OUTPUT_IS_FILE")
    assert_coded(cli("train", "-c", "smoke", "-o", existing), "OUTPUT_IS_FILE")
    assert_coded(cli("convert", "-i", case_folder, "-o", existing), "OUTPUT_IS_FILE")
    assert existing.read_text() == "keep me"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _fill_when(trigger: Path, disk: Path) -> threading.Thread:
    """Another program fills the disk as soon as ``trigger`` appears."""
    def fill() -> None:
        deadline = time.monotonic() + 120
        while not trigger.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        with open(disk / "other_program.bin", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 16384)
            except OSError:  # full
                pass

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


def test_full_disk_stops_the_run_and_records_every_case(tmp_path: Path, cli, smoke_model: Path, case_folder: Path):
    """A real tmpfs that another program fills once the first case is written: the run stops with DISK_FULL
    (exit 2); the manifest, written into the space medseg reserved at the start, lists the complete case, the one
    that could not be written and the rest; after space is freed, --resume completes the run."""
    with tmpfs(tmp_path / "small", "4m") as disk:
        out = disk / "out"
        filler = _fill_when(out / "previews" / "ct_000.png", disk)  # the first case is complete
        run = cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta", "--preview")
        filler.join()
        assert_coded(run, "DISK_FULL")
        status = [(c["status"], c["error_code"]) for c in _manifest(out)["cases"]]
        assert status[0] == ("ok", None) and ("failed", "DISK_FULL") in status, status
        assert set(status[1:]) <= {("failed", "DISK_FULL"), ("pending", None)}, status
        ok = _manifest(out)["cases"][0]
        assert all((out / record["file"]).is_file() for record in ok["outputs"].values())
        assert not [p for p in out.rglob("*") if ".partial" in p.name or p.name == ".medseg-reserve"]
        (disk / "other_program.bin").unlink()
        again = cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta", "--preview", "--resume")
        assert again.code == 0, again.err
        assert [c["status"] for c in _manifest(out)["cases"]] == ["ok"] * len(status)


def test_disk_full_injected_stops_the_run(tmp_path: Path, smoke_model: Path, case_folder: Path, monkeypatch):
    """The same as an injected ENOSPC (where no tmpfs can be mounted): the second label write fails."""
    from medseg.errors import OutputError
    from medseg.inference.runner import RunOptions, predict_folder
    from medseg.io import nifti

    calls = []
    real = nifti.write_nifti

    def failing(volume, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 2:  # the disk is full from the second label map on
            from medseg.errors import from_os_error

            raise from_os_error(enospc(path))
        return real(volume, path, *args, **kwargs)

    monkeypatch.setattr(nifti, "write_nifti", failing)
    predictor = Predictor.from_model_dir(smoke_model, "cpu", tta=False)
    with pytest.raises(OutputError) as info:
        predict_folder(predictor, case_folder, tmp_path / "out", options=RunOptions(progress=False))
    assert info.value.code == "DISK_FULL"
    status = [(c["status"], c["error_code"]) for c in _manifest(tmp_path / "out")["cases"]]
    assert status[0] == ("ok", None) and status[1] == ("failed", "DISK_FULL"), status
    assert status[2] in (("pending", None), ("failed", "DISK_FULL")), status  # the disk stays full


def _evaluation_folder(tmp_path: Path, smoke_model: Path, tiny_dataset: Path, cli) -> Path:
    pred = tmp_path / "pred"
    assert cli("predict", "-i", tiny_dataset / "imagesTs", "-o", pred, "-m", smoke_model, "--no-tta").code == 0
    ev = tmp_path / "eval"
    done = cli("evaluate", "-p", pred, "-r", tiny_dataset / "labelsTs", "-o", ev, "--images", tiny_dataset / "imagesTs")
    assert done.code == 0, done.err
    return ev


def test_damaged_evaluation_and_prediction_folders_are_refused_by_report(tmp_path: Path, cli, smoke_model: Path,
                                                                         tiny_dataset: Path):
    ev = _evaluation_folder(tmp_path, smoke_model, tiny_dataset, cli)
    assert cli("report", ev, "--no-pdf").code == 0
    record = json.loads((ev / "evaluation.json").read_text())
    summary = json.loads((ev / "summary.json").read_text())
    label = next(iter(record["labels"].values()))
    damaged = {
        "evaluation.json": [b"{", b"[]", json.dumps({**record, "labels": [1, 2]}),
                            json.dumps({**record, "settings": {**record["settings"], "bootstrap": 10**9}}),
                            json.dumps({k: v for k, v in record.items() if k != "units"})],
        "summary.json": [b"null", json.dumps({label: {**summary[label], "dice": "high"}}), json.dumps({})],
        "metrics.csv": [b"case,label,dice\nct_003,organ,0.9\n", (ev / "metrics.csv").read_text().replace(",", ",x", 3)],
        "overlays/overlays.json": [json.dumps({"overlays": [{"case": "c", "why": "best", "file": "../../secret.png"}]}),
                                   b"\xff\xfe garbage"],
    }
    for name, versions in damaged.items():
        original = (ev / name).read_bytes()
        for content in versions:
            (ev / name).write_bytes(content if isinstance(content, bytes) else content.encode())
            assert_coded(cli("report", ev, "--no-pdf"), "EVAL_DIR_INVALID")
        (ev / name).write_bytes(original)
    pred = tmp_path / "pred"
    manifest = _manifest(pred)
    case = manifest["cases"][0]
    for content in (b'{"cases": [', json.dumps({**manifest, "cases": 3}),
                    json.dumps({**manifest, "cases": [{**case, "qc": "fine"}]}),
                    json.dumps({**manifest, "cases": [{**case, "status": "great"}]}),
                    json.dumps({**manifest, "cases": [{**case, "outputs": {"preview": {"file": "../../etc/passwd",
                                                                                       "sha256": "0"}}}]})):
        (pred / "manifest.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        assert_coded(cli("report", pred), "PREDICTION_DIR_INVALID")
    (pred / "provenance.json").write_text("[1, 2]")
    (pred / "manifest.json").write_text(json.dumps(manifest))
    assert_coded(cli("report", pred), "PREDICTION_DIR_INVALID")


def _mutations():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=3), st.just({}))
    return st.lists(st.tuples(st.integers(0, 10**6), leaf, st.booleans()), min_size=1, max_size=4)


def _mutate(data, edits):
    """Replaces (or deletes) values at pseudo-randomly chosen places of a JSON tree."""
    for index, value, delete in edits:
        node, path = data, []
        while isinstance(node, (dict, list)) and node:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = keys[index % len(keys)]
            index //= max(1, len(keys))
            path.append((node, key))
            if index % 3 == 0:
                break
            node = node[key]
        if path:
            parent, key = path[-1]
            if delete and isinstance(parent, dict):
                del parent[key]
            else:
                parent[key] = value
    return data


@fuzz_settings(25)
@given(edits=_mutations(), which=st.sampled_from(["evaluation.json", "summary.json", "overlays/overlays.json"]))
def test_hand_edited_evaluation_files_give_a_report_or_a_coded_refusal(eval_copy, edits, which):
    from medseg.errors import MedsegError
    from medseg.reporting.report import build_report

    ev = eval_copy()
    path = ev / which
    path.write_text(json.dumps(_mutate(json.loads(path.read_text()), edits)))
    try:
        build_report(ev)
    except MedsegError as exc:
        assert exc.code == "EVAL_DIR_INVALID", exc.one_line()


@fuzz_settings(25)
@given(edits=_mutations())
def test_hand_edited_manifests_give_a_review_or_a_coded_refusal(pred_copy, edits):
    from medseg.errors import MedsegError
    from medseg.reporting.prediction_report import build_prediction_report

    pred = pred_copy()
    path = pred / "manifest.json"
    path.write_text(json.dumps(_mutate(json.loads(path.read_text()), edits)))
    try:
        build_prediction_report(pred)
    except MedsegError as exc:
        assert exc.code == "PREDICTION_DIR_INVALID", exc.one_line()


@pytest.fixture(scope="module")
def _made(tmp_path_factory, smoke_model, tiny_dataset):
    from medseg.inference.runner import RunOptions, predict_folder
    from medseg.metrics.evaluate import evaluate_folders

    root = tmp_path_factory.mktemp("made")
    predictor = Predictor.from_model_dir(smoke_model, "cpu", tta=False)
    predict_folder(predictor, tiny_dataset / "imagesTs", root / "pred",
                   options=RunOptions(progress=False, preview=True, stats=True))
    from medseg.reporting.report import write_overlays

    evaluate_folders(root / "pred", tiny_dataset / "labelsTs", root / "eval")
    write_overlays(root / "eval", root / "pred", tiny_dataset / "labelsTs", tiny_dataset / "imagesTs")
    return root


@pytest.fixture
def eval_copy(_made, tmp_path_factory):
    return lambda: Path(shutil.copytree(_made / "eval", tmp_path_factory.mktemp("ev") / "eval"))


@pytest.fixture
def pred_copy(_made, tmp_path_factory):
    return lambda: Path(shutil.copytree(_made / "pred", tmp_path_factory.mktemp("pr") / "pred"))


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), path)
    return path


def test_unsupported_voxel_types_and_absurd_spacing_are_coded(tmp_path: Path, cli, smoke_model: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _nifti(inputs / "rgb24.nii.gz", rgb)
    _nifti(inputs / "complex.nii.gz", np.ones((16, 16, 8), np.complex64))
    _nifti(inputs / "huge_voxels.nii.gz", np.zeros((8, 8, 8), np.int16), np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    run = cli("predict", "-i", inputs, "-o", tmp_path / "out", "-m", smoke_model, "--no-tta")
    assert run.code == 1 and "Traceback" not in run.err
    codes = {c["case_id"]: c["error_code"] for c in _manifest(tmp_path / "out")["cases"]}
    assert codes == {"rgb24": "IMAGE_DTYPE_UNSUPPORTED", "complex": "IMAGE_DTYPE_UNSUPPORTED",
                     "huge_voxels": "MODEL_GRID_TOO_LARGE"}


def test_dicom_seg_from_a_series_without_study_time(tmp_path: Path, smoke_model: Path):
    import highdicom as hd
    from dicom_helpers import edit, series

    from medseg.inference.runner import RunOptions, predict_folder

    _, files = series(tmp_path / "s", shape=(24, 24, 12), affine=np.diag([1.5, 1.5, 3.0, 1.0]))
    for f in files:
        edit(f, StudyTime=None, StudyDate=None, ReferringPhysicianName=None, AccessionNumber=None, StudyID=None)
    predictor = Predictor.from_model_dir(smoke_model, "cpu", tta=False)
    results = predict_folder(predictor, tmp_path / "s", tmp_path / "out",
                             options=RunOptions(output_type="dicom-seg", progress=False))
    assert [r.status for r in results] == ["ok"], results[0].error
    seg = hd.seg.segread(tmp_path / "out" / results[0].output)
    assert seg.StudyTime == "" and seg.StudyInstanceUID


def test_allocation_failure_is_a_coded_case_failure(tmp_path: Path, smoke_model: Path, case_folder: Path, monkeypatch):
    from medseg.inference.runner import RunOptions, predict_folder

    real = Predictor.predict_case
    calls = []

    def hungry(self, volume, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            np.empty((1 << 62,), np.uint8)  # numpy's own allocation failure (a MemoryError)
        return real(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_case", hungry)
    predictor = Predictor.from_model_dir(smoke_model, "cpu", tta=False)
    results = predict_folder(predictor, case_folder, tmp_path / "out", options=RunOptions(progress=False))
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].error_code == "OUT_OF_MEMORY" and "Traceback" not in results[1].error


class Pickled(torch.nn.Module):  # a whole network saved with torch.save(model): loading it would run code
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)


def test_pickled_model_weights_are_refused_without_advising_to_unpickle(tmp_path: Path, cli, smoke_model: Path,
                                                                        case_folder: Path):
    from medseg.fsutil import sha256_file
    from medseg.models.folder import read_info, write_info

    model = Path(shutil.copytree(smoke_model, tmp_path / "model"))
    torch.save(Pickled(), model / "weights.pt")
    info = read_info(model)
    write_info(model / "model.json", {**info, "weights_sha256": sha256_file(model / "weights.pt")})
    run = cli("predict", "-i", case_folder, "-o", tmp_path / "out", "-m", model)
    assert_coded(run, "MODEL_DIR_INVALID")
    assert "pickled" in run.err and "state_dict" in run.err and "weights_only=False" not in run.err


def test_pickled_pretrained_weights_and_checkpoints_are_refused_without_advising_to_unpickle(
        tmp_path: Path, cli, tiny_dataset: Path):
    pretrained = tmp_path / "net.pt"
    torch.save(Pickled(), pretrained)
    run = cli("train", "-c", "smoke", "-o", tmp_path / "run", "--set", f"model.pretrained={pretrained}",
              "--set", f"data.dataset={tiny_dataset}", "--set", "tracking.uri=null")
    assert_coded(run, "PRETRAINED_UNREADABLE")
    assert "pickled" in run.err and "weights_only=False" not in run.err
    from medseg.training.checkpoint import load_checkpoint

    with pytest.raises(Exception) as info:
        load_checkpoint(pretrained)
    assert info.value.code == "CHECKPOINT_UNREADABLE" and "weights_only=False" not in info.value.one_line()
