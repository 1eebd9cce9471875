"""Sliding window against MONAI, streaming vs full preprocessing, TTA and ensembles averaging, 2D models on 3D
volumes, post-processing and the CUDA out-of-memory fallback."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import PostprocessConfig
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import Member, Predictor, with_cpu_fallback
from medseg.inference.sliding_window import WindowLayout, sliding_window
from medseg.io.volume import Volume
from medseg.models.folder import load_model_dir


@pytest.mark.parametrize("shape, roi, overlap", [((40, 37, 29), (24, 24, 16), 0.5), ((20, 50, 70), (24, 24, 16), 0.25),
                                                 ((16, 12, 10), (24, 24, 16), 0.5), ((33, 47), (16, 16), 0.5)])
def test_sliding_window_matches_monai(shape, roi, overlap):
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(len(shape), 1, 3, (8, 16), (2,), num_res_units=1).eval()
    x = torch.randn(1, 1, *shape)
    layout = WindowLayout(shape, roi, overlap)
    padded = torch.nn.functional.pad(x, [p for pair in reversed(layout.pad) for p in pair])[0]
    with torch.no_grad():
        ref = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode="gaussian")[0]
        parts = [(z0, z1, v.clone()) for z0, z1, v in sliding_window(lambda s: padded[(slice(None), *s)], layout, net, 3, sw_batch_size=3)]
    assert [p[0] for p in parts] == sorted(p[0] for p in parts) and parts[-1][1] == shape[-1]
    ours = torch.cat([v for _, _, v in parts], dim=-1)
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-5


def test_gaussian_sigma_reaches_the_blend_as_monais_sigma_scale():
    """``inference.gaussian_sigma`` is MONAI's ``sigma_scale``: a wider Gaussian blends as MONAI's does."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    shape, roi = (40, 37, 29), (24, 24, 16)
    net = UNet(3, 1, 3, (8, 16), (2,), num_res_units=1).eval()
    x = torch.randn(1, 1, *shape)
    layout = WindowLayout(shape, roi, 0.5)
    padded = torch.nn.functional.pad(x, [p for pair in reversed(layout.pad) for p in pair])[0]
    with torch.no_grad():
        ref = sliding_window_inference(x, roi, 3, net, overlap=0.5, mode="gaussian", sigma_scale=0.3)[0]
        ours = torch.cat([v.clone() for _, _, v in sliding_window(lambda s: padded[(slice(None), *s)], layout, net,
                                                                   3, sigma_scale=0.3)], dim=-1)
        default = torch.cat([v.clone() for _, _, v in sliding_window(lambda s: padded[(slice(None), *s)], layout,
                                                                      net, 3)], dim=-1)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (default - ref).abs().max().item() > 1e-3  # the sigma made a difference the check above could see


def test_accumulator_is_one_window_deep():
    """Slabs are handed out while later windows are still running: the accumulator never spans the volume."""
    layout = WindowLayout((8, 8, 100), (8, 8, 10), 0.5)
    seen = []

    def net(batch):
        seen.append(len(emitted))
        return torch.ones(batch.shape[0], 2, *batch.shape[2:])

    emitted = []
    for z0, z1, values in sliding_window(lambda s: torch.zeros(1, 8, 8, 10), layout, net, 2):
        emitted.append((z0, z1))
        assert values.shape[-1] <= 10
    assert emitted[0][0] == 0 and emitted[-1][1] == 100
    assert seen[-1] >= len(emitted) - 2  # most slabs were emitted before the last network call


def _fake_member(smoke_model: Path, fn) -> Member:
    _, cfg, plan, info = load_model_dir(smoke_model, torch.device("cpu"))
    return Member(fn, cfg, plan, info, smoke_model)


def _asymmetric(weight: float):
    """A 'network' that is not flip-equivariant: class logits from cumulative sums along two axes."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        a = torch.cumsum(x, dim=2) * weight
        b = torch.cumsum(x, dim=4) * (1 - weight)
        return torch.cat([a, b, a - b], dim=1)
    return fn


def _patch_volume(member: Member, seed: int = 0) -> Volume:
    shape = tuple(member.cfg.data.patch_size)
    spacing = member.spacing
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(40, 150, (1, *shape)).astype(np.float32), np.diag([*spacing, 1.0]))


def _manual(members_fns, x: torch.Tensor, flips) -> torch.Tensor:
    total = 0
    for fn in members_fns:
        for axes in flips:
            inp = torch.flip(x, axes) if axes else x
            out = torch.softmax(fn(inp), dim=1)
            total = total + (torch.flip(out, axes) if axes else out)
    return total / (len(members_fns) * len(flips))


def _normalised(member: Member, volume: Volume) -> torch.Tensor:
    low, high = member.cfg.data.intensity.window
    return torch.clamp((torch.from_numpy(volume.array) - low) / (high - low), 0, 1)[None]


def test_tta_averages_softmax_over_all_mirrorings(smoke_model: Path):
    member = _fake_member(smoke_model, _asymmetric(0.7))
    volume = _patch_volume(member)  # exactly one window: blending cancels, output = averaged probabilities
    predictor = Predictor([member], torch.device("cpu"), tta=True)
    got = predictor.predict_case(volume, probabilities=True)
    assert got.stats["streamed"]
    flips = [()] + [c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)]
    expected = _manual([member.backend], _normalised(member, volume), flips)[0]
    assert np.abs(got.probabilities.array.astype(np.float32) - expected.numpy()).max() < 2e-3
    no_tta = _manual([member.backend], _normalised(member, volume), [()])[0]
    assert (expected - no_tta).abs().max().item() > 0.05  # the check above could tell TTA from no TTA
    assert np.array_equal(got.labels.array[0], expected.argmax(0).numpy())


def test_tta_axes_limit_the_mirrorings(smoke_model: Path):
    """``inference.tta_axes: [0, 1]`` mirrors X, Y and both (4 passes, not 8); QC counts those 4 as flips."""
    member = _fake_member(smoke_model, _asymmetric(0.7))
    inference = member.cfg.inference.model_copy(update={"tta_axes": [0, 1]})
    member = Member(member.backend, member.cfg.model_copy(update={"inference": inference}), member.plan, member.info,
                    member.model_dir)
    volume = _patch_volume(member)
    predictor = Predictor([member], torch.device("cpu"), tta=True)
    assert predictor.flips() == [(), (2,), (3,), (2, 3)]
    got = predictor.predict_case(volume, probabilities=True)
    expected = _manual([member.backend], _normalised(member, volume), [(), (2,), (3,), (2, 3)])[0]
    assert np.abs(got.probabilities.array.astype(np.float32) - expected.numpy()).max() < 2e-3
    every = _manual([member.backend], _normalised(member, volume),
                    [()] + [c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)])[0]
    assert (expected - every).abs().max().item() > 0.01  # mirroring Z too would have given another answer
    assert predictor._qc_groups().get("tta") == 4


def test_ensemble_averages_member_probabilities(smoke_model: Path):
    a, b = _fake_member(smoke_model, _asymmetric(0.2)), _fake_member(smoke_model, _asymmetric(0.9))
    volume = _patch_volume(a, seed=1)
    got = Predictor([a, b], torch.device("cpu"), tta=False).predict_case(volume, probabilities=True)
    expected = _manual([a.backend, b.backend], _normalised(a, volume), [()])[0]
    assert np.abs(got.probabilities.array.astype(np.float32) - expected.numpy()).max() < 2e-3
    alone = _manual([a.backend], _normalised(a, volume), [()])[0]
    assert (expected - alone).abs().max().item() > 0.05


def test_ensemble_of_real_model_folders(smoke_model: Path, make_volume):
    volume = make_volume(shape=(30, 26, 12))
    single = Predictor.from_model_dir(smoke_model, "cpu").predict_case(volume, probabilities=True)
    double = Predictor.from_model_dir([smoke_model, smoke_model], "cpu").predict_case(volume, probabilities=True)
    assert np.array_equal(single.labels.array, double.labels.array)
    assert np.abs(single.probabilities.array.astype(np.float32) - double.probabilities.array.astype(np.float32)).max() < 1e-3


def test_streaming_and_full_preprocessing_agree(smoke_model: Path):
    predictor = Predictor.from_model_dir(smoke_model, "cpu")
    rng = np.random.default_rng(3)
    spacing = predictor.members[0].spacing
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # flipped x: reoriented as a view
    volume = Volume(rng.normal(40, 150, (1, 30, 22, 14)).astype(np.float32), affine)
    streamed = predictor.predict_case(volume, probabilities=True)
    assert streamed.stats["streamed"]
    predictor.streaming = False
    full = predictor.predict_case(volume, probabilities=True)
    assert not full.stats["streamed"]
    assert np.abs(streamed.probabilities.array.astype(np.float32) - full.probabilities.array.astype(np.float32)).max() < 2e-3
    assert (streamed.labels.array == full.labels.array).mean() > 0.999


def test_2d_model_slice_by_slice_on_a_3d_volume(smoke_model_2d: Path):
    predictor = Predictor.from_model_dir(smoke_model_2d, "cpu")
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (3, 40, 36, 5)).astype(np.uint8)
    affine = np.diag([2.0, -2.0, 3.0, 1.0])
    result = predictor.predict_case(Volume(array, affine))
    assert result.labels.array.shape == (1, 40, 36, 5) and result.stats["slices"] == 5
    # each slice equals the 2D prediction of that slice (RAS reorientation flips y, so predict flipped planes)
    for k in range(5):
        plane = Volume(array[:, :, ::-1, k].copy(), np.diag([2.0, 2.0, 1.0, 1.0]))
        expected = predictor.predict(plane).array[0, :, ::-1]
        assert np.array_equal(result.labels.array[0, :, :, k], expected)


def test_postprocess_removes_small_components_and_keeps_the_largest():
    data = np.zeros((1, 20, 20, 10), np.uint8)
    data[0, 2:8, 2:8, 2:8] = 1  # 216 voxels
    data[0, 15:17, 15:17, 1:3] = 1  # 8 voxels
    data[0, 12:14, 2:4, 5:7] = 2  # 8 voxels of label 2
    data[0, 2:10, 12:18, 1:9] = 2  # big label 2 with a hole
    data[0, 5, 14, 4] = 0
    volume = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))  # 8 mm^3 voxels
    names = {0: "background", 1: "organ", 2: "lesion"}
    cfg = PostprocessConfig(largest_component=["organ"], min_component_mm3=0.0,
                            min_component_mm3_per_label={"lesion": 100.0}, fill_holes=["lesion"])
    cleaned, counts = postprocess(volume, cfg, names)
    out = cleaned.array[0]
    assert (out == 1).sum() == 216 and (out[15:17, 15:17, 1:3] == 0).all()
    assert (out[12:14, 2:4, 5:7] == 0).all() and out[5, 14, 4] == 2
    assert counts == {"removed_components": 2, "removed_voxels": 16, "filled_voxels": 1}


def test_postprocess_unknown_label_name_is_a_config_error():
    from medseg.errors import ConfigError

    volume = Volume(np.zeros((1, 4, 4, 4), np.uint8), np.eye(4))
    cfg = PostprocessConfig(largest_component=["liver"], min_component_mm3=0, min_component_mm3_per_label={}, fill_holes=[])
    with pytest.raises(ConfigError) as info:
        postprocess(volume, cfg, {0: "background", 1: "organ"})
    assert info.value.code == "CONFIG_INVALID_VALUE" and "liver" in info.value.message


def test_cuda_oom_falls_back_to_cpu_stitching_and_only_for_that_error():
    calls = []

    def attempt(device):
        calls.append(device.type)
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    assert with_cpu_fallback(attempt, torch.device("cuda")) == ("done", torch.device("cpu"))
    assert calls == ["cuda", "cpu"]

    def broken(device):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError):
        with_cpu_fallback(broken, torch.device("cuda"))
