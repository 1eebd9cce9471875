"""An nnU-Net v2 results folder (nnU-Net's layout and checkpoint format, tests/nnunet_helpers.py) through medseg's
PACS and serving paths: pull from a real Orthanc over DICOMweb, predict nnU-Net's way, push a DICOM-SEG naming the
nnU-Net origin, read it back; and serve-http answering as `medseg predict` does."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nnunet_helpers as H
import numpy as np
import pydicom
import pytest

from medseg.inference.predictor import Predictor
from medseg.io.dicom import read_dicom
from medseg.io.dicom_write import write_dicom_series
from medseg.io.volume import Volume

pytest.importorskip("dynamic_network_architectures")
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
ORIGIN = "nnU-Net v2 nnUNetTrainer__nnUNetPlans__3d_fullres (fold 0)"


def medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEDSEG_THREADS": "1"})


def test_dicomweb_pull_predict_push_names_the_nnunet_origin(orthanc_server, tmp_path: Path):
    results = H.write_results_folder(tmp_path / "nnunet", folds=(0,))
    series = tmp_path / "series"
    write_dicom_series(Volume(H.ct_image()[None], np.diag([0.8, 0.8, 2.5, 1.0])), series, study_uid=UID_ROOT + "7")
    orthanc_server.upload(sorted(series.iterdir()))
    out = tmp_path / "out"
    run = medseg("predict", "-i", f"{orthanc_server.dicomweb}/studies/{UID_ROOT}7", "-o", str(out), "-m", str(results),
                 "-t", "dicom-seg", "--push", "--pacs", f"uid_root={UID_ROOT}", "-d", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 case(s) stored to" in run.stdout
    assert json.loads((out / "provenance.json").read_text())["models"][0]["origin"] == ORIGIN

    _check_seg(orthanc_server, series, results)


def _check_seg(orthanc_server, series: Path, results: Path) -> None:
    """The one SEG in Orthanc names the nnU-Net origin and decodes to nnU-Net's prediction of the same series read
    from the folder."""
    import highdicom as hd

    (seg_instance,) = orthanc_server.instances("SEG")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(orthanc_server.file(seg_instance["id"]))))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert ORIGIN in algorithm.AlgorithmParameters
    source = read_dicom(series)
    expected = Predictor.from_model_dir(results, "cpu").predict_case(source, qc=False).labels.array[0]
    files = source.meta["dicom_files"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True,
                                               segment_numbers=[s.SegmentNumber for s in seg.SegmentSequence])
    names = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    decoded = np.zeros(pixels.shape, np.uint8)
    for number, name in names.items():
        decoded[pixels == number] = {"liver": 1, "tumour": 2}[name]
    assert np.array_equal(decoded.transpose(2, 1, 0), expected)  # frames (slice, row, column) -> (X, Y, Z)


def test_serve_http_answers_as_predict_does(tmp_path: Path):
    results = H.write_results_folder(tmp_path / "nnunet", folds=(0,))
    image = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(H.ct_image(), np.diag([0.8, 0.8, 2.5, 1.0])), image)
    done = medseg("-q", "predict", "-i", str(image), "-o", str(tmp_path / "cli"), "-m", str(results), "-d", "cpu")
    assert done.returncode == 0, done.stderr
    expected = np.asarray(nib.load(tmp_path / "cli" / "case.nii.gz").dataobj)
    (tmp_path / "answer.nii.gz").write_bytes(H.serve_http_answer(results, image.read_bytes()))
    assert np.array_equal(np.asarray(nib.load(tmp_path / "answer.nii.gz").dataobj), expected)


def test_the_dicom_listener_segments_a_series_with_an_nnunet_model(orthanc_server, tmp_path: Path):
    import orthanc
    from pynetdicom import AE

    results = H.write_results_folder(tmp_path / "nnunet", folds=(0,))
    series = tmp_path / "series"
    write_dicom_series(Volume(H.ct_image()[None], np.diag([0.8, 0.8, 2.5, 1.0])), series, study_uid=UID_ROOT + "8")
    out, port = tmp_path / "out", orthanc.free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "medseg", "serve", "-m", str(results), "-o", str(out), "--port", str(port), "-d", "cpu",
         "--dest", f"{orthanc_server.aet}@127.0.0.1:{orthanc_server.dicom_port}", "--pacs", "idle_s=1",
         "-t", "dicom-seg", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MEDSEG_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").exists():
            assert serve.poll() is None and time.monotonic() < deadline, "the listener did not start"
            time.sleep(0.25)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
        assert assoc.is_established
        statuses = {int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in sorted(series.iterdir())}
        assoc.release()
        assert statuses == {0}
        deadline = time.monotonic() + 120
        while not orthanc_server.instances("SEG"):
            assert time.monotonic() < deadline, "no SEG arrived in Orthanc"
            time.sleep(0.25)
    finally:
        serve.send_signal(signal.SIGTERM)
        console = serve.communicate(timeout=120)[0]
    assert serve.returncode == 0, console
    _check_seg(orthanc_server, series, results)
