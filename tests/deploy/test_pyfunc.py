"""The MLflow pyfunc model: exported (medseg export -f mlflow) and logged by training, loaded from the run's SQLite
store with mlflow.pyfunc.load_model and served by `mlflow models serve`; its labels equal medseg predict's."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import requests

from medseg.io.readers import read_volume


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", "-q", *args], capture_output=True, text=True, timeout=300)


def _expected(model: Path, image: Path, out: Path) -> np.ndarray:
    done = _medseg("predict", "-i", str(image), "-o", str(out), "-m", str(model), "-d", "cpu")
    assert done.returncode == 0, done.stderr
    return np.asarray(nib.load(next(out.glob("*.nii.gz"))).dataobj)


def test_exported_pyfunc_predicts_as_medseg_predict_and_mlflow_serves_it(smoke_model: Path, tiny_dataset: Path,
                                                                        tmp_path: Path):
    image_path = sorted((tiny_dataset / "imagesTs").iterdir())[0]
    expected = _expected(smoke_model, image_path, tmp_path / "cli")
    done = _medseg("export", "-m", str(smoke_model), "-f", "mlflow", "-o", str(tmp_path / "pyfunc"))
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "pyfunc").rglob("*.pkl"))  # a model from code: nothing to unpickle
    image = read_volume(image_path)
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    labels = model.predict(image.array.astype(np.float32), params={"affine": image.affine.ravel().tolist()})
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
    again = _medseg("export", "-m", str(smoke_model), "-f", "mlflow", "-o", str(tmp_path / "pyfunc"))
    assert again.returncode == 2 and "OUTPUT_EXISTS" in again.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", str(tmp_path / "pyfunc"), "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "MLFLOW_TRACKING_URI": "",  # it starts uvicorn by name
                                                            "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                assert server.poll() is None, server.stderr.read() if server.stderr else b""
                time.sleep(0.3)
        body = {"inputs": image.array.astype(np.float32).tolist(), "params": {"affine": image.affine.ravel().tolist()}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body),
                               headers={"Content-Type": "application/json"}, timeout=300)
        assert answer.status_code == 200, answer.text[:500]
        assert np.array_equal(np.asarray(answer.json()["predictions"], dtype=np.uint8), expected)
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_training_logs_the_pyfunc_model_to_its_run(tiny_dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    done = _medseg("train", "-c", "smoke", "--set", f"data.dataset={tiny_dataset}", "--set", "tracking.log_pyfunc=true",
                   "-o", str(run))
    assert done.returncode == 0, done.stderr
    record = json.loads((run / "run.json").read_text())
    mlflow.set_tracking_uri(record["tracking_uri"])
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{record['mlflow_run_id']}/medseg_model")
    finally:
        mlflow.set_tracking_uri("")
    image_path = sorted((tiny_dataset / "imagesTs").iterdir())[0]
    image = read_volume(image_path)
    labels = model.predict(image.array.astype(np.float32), params={"affine": image.affine.ravel().tolist()})
    assert np.array_equal(labels, _expected(run / "model", image_path, tmp_path / "cli"))
    from mlflow.tracking import MlflowClient

    assert MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"]).info.status == "FINISHED"
