"""Where a prediction's time goes: the per-case breakdown of ``medseg predict`` on one large CT, against the peer
(reading that CT with nibabel and writing a uint8 label map) and against a baseline commit of medseg, all measured
in the same run on the same files.

    .venv/bin/python benchmarks/pipeline.py [--baseline REF] [--networks tiny demo] [--shape 512 512 300]

For each network (``tiny``: a 3D UNet of 4-8 channels, so the overhead is visible; ``demo``: the demo preset's UNet
of 16-128 channels, 48 x 48 x 24 windows), each input (``model_grid``: the CT at the model spacing; ``resampled``:
the CT at 0.8 x 0.8 x 1.5 mm, resampled to the model's 1.5 x 1.5 x 3 mm) and QC on and off, one fresh process per
medseg version times, per case:

* ``read`` (medseg's reader), ``preprocess`` (reorientation, resampling, the model grid), ``network`` (the
  network's calls), ``stitch`` (cutting windows, normalisation, blending, argmax: the rest of the sliding window),
  ``map_back`` (to the input grid), ``qc`` (the accumulator's sums and the label statistics) and ``write``
  (medseg's NIfTI writer, uint8);
* ``ratio_to_peer``: read + predict + write over the peer's nibabel read + uint8 write of the same CT;
* ``non_network_share``: 1 - network / (read + predict + write).

Memory (``--memory``, also alone with ``--memory-only``, which keeps the other results): the peak RSS (``VmHWM``) of
a fresh process predicting a 512 x 512 x 600 CT as ``benchmarks/inference.py`` (c) does, for each version.

Start-up, in fresh processes (median of 3): ``import torch`` against ``import medseg.inference.predictor``, and
process start to the first window for the PyTorch and the ONNX model folder (on the tiny network and a 128 x 128 x 64
case, so reading is not what is timed).

The baseline is the same code at ``--baseline`` (default: the last commit before issue 28's CPU work), checked out
into a temporary ``git worktree`` and run with the same interpreter and packages. The networks are seeded and fitted
for 60 steps to a phantom (an organ and a bone in a body), so that their labels are structures, as a trained model's
are, and QC costs what it costs on real output; the JSON records each prediction's foreground share and verdict. Results:
``benchmarks/results/pipeline.json``. On a CUDA machine ``--device cuda`` times the same on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
BASELINE = "1aaaab5"  # main before issue 28's CPU cuts, fast start and pipeline benchmark
MODEL_SPACING = (1.5, 1.5, 3.0)
SCANNER_SPACING = (0.8, 0.8, 1.5)
NETWORKS = {
    "tiny": {"channels": [4, 8], "strides": [2], "patch": [96, 96, 64]},
    "demo": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "patch": [48, 48, 24]},
}


# ------------------------------------------------------------------------------------------------ set-up (current tree)


def make_model(folder: Path, name: str) -> Path:
    """A medseg model folder (``benchmarks/inference.py``'s, with this network): seeded weights fitted briefly to a
    phantom, CT window normalisation, 3 classes."""
    import inference

    spec = NETWORKS[name]
    return inference.make_model_dir(folder, spacing=MODEL_SPACING, patch=spec["patch"], channels=spec["channels"],
                                    strides=spec["strides"], overrides=("data.intensity.scheme=window",),
                                    prepare=lambda net: fit_briefly(net, spec["patch"]))


def phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT-like volume (air, a body ellipse, an organ, a bone, noise) and its labels (1 organ, 2 bone)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    organ = ((x - 0.3) / 0.25) ** 2 + ((y + 0.1) / 0.2) ** 2 < 1
    bone = ((x + 0.05) / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1
    plane = (np.where(body, 40, -1000) + organ * 60 + bone * 700).astype(np.float32)
    array = np.empty(shape, np.int16)
    for k in range(shape[2]):
        array[:, :, k] = plane + rng.normal(0, 12, plane.shape).astype(np.float32) * body
    labels = np.broadcast_to((organ * 1 + bone * 2).astype(np.uint8)[..., None], shape)
    return array, labels


def fit_briefly(net, patch: list[int], steps: int = 60) -> None:
    """A few Adam steps on crops of a phantom, so the network's labels are structures (an organ, a bone) as a
    trained model's are, not noise: QC and post-processing cost what they cost on real output."""
    import torch

    array, labels = phantom((160, 160, 96), seed=1)
    image = torch.from_numpy(np.clip((array.astype(np.float32) + 160) / 400, 0, 1))[None]
    target = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch)]
        box = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        x = torch.stack([image[(slice(None), *box)]])
        loss = torch.nn.functional.cross_entropy(net(x), target[box][None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()


def write_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, ...], seed: int = 0) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(phantom(shape, seed)[0], np.diag([*spacing, 1.0])), path)
    return path


# ------------------------------------------------------------------------------------------------ worker (any version)


def _timed(fn, bucket: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def worker(job: dict) -> dict:
    """Times every scenario of ``job`` with the medseg found on ``sys.path`` (the current tree or the baseline)."""
    import nibabel as nib
    import torch

    torch.set_num_threads(job["threads"])
    import medseg
    import medseg.inference.predictor as predictor_module
    from medseg.inference.predictor import Predictor
    from medseg.io.nifti import write_nifti
    from medseg.io.readers import read_volume
    from medseg.qc.signals import QcAccumulator

    out: dict = {"medseg": str(Path(medseg.__file__).parents[1])}  # which tree was timed
    for scenario in job["scenarios"]:
        ct, out_dir = Path(scenario["ct"]), Path(job["tmp"]) / f"out-{os.getpid()}"
        out_dir.mkdir(exist_ok=True)
        # the peer: nibabel reads the CT, a uint8 label map of its shape is written
        start = time.perf_counter()
        image = nib.load(ct)
        array = np.asanyarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.zeros(array.shape, np.uint8), image.affine), out_dir / "peer.nii.gz")
        peer = time.perf_counter() - start
        del array, image

        predictor = Predictor.from_model_dir(scenario["model"], job["device"])
        times: dict = {}
        member = predictor.members[0]
        member.backend = _timed(member.backend, times, "network")
        saved = {name: getattr(Predictor, name) for name in ("_model_grid", "_assess")}
        saved_add, saved_map_back = QcAccumulator.add, predictor_module.map_back
        Predictor._model_grid = _timed(saved["_model_grid"], times, "preprocess")  # type: ignore[method-assign]
        Predictor._assess = _timed(saved["_assess"], times, "qc")  # type: ignore[method-assign]
        QcAccumulator.add = _timed(saved_add, times, "qc")  # type: ignore[method-assign]
        predictor_module.map_back = _timed(saved_map_back, times, "map_back")
        try:
            start = time.perf_counter()
            volume = read_volume(ct)
            read = time.perf_counter() - start
            start = time.perf_counter()
            prediction = predictor.predict_case(volume, qc=scenario["qc"])
            if job["device"].startswith("cuda"):
                torch.cuda.synchronize()
            predict = time.perf_counter() - start
            start = time.perf_counter()
            write_nifti(prediction.labels, out_dir / "labels.nii.gz", dtype=np.uint8)
            write = time.perf_counter() - start
        finally:
            for name, fn in saved.items():
                setattr(Predictor, name, fn)
            QcAccumulator.add, predictor_module.map_back = saved_add, saved_map_back  # type: ignore[method-assign]
        inner = sum(times.get(k, 0.0) for k in ("network", "preprocess", "map_back", "qc"))
        total = read + predict + write
        labels = prediction.labels.array
        out[scenario["name"]] = {
            "seconds": {"read": round(read, 3), "preprocess": round(times.get("preprocess", 0.0), 3),
                        "network": round(times.get("network", 0.0), 3), "stitch": round(predict - inner, 3),
                        "map_back": round(times.get("map_back", 0.0), 3), "qc": round(times.get("qc", 0.0), 3),
                        "write": round(write, 3), "predict": round(predict, 3), "total": round(total, 3),
                        "peer_read_write": round(peer, 3)},
            "ratio_to_peer": round(total / peer, 2),
            "non_network_share": round(1 - times.get("network", 0.0) / total, 3),
            "qc_share_of_predict": round(times.get("qc", 0.0) / predict, 3),
            "foreground_share": round(float((labels > 0).mean()), 4),
            "verdict": (prediction.qc or {}).get("verdict"),
        }
        print(json.dumps({scenario["name"]: out[scenario["name"]]}), file=sys.stderr, flush=True)
        del prediction, volume, labels
    return out


def first_window(job: dict) -> None:
    """Process start to the first window (the parent passes its clock before starting this process)."""
    from medseg.inference.predictor import Predictor
    from medseg.io.readers import read_volume

    class Done(Exception):
        pass

    def on_window(done: int, total: int) -> None:
        raise Done

    predictor = Predictor.from_model_dir(job["model"], "cpu")
    volume = read_volume(job["ct"])
    try:
        predictor.predict_case(volume, on_window=on_window, qc=False)
    except Done:
        print(json.dumps({"first_window_s": round(time.time() - job["t0"], 3)}))


# ------------------------------------------------------------------------------------------------ driver


def _run(args: list[str], pythonpath: Path, timeout: int = 3600) -> str:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=pythonpath)
    if out.returncode:
        raise RuntimeError(f"{args[:3]} failed:\n{out.stderr[-4000:]}")
    return out.stdout


def _remove_worktree(trees: dict[str, Path]) -> None:
    if "baseline" in trees:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees["baseline"])], capture_output=True)


def _median_wall(code: str, pythonpath: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(["-c", code], pythonpath)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def startup(tree: Path, models: dict[str, Path], ct: Path) -> dict:
    script = Path(__file__).resolve()
    result = {"import_torch_s": _median_wall("import torch", tree),
              "import_predictor_s": _median_wall("import medseg.inference.predictor", tree)}
    result["import_ratio_to_torch"] = round(result["import_predictor_s"] / result["import_torch_s"], 2)
    for kind, model in models.items():
        runs = []
        for _ in range(3):
            job = {"model": str(model), "ct": str(ct), "t0": time.time()}
            runs.append(json.loads(_run([str(script), "--first-window", json.dumps(job)], tree))["first_window_s"])
        result[f"first_window_{kind}_s"] = round(statistics.median(runs), 3)
    return result


def memory(trees: dict[str, Path], tmp: Path) -> dict:
    """Peak RSS predicting a 512 x 512 x 600 CT (``benchmarks/inference.py``'s child, its model and volume) with
    each version's medseg."""
    import inference

    from medseg.io.nifti import write_nifti

    model = inference.make_model_dir(tmp / "memory_model")
    write_nifti(inference.ct_volume((512, 512, 600), seed=0), tmp / "memory_in" / "big.nii.gz")
    out = {}
    for version, tree in trees.items():
        args = [str(tree / "benchmarks" / "inference.py"), "--child", "medseg", "--model", str(model),
                "--inputs", str(tmp / "memory_in"), "--out", str(tmp / f"memory_out_{version}"), "--device", "cpu"]
        out[version] = json.loads(_run(args, tree).strip().splitlines()[-1])
    if "baseline" in out:
        out["ratio_current_to_baseline"] = round(out["current"]["peak_rss_mb"] / out["baseline"]["peak_rss_mb"], 3)
    return {"shape": [512, 512, 600], **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=BASELINE, help="git ref measured beside the working tree ('' for none)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--shape", nargs=3, type=int, default=[512, 512, 300])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="pipeline")
    parser.add_argument("--memory", action="store_true", help="also the peak RSS of a 512 x 512 x 600 case")
    parser.add_argument("--memory-only", action="store_true", help="only that, kept beside the last results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--first-window", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.first_window:
        first_window(json.loads(args.first_window))
        return

    from _common import save

    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="medseg-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        shape = tuple(args.shape)
        cts = {"model_grid": write_ct(tmp / "ct_model_grid.nii.gz", shape, MODEL_SPACING),
               "resampled": write_ct(tmp / "ct_resampled.nii.gz", shape, SCANNER_SPACING)}
        small = write_ct(tmp / "ct_small.nii.gz", (128, 128, 64), MODEL_SPACING)
        models = {name: make_model(tmp / f"model_{name}", name) for name in args.networks}
        startup_models = {"torch": models.get("tiny") or make_model(tmp / "model_tiny", "tiny")}
        from medseg.deploy.export import export_model

        startup_models["onnx"] = export_model(startup_models["torch"], "onnx", tmp / "model_onnx")
        trees = {"current": REPO}
        if args.baseline:
            baseline = tmp / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                           check=True, capture_output=True)
            trees["baseline"] = baseline
        if args.memory_only:
            try:
                result = json.loads((Path(__file__).parent / "results" / f"{args.name}.json").read_text())
                result.pop("machine", None)
                result["memory"] = memory(trees, tmp)
            finally:
                _remove_worktree(trees)
            save(args.name, result)
            return
        scenarios = [{"name": f"{net}/{inp}/qc_{'on' if qc else 'off'}", "model": str(models[net]), "ct": str(cts[inp]),
                      "qc": qc} for net in args.networks for inp in cts for qc in (True, False)]
        results: dict = {}
        try:
            for version, tree in trees.items():
                job = {"scenarios": scenarios, "threads": args.threads, "device": args.device, "tmp": str(tmp)}
                print(f"{version}: timing {len(scenarios)} cases", file=sys.stderr, flush=True)
                results[version] = {
                    "cases": json.loads(_run([str(script), "--worker", json.dumps(job)], tree).splitlines()[-1]),
                    "startup": startup(tree, startup_models, small),
                }
            if args.memory:
                results["memory"] = memory(trees, tmp)
        finally:
            _remove_worktree(trees)
    summary: dict = {}
    if "baseline" in results:
        for name, now in results["current"]["cases"].items():
            if name == "medseg":
                continue
            before = results["baseline"]["cases"][name]
            overhead_now = now["seconds"]["total"] - now["seconds"]["network"]
            overhead_before = before["seconds"]["total"] - before["seconds"]["network"]
            summary[name] = {"speedup_end_to_end": round(before["seconds"]["total"] / now["seconds"]["total"], 2),
                             "overhead_cut": round(overhead_before / overhead_now, 2),
                             "ratio_to_peer": [before["ratio_to_peer"], now["ratio_to_peer"]],
                             "non_network_share": [before["non_network_share"], now["non_network_share"]]}
        for key in ("import_ratio_to_torch", "first_window_torch_s", "first_window_onnx_s"):
            summary[key] = [results["baseline"]["startup"][key], results["current"]["startup"][key]]
    save(args.name, {
        "setup": {"shape": list(args.shape), "model_spacing": list(MODEL_SPACING), "scanner_spacing": list(SCANNER_SPACING),
                  "networks": {n: NETWORKS[n] for n in args.networks}, "threads": args.threads, "device": args.device,
                  "baseline": args.baseline, "overlap": 0.5, "tta": False, "sw_batch_size": 2,
                  "pairs_in_summary": "[baseline, current]"},
        "summary": summary, **results,
    })


if __name__ == "__main__":
    main()
