"""Class 7: the record of a run is never destroyed or left stale. A plain rerun into a finished folder is refused
before anything is touched; ``--resume`` over a damaged manifest rebuilds it from the outputs (read back in full)
instead of failing every case; a resumed run keeps the records of cases it was not given again; a qform/sform
disagreement is recorded in the manifest, not only logged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from adversarial_helpers import assert_coded


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_plain_rerun_into_a_finished_folder_is_refused_untouched(tmp_path: Path, cli, smoke_model: Path,
                                                                    case_folder: Path):
    out = tmp_path / "out"
    assert cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta").code == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert_coded(cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta"), "OUTPUT_EXISTS")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_resume_over_a_truncated_manifest_rebuilds_it_from_the_outputs(tmp_path: Path, cli, smoke_model: Path,
                                                                       case_folder: Path):
    out = tmp_path / "out"
    assert cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta").code == 0
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    outputs = sorted(out.glob("*.nii.gz"))
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    damaged = outputs[1]
    damaged.write_bytes(damaged.read_bytes()[:200])  # and one output is damaged too
    run = cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta", "--resume")
    assert run.code == 0, run.err
    manifest = _manifest(out)
    assert [c["status"] for c in manifest["cases"]] == ["ok"] * len(outputs)
    resumed = {c["case_id"]: c["resumed"] for c in manifest["cases"]}
    assert resumed == {p.name.removesuffix(".nii.gz"): p != damaged for p in outputs}
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in outputs if p != damaged)
    kept = list(out.glob("manifest.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == text[: len(text) // 2]  # the evidence is kept, not deleted
    assert any("manifest rebuilt" in note for c in manifest["cases"] if c["resumed"] for note in c["notes"])


def test_rebuilt_manifest_keeps_the_viewer_files_and_redoes_a_damaged_one(tmp_path: Path, cli, smoke_model: Path,
                                                                           case_folder: Path):
    """With --preview every 3D case also has its report viewer file: a rebuilt manifest records the intact ones,
    and a case whose viewer file is damaged is predicted again."""
    out = tmp_path / "out"
    assert cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta", "--preview").code == 0
    viewers = sorted((out / "previews").glob("*.viewer.npz"))
    assert len(viewers) == len(list(out.glob("*.nii.gz"))) >= 2
    (out / "manifest.json").write_text("{")
    viewers[0].write_bytes(viewers[0].read_bytes()[:100])
    run = cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta", "--preview", "--resume")
    assert run.code == 0, run.err
    cases = {c["case_id"]: c for c in _manifest(out)["cases"]}
    damaged = viewers[0].name.removesuffix(".viewer.npz")
    assert {case: c["resumed"] for case, c in cases.items()} == {
        v.name.removesuffix(".viewer.npz"): v != viewers[0] for v in viewers}
    assert all(c["outputs"]["viewer"]["file"] == f"previews/{case}.viewer.npz" for case, c in cases.items())
    assert np.load(viewers[0])["meta"].size > 0 and cases[damaged]["status"] == "ok"


def test_resume_keeps_the_records_of_cases_not_given_again(tmp_path: Path, cli, smoke_model: Path, case_folder: Path):
    out = tmp_path / "out"
    assert cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta").code == 0
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    first = sorted(case_folder.iterdir())[0]
    shutil.copy(first, fewer / first.name)
    assert cli("predict", "-i", fewer, "-o", out, "-m", smoke_model, "--no-tta", "--resume").code == 0
    ids = sorted(c["case_id"] for c in _manifest(out)["cases"])
    assert ids == sorted(p.name.removesuffix(".nii.gz") for p in case_folder.iterdir())


def test_qform_sform_disagreement_is_recorded_in_the_manifest(tmp_path: Path, cli, smoke_model: Path,
                                                              case_folder: Path):
    source = nib.load(sorted(case_folder.iterdir())[0])
    img = nib.Nifti1Image(np.asarray(source.dataobj), source.affine)
    qform = source.affine.copy()
    qform[0, 3] += 7.0
    img.set_sform(source.affine, code=1)
    img.set_qform(qform, code=1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(img, inputs / "disagree.nii.gz")
    assert cli("predict", "-i", inputs, "-o", tmp_path / "out", "-m", smoke_model, "--no-tta").code == 0
    notes = _manifest(tmp_path / "out")["cases"][0]["notes"]
    assert any("qform and sform disagree" in note for note in notes), notes
