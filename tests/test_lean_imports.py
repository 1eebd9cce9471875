"""Start-up: MONAI is imported without the optional integrations medseg never uses (medseg/lean_imports.py), those
still import afterwards, and prediction with an exported model imports no MONAI at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.lean_imports import OPTIONAL

HEAVY = ["transformers", "mlflow", "matplotlib", "pandas", "scipy.signal", "sklearn"]


def _python(code: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "MEDSEG_MONAI_FULL_IMPORT"} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_monai_imports_without_its_optional_integrations_which_still_import_afterwards():
    assert set(HEAVY) == set(OPTIONAL)
    result = _python(
        "import json, sys; import medseg, monai; from monai.networks.nets import UNet; "
        f"before = [m for m in {HEAVY!r} if m in sys.modules]; "
        "import transformers, mlflow, matplotlib.pyplot, pandas, scipy.signal, sklearn.metrics; "
        "from transformers import SegformerConfig; "
        "from medseg.models import MODELS; "
        "print(json.dumps({'before': before, 'models': MODELS.names(), 'pyplot': 'matplotlib.pyplot' in sys.modules}))")
    assert result["before"] == []
    assert result["pyplot"] and "segformer" in result["models"] and "unet" in result["models"]


def test_the_full_import_can_be_asked_for():
    result = _python("import json, sys; import medseg, monai; print(json.dumps([m for m in ['transformers', 'sklearn'] "
                     "if m in sys.modules]))", MEDSEG_MONAI_FULL_IMPORT="1")
    assert result == ["transformers", "sklearn"]


def test_packages_imported_before_monai_are_left_alone():
    result = _python("import json, sys; import medseg, sklearn, monai; "
                     "from monai.metrics.embedding_collapse import has_sklearn; print(json.dumps(has_sklearn))")
    assert result is True


def test_prediction_with_an_exported_model_imports_no_monai(smoke_model: Path, tmp_path: Path):
    from medseg.config import load_config
    from medseg.deploy.export import export_model

    onnx = export_model(smoke_model, "onnx", tmp_path / "onnx")
    spacing = load_config(onnx / "config.yaml").data.spacing
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, (40, 36, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, np.diag([*spacing, 1.0])), tmp_path / "case.nii.gz")
    result = _python(
        "import json, sys\n"
        "from medseg.cli import main\n"
        f"sys.argv = ['medseg', 'predict', '-m', {str(onnx)!r}, '-i', {str(tmp_path / 'case.nii.gz')!r}, "
        f"'-o', {str(tmp_path / 'out')!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'transformers', 'mlflow'})))")
    assert result == []
    labels = nib.load(tmp_path / "out" / "case.nii.gz")
    assert labels.shape == image.shape


def test_only_monai_modules_are_refused_and_find_spec_keeps_its_answer(monkeypatch):
    """The refusal is for MONAI's own imports while it initialises: a package MONAI imports (torchvision, whose
    import reaches torch._dynamo) that asks ``importlib.util.find_spec`` must get the ordinary answer, not an
    exception (that broke torch.export beside torchvision)."""
    import importlib.util

    from medseg import lean_imports

    monkeypatch.setattr(lean_imports, "OPTIONAL", ("medseg_no_such_optional",))
    monkeypatch.setattr(lean_imports, "monai_initialising", lambda: True)
    finder = lean_imports.LeanMonaiFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    assert importlib.util.find_spec("medseg_no_such_optional") is None  # asked from here: not MONAI
    assert importlib.util.find_spec("json") is not None
    scope = {"__name__": "monai.utils.module", "finder": finder}
    exec("try:\n    finder.find_spec('medseg_no_such_optional')\n    refused = False\n"
         "except ModuleNotFoundError:\n    refused = True", scope)
    assert scope["refused"] is True
