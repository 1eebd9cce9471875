"""The DICOMweb chain against a real Orthanc (Debian orthanc + orthanc-dicomweb, started on 127.0.0.1): pull a
multi-series study, select, predict, push SEG and RTSTRUCT by STOW-RS, read both back from Orthanc."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from dicom_helpers import CANARY_ID, CANARY_NAME, tool
from pacs_helpers import rtstruct_masks, write_study

from medseg.inference.predictor import Predictor
from medseg.io.dicom import read_dicom

UID_ROOT = "1.2.826.0.1.3680043.10.1234."


def medseg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEDSEG_THREADS": "1", **(env or {})})


def test_pull_predict_push_reads_back_seg_and_rtstruct(orthanc_server, tiny_dataset, smoke_model, tmp_path: Path):
    import highdicom as hd

    study = write_study(tmp_path / "study", tiny_dataset)
    orthanc_server.upload(study.ct + study.others)
    out = tmp_path / "out"
    url = f"{orthanc_server.dicomweb}/studies/{study.uid}"
    run = medseg("predict", "-i", url, "-o", str(out), "-m", str(smoke_model), "-t", "dicom-seg,rtstruct", "--push",
                 "--pacs", f"uid_root={UID_ROOT}", "--no-qc")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 case(s) stored to" in run.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    by_status = {}
    for case in manifest["cases"]:
        by_status.setdefault(case["status"], []).append(case)
    assert len(by_status["ok"]) == 1 and len(by_status["skipped"]) == 2, manifest["cases"]
    reasons = sorted(c["error"] for c in by_status["skipped"])
    assert "fewer than min_slices" in reasons[0] and "modality SR" in reasons[1], reasons
    ok = by_status["ok"][0]
    assert ok["delivery"]["status"] == "ok" and ok["delivery"]["instances"] == 2
    assert manifest["source"]["dicomweb"]["server"] == orthanc_server.dicomweb
    assert not (out / ".dicomweb-download").exists()  # the downloaded study is gone
    text = "".join(p.read_text(errors="ignore") for p in out.glob("*.json")) + run.stdout + run.stderr
    assert CANARY_NAME.split("^")[0] not in text and CANARY_ID not in text and study.uid not in text

    # what the model predicts on the same series, read from the folder
    source = read_dicom(study.ct_folder)
    expected = Predictor.from_model_dir(smoke_model, "cpu").predict_case(source, qc=False).labels.array[0]
    assert (expected > 0).any()

    seg_instances = orthanc_server.instances("SEG")
    rt_instances = orthanc_server.instances("RTSTRUCT")
    assert len(seg_instances) == 1 and len(rt_instances) == 1
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(orthanc_server.file(seg_instances[0]["id"]))))
    # identity: model, weights hash, research-use description, UIDs under the configured root
    model = json.loads((smoke_model / "model.json").read_text())
    weights = model.get("weights_sha256") or json.loads((out / "provenance.json").read_text())["models"][0]["weights_sha256"]
    assert seg.SeriesDescription == f"medseg {smoke_model.name} — research use"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == smoke_model.name and weights[:12] in algorithm.AlgorithmVersion
    assert weights in algorithm.AlgorithmParameters
    processing = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "medseg"]
    assert len(processing) == 1 and processing[0].ManufacturerModelName == smoke_model.name
    assert processing[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert seg.SOPInstanceUID.startswith(UID_ROOT) and seg.SeriesInstanceUID.startswith(UID_ROOT)
    # the SEG decodes to the predicted label map on the source grid, frame k = source slice k
    files = source.meta["dicom_files"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    numbers = [s.SegmentNumber for s in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                               combine_segments=True, skip_overlap_checks=True)
    decoded = pixels.transpose(2, 1, 0)  # (slices, rows, columns) -> (X, Y, Z)
    assert np.array_equal(decoded, expected)

    rt = pydicom.dcmread(io.BytesIO(orthanc_server.file(rt_instances[0]["id"])))
    assert rt.SeriesDescription == seg.SeriesDescription and rt.SOPInstanceUID.startswith(UID_ROOT)
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["organ", "lesion"]
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == pydicom.dcmread(files[0]).FrameOfReferenceUID
    assert rt.PatientID == CANARY_ID  # the required patient module is copied (and nothing outside the module list)
    assert "InstitutionName" not in rt and "InstitutionName" not in seg
    (tmp_path / "rt.dcm").write_bytes(orthanc_server.file(rt_instances[0]["id"]))
    (tmp_path / "seg.dcm").write_bytes(orthanc_server.file(seg_instances[0]["id"]))
    if tool("dciodvfy"):  # both, as stored in the PACS, are valid to an independent checker
        for name in ("rt.dcm", "seg.dcm"):
            check = subprocess.run([tool("dciodvfy"), str(tmp_path / name)], capture_output=True, text=True)
            assert "Error" not in check.stdout + check.stderr, (name, check.stderr)
    masks = rtstruct_masks(study.ct_folder, tmp_path / "rt.dcm")
    for value, name in ((1, "organ"), (2, "lesion")):
        reference = expected == value
        dice = 2 * (masks[name] & reference).sum() / max(masks[name].sum() + reference.sum(), 1)
        assert dice >= 0.97, (name, dice)
