"""A medseg model folder as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(...).predict(...)`` and
``mlflow models serve`` run it with its preprocessing and sliding window (the predictor of ``medseg predict``).

* Input: the image as a float32 array ``(C, X, Y, Z)`` (or ``(X, Y, Z)`` for one channel; 2D models: ``(C, X, Y)``),
  and the param ``affine``: its voxel-to-world (RAS) affine, 16 numbers row by row (default: identity, 1 mm voxels).
* Output: the uint8 label map ``(X, Y[, Z])`` on the input's grid.

``medseg export -m MODEL -f mlflow -o OUT`` writes one (an MLflow model directory holding the model folder as an
artifact); training logs one to the run as ``medseg_model`` with ``tracking.log_pyfunc: true``::

    model = mlflow.pyfunc.load_model("runs:/<run id>/medseg_model")
    labels = model.predict(image.astype("float32"), params={"affine": affine.ravel().tolist()})

The model is stored as "model from code" (a three-line script that builds :class:`MedsegPyfunc`), not as a
cloudpickle: loading it runs no unpickling. It needs medseg installed where it loads (its ``pip_requirements``
name ``medseg`` at this version).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from medseg.errors import InputError, OutputError

ARTIFACT = "model"  # the model folder inside the MLflow model
LOGGED_NAME = "medseg_model"


class MedsegPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """The pyfunc model: loads the model folder artifact into a Predictor and predicts one image per call."""

    def load_context(self, context):
        from medseg.inference.predictor import Predictor

        self.predictor = Predictor.from_model_dir(context.artifacts[ARTIFACT], "auto")

    def predict(self, context, model_input, params=None):  # untyped: hints would make MLflow infer a signature (it says so once, at import)
        from medseg.io.volume import Volume

        image = np.asarray(model_input, dtype=np.float32)
        dims = self.predictor.spatial_dims
        if image.ndim == dims:
            image = image[None]
        if image.ndim != dims + 1:
            raise InputError("SHAPE_INVALID", f"expected a (C, {'X, Y, Z' if dims == 3 else 'X, Y'}) array, got "
                             f"shape {image.shape}")
        values = (params or {}).get("affine")
        affine = np.asarray(values, dtype=np.float64).reshape(4, 4) if values is not None else np.eye(4)
        return self.predictor.predict(Volume(image, affine)).array[0]


#: The "model from code" MLflow stores and runs at load time instead of unpickling an object.
MODEL_CODE = """from mlflow.models import set_model

from medseg.deploy.pyfunc import MedsegPyfunc

set_model(MedsegPyfunc())
"""


def _signature(info: dict) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    dims = int(info["spatial_dims"])
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,) * (dims + 1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1,) * dims)]),
        params=ParamSchema([ParamSpec("affine", "double", np.eye(4).ravel().tolist(), (-1,))]),
    )


def _arguments(model_dir: Path, code: Path) -> dict[str, Any]:
    import medseg
    from medseg.models.folder import read_info

    code.write_text(MODEL_CODE, encoding="utf-8")
    return {"python_model": str(code), "artifacts": {ARTIFACT: str(model_dir)},
            "signature": _signature(read_info(model_dir)), "pip_requirements": [f"medseg=={medseg.__version__}"]}


def save_pyfunc(model_dir: str | Path, out: str | Path) -> Path:
    """Writes the MLflow model directory ``out`` of a model folder (``medseg export -f mlflow``).

    Raises:
        ModelError: ``MODEL_NOT_FOUND`` / ``MODEL_DIR_INVALID`` (checked by reading the folder).
        OutputError: ``OUTPUT_EXISTS``.
    """
    import tempfile

    from medseg.models.folder import ModelFolder

    folder = ModelFolder.read(model_dir)  # a damaged folder is refused here, not when MLflow loads it
    out = Path(out)
    if out.exists():
        raise OutputError("OUTPUT_EXISTS", f"{out} exists", "choose another -o or remove it")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*input example", category=UserWarning)  # a whole volume: none
        mlflow.pyfunc.save_model(str(out), **_arguments(folder.path, Path(tmp) / "medseg_pyfunc.py"))
    return out


def log_pyfunc(run_id: str, tracking_uri: str, model_dir: Path) -> None:
    """Logs the model folder as a pyfunc model ``medseg_model`` to an MLflow run (training's ``_log_artifacts``)."""
    import tempfile

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="(?s).*input example", category=UserWarning)
        mlflow.pyfunc.log_model(name=LOGGED_NAME, **_arguments(Path(model_dir), Path(tmp) / "medseg_pyfunc.py"))
