"""Inference speed and memory against MONAI, all on the same weights, volumes and settings in one run.

    .venv/bin/python benchmarks/inference.py [--parts abc] [--skip-memory] [--cases 4] [--rounds 5]

(a) Sliding window alone: medseg's ``sliding_window`` (slab-wise accumulator) with the network as medseg's
    predictor runs it vs ``monai.inferers.sliding_window_inference`` with the plain network, on one
    1 x 192 x 192 x 96 input, Gaussian blending, overlap 0.5, sw_batch_size 2: throughput ratio (MONAI time /
    medseg time; target >= 1.0) and max |logit difference| (target <= 1e-4). Also medseg's sliding window with
    the plain network ("algorithm only"), which separates the stitching from the network's CPU layout.
(b) Folder throughput in cases/min (load -> predict -> post-process -> write .nii.gz): ``medseg`` folder runner
    vs a minimal MONAI pipeline (LoadImage + ScaleIntensityRange + sliding_window_inference + argmax +
    SaveImage), over ``--cases`` CT-like int16 volumes of 256 x 256 x 96, in ``--rounds`` back-to-back pairs
    of fresh processes: median ratio over the pairs, every pair reported. Target ratio >= 1.5.
(c) Peak RSS (``VmHWM`` of a fresh process) predicting one 512 x 512 x 600 CT-like int16 volume with a
    3-class model: medseg vs the same minimal MONAI pipeline. Targets: <= 0.5 x MONAI and <= 2.5 GB.

The model is a medseg model folder with a seeded random-initialised 3D UNet (channels 8-16-32-64, 3 classes,
patch 96 x 96 x 64) at the volumes' own spacing, CT window normalisation: the network's speed, not its
accuracy, is what is measured. On a CUDA machine (a) and (b) also run on the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

SPACING = (0.8, 0.8, 1.5)
PATCH = (96, 96, 64)
WINDOW = (-160.0, 240.0)


def make_model_dir(folder: Path, overlap: float = 0.5, *, spacing=SPACING, patch=PATCH, channels=(8, 16, 32, 64),
                   strides=(2, 2, 2), overrides: tuple[str, ...] = (), prepare=None) -> Path:
    """A medseg model folder with seeded random weights (no training; ``prepare(net)`` may change them first)."""
    from medseg.config import load_config
    from medseg.models.folder import save_model_dir
    from medseg.models.registry import build_model
    from medseg.plan.planner import Plan

    cfg = load_config("smoke", [
        f"data.spacing={list(spacing)}", f"data.patch_size={list(patch)}", f"model.channels={list(channels)}",
        f"model.strides={list(strides)}", "model.num_res_units=1", f"inference.overlap={overlap}", "inference.sw_batch_size=2",
        f"data.intensity.window={list(WINDOW)}", *overrides,
    ])
    plan = Plan(dims=3, spacing=list(spacing), patch_size=list(patch), batch_size=2, channels=list(channels),
                strides=list(strides), normalization=["window"], intensity=[{}], anisotropic=False,
                fingerprint_hash="benchmark")
    torch.manual_seed(0)
    net = build_model(cfg.model, 3, 1, 3)
    if prepare is not None:
        prepare(net)
    info = {"labels": {0: "background", 1: "organ", 2: "lesion"}, "spatial_dims": 3, "in_channels": 1}
    return save_model_dir(folder, net, cfg, plan, info)


def ct_volume(shape: tuple[int, int, int], seed: int):
    """int16 CT-like volume at SPACING: body ellipse, an organ, noise."""
    from medseg.io.volume import Volume

    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    organ = ((x - 0.3) / 0.25) ** 2 + ((y + 0.1) / 0.2) ** 2 < 1
    plane = np.where(body, 40, -1000) + organ * 60
    array = np.empty((1, *shape), np.int16)
    for k in range(shape[2]):
        array[0, :, :, k] = plane + rng.normal(0, 12, plane.shape) * body
    return Volume(array, np.diag([*SPACING, 1.0]))


# ------------------------------------------------------------------------------------------------ (a)


def bench_window(model_dir: Path, device: str, repeats: int = 16) -> dict:
    """MONAI's ``sliding_window_inference`` with the plain network against medseg's sliding window with the
    network as medseg's predictor runs it (on CPU: channels-last layout and layout-preserving instance norm),
    and, to separate the two, medseg's sliding window with the plain network ("algorithm only")."""
    from monai.inferers import sliding_window_inference

    from medseg.inference.predictor import Predictor, _window_source
    from medseg.inference.sliding_window import WindowLayout, sliding_window
    from medseg.models.folder import load_model_dir

    net, _, _, _ = load_model_dir(model_dir, device)
    shipped = Predictor.from_model_dir(model_dir, device, tta=False)._network(normalised=True)
    dev = torch.device(device)
    shape = (192, 192, 96)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    layout = WindowLayout(shape, PATCH, 0.5)

    def monai() -> torch.Tensor:
        return sliding_window_inference(x, PATCH, 2, net, overlap=0.5, mode="gaussian")[0]

    def medseg_with(network) -> torch.Tensor:
        source = _window_source(x[0], layout, 0.0)
        out = torch.empty((3, *shape), device=dev)  # the full logits, as MONAI returns them
        for z0, z1, values in sliding_window(source, layout, network, 3, sw_batch_size=2, device=dev):
            out[..., z0:z1] = values
        return out

    runs = {"monai": monai, "medseg": lambda: medseg_with(shipped), "medseg_plain_network": lambda: medseg_with(net)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        ref = monai()
        diffs = {name: float((ref - fn()).abs().max()) for name, fn in runs.items() if name != "monai"}  # + warm-up
        order = list(runs)
        for i in range(repeats):  # interleaved, rotating who goes first: drift in machine load hits all
            for name in order[i % 3:] + order[: i % 3]:
                start = time.perf_counter()
                runs[name]()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)

    def paired(name: str) -> list[float]:  # each round ran back to back: robust to load drift
        return [a / b for a, b in zip(times["monai"], times[name])]

    return {"device": device, "shape": list(shape), "windows": len(layout.windows()), "repeats": repeats,
            **{f"{name}_s": float(np.median(t)) for name, t in times.items()},
            **{f"{name}_s_all": [round(v, 3) for v in t] for name, t in times.items()},
            "throughput_ratio": float(np.median(paired("medseg"))),
            "paired_ratio_q1_q3": [float(np.percentile(paired("medseg"), q)) for q in (25, 75)],
            "max_abs_logit_diff": diffs["medseg"],
            "algorithm_only_ratio": float(np.median(paired("medseg_plain_network"))),
            "algorithm_only_max_abs_logit_diff": diffs["medseg_plain_network"],
            "target_ratio_min": 1.0, "target_diff_max": 1e-4}


# ------------------------------------------------------------------------------------------------ (b), (c)


def run_medseg(model_dir: Path, inputs: Path, out: Path, device: str) -> None:
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import RunOptions, predict_folder

    predictor = Predictor.from_model_dir(model_dir, device)
    results = predict_folder(predictor, inputs, out, options=RunOptions(progress=False, overwrite=True))
    assert all(r.status == "ok" for r in results), [r.error for r in results]


def run_monai(model_dir: Path, inputs: Path, out: Path, device: str) -> None:
    from monai.inferers import sliding_window_inference
    from monai.transforms import LoadImage, SaveImage, ScaleIntensityRange

    from medseg.models.folder import load_model_dir

    net, _, _, _ = load_model_dir(model_dir, device)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    scale = ScaleIntensityRange(a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True)
    saver = SaveImage(output_dir=str(out), output_postfix="seg", separate_folder=False, output_dtype=np.uint8,
                      resample=False, print_log=False)
    with torch.inference_mode():
        for path in sorted(inputs.glob("*.nii.gz")):
            image = scale(load(path))
            logits = sliding_window_inference(image[None].to(device), PATCH, 2, net, overlap=0.5, mode="gaussian")
            labels = logits.argmax(1).to(torch.uint8).cpu()
            del logits
            saver(labels, meta_data=image.meta)


def peak_rss_mb() -> float:
    """This process's peak resident set size: ``VmHWM`` (reset at exec, so the parent's memory is not counted),
    else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """One pipeline in this (fresh) process; prints its time (after imports: throughput over a folder does not
    pay start-up per case) and peak RSS as JSON."""
    import monai.inferers
    import monai.transforms  # noqa: F401

    import medseg.inference.runner  # noqa: F401

    baseline = peak_rss_mb()
    start = time.perf_counter()
    (run_medseg if args.child == "medseg" else run_monai)(Path(args.model), Path(args.inputs), Path(args.out), args.device)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_work_mb": baseline}))


def in_child(which: str, model_dir: Path, inputs: Path, out: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model", str(model_dir), "--inputs", str(inputs),
           "--out", str(out), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_folder(model_dir: Path, tmp: Path, cases: int, device: str, rounds: int = 5) -> dict:
    """``rounds`` back-to-back pairs of runs (who goes first alternates); the ratio is the median over pairs."""
    from medseg.io.nifti import write_nifti

    inputs = tmp / "folder_in"
    for i in range(cases):
        write_nifti(ct_volume((256, 256, 96), seed=i), inputs / f"case_{i:03d}.nii.gz")
    in_child("medseg", model_dir, inputs, tmp / "warm", device)  # warm the page cache and torch kernels
    rates: dict[str, list[float]] = {"medseg": [], "monai": []}
    for r in range(rounds):
        for which in (("medseg", "monai") if r % 2 == 0 else ("monai", "medseg")):
            seconds = in_child(which, model_dir, inputs, tmp / f"out_{which}", device)["seconds"]
            rates[which].append(cases / (seconds / 60))
    paired = [a / b for a, b in zip(rates["medseg"], rates["monai"])]
    return {"device": device, "cases": cases, "shape": [256, 256, 96], "rounds": rounds,
            "medseg_cases_per_min": float(np.median(rates["medseg"])), "monai_cases_per_min": float(np.median(rates["monai"])),
            "medseg_cases_per_min_all": [round(v, 2) for v in rates["medseg"]],
            "monai_cases_per_min_all": [round(v, 2) for v in rates["monai"]],
            "ratio": float(np.median(paired)), "ratio_all": [round(v, 3) for v in paired], "target_ratio_min": 1.5}


def bench_memory(model_dir: Path, tmp: Path) -> dict:
    from medseg.io.nifti import write_nifti

    inputs = tmp / "big_in"
    write_nifti(ct_volume((512, 512, 600), seed=0), inputs / "big.nii.gz")
    med = in_child("medseg", model_dir, inputs, tmp / "big_medseg", "cpu")
    mon = in_child("monai", model_dir, inputs, tmp / "big_monai", "cpu")
    return {"shape": [512, 512, 600], "classes": 3, "medseg": med, "monai": mon,
            "ratio": med["peak_rss_mb"] / mon["peak_rss_mb"], "target_ratio_max": 0.5, "target_medseg_gb_max": 2.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="(b): pairs of medseg/MONAI folder runs")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--parts", default="abc", help="which of a, b, c to run; the others are kept from the last results")
    parser.add_argument("--child", choices=["medseg", "monai"])
    parser.add_argument("--model")
    parser.add_argument("--inputs")
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    name = "inference" if not torch.cuda.is_available() else "inference_gpu"
    previous = Path(__file__).parent / "results" / f"{name}.json"
    result: dict = json.loads(previous.read_text()) if previous.is_file() and args.parts != "abc" else {}
    result.pop("machine", None)
    result["settings"] = {"patch": list(PATCH), "overlap": 0.5, "sw_batch_size": 2, "spacing": list(SPACING)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = make_model_dir(tmp / "model")
        if "a" in args.parts:
            result["a_sliding_window"] = [bench_window(model_dir, d) for d in devices]
        if "b" in args.parts:
            result["b_folder"] = [bench_folder(model_dir, tmp, args.cases, d, args.rounds) for d in devices]
        if "c" in args.parts and not args.skip_memory:
            result["c_memory"] = bench_memory(model_dir, tmp)
    if not torch.cuda.is_available():
        result["gpu"] = "no CUDA GPU on this machine"
    save(name, result)


if __name__ == "__main__":
    main()
