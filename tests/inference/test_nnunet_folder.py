"""nnU-Net v2 results folders without nnU-Net installed: reading, safety, codes, the CLI (predict -m RESULTS,
import-nnunet, export) and the nnU-Net origin in the records. Parity with real nnU-Net: tests/models/test_nnunet_parity.py."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import nnunet_helpers as H
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import InputError, ModelError
from medseg.inference.predictor import Predictor
from medseg.io.volume import Volume
from medseg.models.nnunet import import_results_folder, read_results_folder

pytest.importorskip("dynamic_network_architectures")
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return H.write_results_folder(tmp_path_factory.mktemp("nnunet"), folds=(0, 1))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(H.ct_image(), AFFINE), path)
    return path


def _copy(results: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(results, tmp_path / results.name))


def test_reads_folds_mirroring_labels_and_origin(results: Path):
    model = read_results_folder(results)
    origin = model.spec["origin"]
    assert origin["folds"] == ["0", "1"] and origin["trainer"] == "nnUNetTrainer" and origin["configuration"] == "3d_fullres"
    assert origin["mirroring_axes"] == [0, 1, 2] and len(origin["checkpoint_sha256"]) == 2
    assert model.labels == {0: "background", 1: "liver", 2: "tumour"}
    net = model.network()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():  # the folds' logits averaged, as nnU-Net's predictor averages them
        expected = (net.folds[0](x) + net.folds[1](x)) / 2
        assert torch.allclose(net(x), expected, atol=1e-6)
    assert read_results_folder(results, folds=["1"]).spec["origin"]["folds"] == ["1"]


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(results: Path, tmp_path: Path):
    folder = _copy(results, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = H.checkpoint(H.network(H.plans()), H.plans(), H.DATASET)
    ckpt["logging"]["extra"] = Payload()
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError) as err:
        read_results_folder(folder)
    assert err.value.code == "NNUNET_CHECKPOINT_UNSAFE" and "fold_0/checkpoint_final.pth" in str(err.value)
    assert not marker.exists()
    result = CliRunner().invoke(app, ["import-nnunet", str(folder), "-o", str(tmp_path / "m")])
    assert result.exit_code != 0 and not marker.exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage, code, named", [
    (lambda f: (f / "plans.json").unlink(), "NNUNET_FILE_MISSING", "plans.json"),
    (lambda f: (f / "dataset.json").unlink(), "NNUNET_FILE_MISSING", "dataset.json"),
    (lambda f: (f / "fold_1" / "checkpoint_final.pth").unlink(), "NNUNET_FILE_MISSING", "fold_3/checkpoint_final.pth"),
    (lambda f: (f / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a zip"), "NNUNET_CHECKPOINT_INVALID", "fold_0"),
])
def test_bad_folders_get_codes_naming_the_file(results: Path, tmp_path: Path, damage, code, named):
    folder = _copy(results, tmp_path)
    damage(folder)
    with pytest.raises(ModelError) as err:
        read_results_folder(folder, folds=["0", "3"] if "fold_3" in named else None)
    assert err.value.code == code and named in str(err.value)


def _rewrite(folder: Path, plans=None, dataset=None, trainer=None, fold="1") -> None:
    if plans is not None:
        (folder / "plans.json").write_text(json.dumps(plans))
    if dataset is not None:
        (folder / "dataset.json").write_text(json.dumps(dataset))
    if trainer is not None:
        torch.save(H.checkpoint(H.network(H.plans()), H.plans(), H.DATASET, trainer=trainer),
                   folder / f"fold_{fold}" / "checkpoint_final.pth")


def test_configuration_network_folds_and_regions_get_their_codes(results: Path, tmp_path: Path):
    cases = []
    p = H.plans()
    p["configurations"]["3d_lowres"] = p["configurations"].pop("3d_fullres")
    cases.append(({"plans": p}, "NNUNET_CONFIGURATION_MISSING"))
    p = H.plans()
    p["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    cases.append(({"plans": p}, "NNUNET_NETWORK_UNBUILDABLE"))
    p = H.plans()
    p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "subprocess.Popen"
    cases.append(({"plans": p}, "NNUNET_NETWORK_UNBUILDABLE"))
    cases.append(({"trainer": "nnUNetTrainer_250epochs"}, "NNUNET_FOLDS_INCOMPATIBLE"))
    d = copy.deepcopy(H.DATASET)
    d["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    cases.append(({"dataset": d}, "NNUNET_UNSUPPORTED"))
    p = H.plans()
    p["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_torch_fornnunet"
    cases.append(({"plans": p}, "NNUNET_UNSUPPORTED"))
    for i, (change, code) in enumerate(cases):
        folder = _copy(results, tmp_path / str(i))
        _rewrite(folder, **change)
        with pytest.raises(ModelError) as err:
            read_results_folder(folder).network()
        assert err.value.code == code, (change, err.value)


def test_channels_must_match_channel_names(results: Path):
    predictor = Predictor.from_model_dir(results, "cpu")
    two = np.stack([H.ct_image(), H.ct_image(seed=1)])
    with pytest.raises(InputError) as err:
        predictor.predict_case(Volume(two, AFFINE))
    assert err.value.code == "CHANNELS_MISMATCH"


def test_predict_import_and_export_give_the_same_labels_and_name_the_origin(results: Path, image: Path, tmp_path: Path):
    runner = CliRunner()
    direct = tmp_path / "direct"
    result = runner.invoke(app, ["predict", "-i", str(image), "-o", str(direct), "-m", str(results), "-d", "cpu"])
    assert result.exit_code == 0, result.output
    labels = nib.load(direct / "case.nii.gz")
    assert labels.shape == H.ct_image().shape and np.allclose(labels.affine, AFFINE)
    values = np.asarray(labels.dataobj)
    assert set(np.unique(values)) <= {0, 1, 2} and len(np.unique(values)) > 1
    provenance = json.loads((direct / "provenance.json").read_text())
    assert provenance["models"][0]["origin"] == "nnU-Net v2 nnUNetTrainer__nnUNetPlans__3d_fullres (folds 0, 1)"
    assert provenance["settings"]["tta"] is True
    # the review report and the evaluation report name the origin
    assert runner.invoke(app, ["report", str(direct), "--static", "--no-pdf"]).exit_code == 0
    assert "from nnU-Net v2 nnUNetTrainer__nnUNetPlans__3d_fullres (folds 0, 1)" in (direct / "review.html").read_text()
    evaluation = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--pred", str(direct), "--ref", str(direct), "-o", str(evaluation), "-m", str(results)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["report", str(evaluation), "--static", "--no-pdf"]).exit_code == 0
    page = (evaluation / "report.html").read_text()
    assert "<dt>Origin</dt><dd>nnU-Net v2 nnUNetTrainer__nnUNetPlans__3d_fullres (folds 0, 1)</dd>" in page

    model_dir = tmp_path / "imported"
    assert runner.invoke(app, ["import-nnunet", str(results), "-o", str(model_dir)]).exit_code == 0
    info = json.loads((model_dir / "model.json").read_text())
    assert info["origin"]["folds"] == ["0", "1"] and info["nnunet"]["patch_size"] == [8, 16, 16]
    via_import = tmp_path / "imported_pred"
    assert runner.invoke(app, ["predict", "-i", str(image), "-o", str(via_import), "-m", str(model_dir), "-d", "cpu"]).exit_code == 0
    imported = np.asarray(nib.load(via_import / "case.nii.gz").dataobj)
    # one module averaging both folds per window vs nnU-Net's per-fold accumulation: float16 rounding only
    assert (imported == values).mean() >= 0.999

    exported = tmp_path / "onnx"
    result = runner.invoke(app, ["export", "-m", str(model_dir), "-f", "onnx", "-o", str(exported)])
    assert result.exit_code == 0, result.output
    via_onnx = tmp_path / "onnx_pred"
    assert runner.invoke(app, ["predict", "-i", str(image), "-o", str(via_onnx), "-m", str(exported), "-d", "cpu"]).exit_code == 0
    onnx_labels = np.asarray(nib.load(via_onnx / "case.nii.gz").dataobj)
    assert (onnx_labels == imported).mean() >= 0.999


def test_fast_mode_and_no_tta_say_they_are_not_exact(results: Path, image: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["predict", "-i", str(image), "-o", str(tmp_path / "o"), "-m", str(results),
                                      "-d", "cpu", "--folds", "0", "--fast"])
    assert result.exit_code == 0, result.output
    assert "not nnU-Net-exact: fast mode (--fast)" in result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["model"] == [results.name]
    result = CliRunner().invoke(app, ["predict", "-i", str(image), "-o", str(tmp_path / "p"), "-m", str(results),
                                      "-d", "cpu", "--folds", "0", "--no-tta", "--overlap", "0.25"])
    assert result.exit_code == 0, result.output
    assert "not nnU-Net-exact: mirroring off (--no-tta); tile overlap 0.25 (nnU-Net's: 0.5)" in result.output
    result = CliRunner().invoke(app, ["predict", "-i", str(image), "-o", str(tmp_path / "q"), "-m", str(results),
                                      "-d", "cpu", "--folds", "0"])
    assert result.exit_code == 0 and "nnU-Net-exact" not in result.output, result.output


def test_import_refuses_to_write_into_the_results_folder(results: Path):
    with pytest.raises(ModelError) as err:
        import_results_folder(results, results)
    assert err.value.code == "MODEL_DIR_INVALID"


def test_combine_merges_disjoint_label_models_by_probability(results: Path, image: Path, tmp_path: Path):
    """Two models with disjoint labels (TotalSegmentator's parts): where one model alone claims a voxel it keeps that
    model's own (exact) label; where both do, the more probable one wins; label names clashing are refused."""
    other_dataset = {**H.DATASET, "labels": {"background": 0, "spleen": 1, "kidney": 2}}
    part2 = H.write_results_folder(tmp_path / "part2", folds=(0,), dataset=other_dataset, seed=5)
    part1 = _copy(results, tmp_path / "part1")
    volume = Volume(H.ct_image()[None], AFFINE)
    combined = Predictor.from_model_dir([part1, part2], "cpu", combine=True, folds=["0"])
    assert combined.labels == {0: "background", 1: "liver", 2: "tumour", 3: "spleen", 4: "kidney"}
    merged = combined.predict_case(volume).labels.array[0]
    alone = [Predictor.from_model_dir(p, "cpu", folds=["0"]) for p in (part1, part2)]
    from medseg.inference import nnunet_exact

    runs = [nnunet_exact.predict(volume.array, volume.spacing, p.nnunet, list(p.members[0].network.folds),
                                 torch.device("cpu"), confidence=True) for p in alone]
    (l1, c1, _), (l2, c2, _) = runs
    expected = np.zeros_like(l1)
    expected[l1 > 0] = l1[l1 > 0]
    second = (l2 > 0) & ((l1 == 0) | (c2 > c1))
    expected[second] = l2[second] + 2
    assert np.array_equal(merged, expected)
    assert (second & (l1 > 0)).any() and ((l1 > 0) & ~second).any()  # both rules were exercised
    result = CliRunner().invoke(app, ["predict", "-i", str(image), "-o", str(tmp_path / "o"), "-m", str(part1), "-m",
                                      str(part2), "--combine", "--folds", "0", "-d", "cpu"])
    assert result.exit_code == 0, result.output
    written = np.asarray(nib.load(tmp_path / "o" / "case.nii.gz").dataobj)
    assert set(np.unique(written)) <= {0, 1, 2, 3, 4}
    with pytest.raises(ModelError) as err:  # the same labels twice: a clash
        Predictor.from_model_dir([part1, part1], "cpu", combine=True)
    assert err.value.code == "COMBINE_INVALID" and "liver" in str(err.value)
    with pytest.raises(ModelError) as err:
        Predictor.from_model_dir([part1, part2], "cpu")  # without --combine: not an ensemble
    assert err.value.code == "ENSEMBLE_INCOMPATIBLE"


def test_qc_uncertainty_previews_and_probabilities_of_an_nnunet_model(results: Path, image: Path, tmp_path: Path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["predict", "-i", str(image), "-o", str(out), "-m", str(results), "--folds", "0",
                                      "-d", "cpu", "--qc", "--save-uncertainty", "--save-probabilities", "--preview"])
    assert result.exit_code == 0, result.output
    case = json.loads((out / "manifest.json").read_text())["cases"][0]
    assert case["qc"]["verdict"] in ("ok", "review")
    assert {"nnunet_network_s", "nnunet_resample_s", "nnunet_resample_back_s"} <= set(case["timings"])
    probs = np.load(out / "probabilities" / "case.npz")
    first = probs["probabilities"].astype(np.float32)
    assert first.shape[0] == 3 and np.allclose(first.sum(0), 1.0, atol=3e-3)
    labels = np.asarray(nib.load(out / "case.nii.gz").dataobj)
    assert np.array_equal(first.argmax(0), labels) or (first.argmax(0) == labels).mean() > 0.999  # float16 ties
    uncertainty = nib.load(next((out / "uncertainty").glob("*.nii.gz")))
    assert uncertainty.shape == labels.shape and (out / "previews").is_dir()


def test_options_that_do_not_apply_are_refused(results: Path, image: Path, tmp_path: Path):
    model_dir = tmp_path / "imported"
    import_results_folder(results, model_dir, ["0"])
    with pytest.raises(ModelError) as err:  # --folds picks folds of a results folder only
        Predictor.from_model_dir(model_dir, "cpu", folds=["1"])
    assert err.value.code == "CONFIG_INVALID_VALUE"
    result = CliRunner().invoke(app, ["predict", "-i", str(image), "-o", str(tmp_path / "o"), "-m", str(results),
                                      "--explain", "-d", "cpu"])
    assert result.exit_code != 0 and getattr(result.exception, "code", None) == "MODEL_DIR_INVALID"


def test_the_training_software_is_recorded_from_debug_json(results: Path, tmp_path: Path):
    folder = _copy(results, tmp_path)
    (folder / "fold_0" / "debug.json").write_text(json.dumps({"torch_version": "2.5.1", "cudnn_version": 90100,
                                                              "batch_size": 2}))
    assert read_results_folder(folder).spec["origin"]["trained_with"] == {"torch_version": "2.5.1", "cudnn_version": "90100"}
    assert read_results_folder(results).spec["origin"]["trained_with"] == {}
