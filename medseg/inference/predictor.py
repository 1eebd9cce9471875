"""Prediction of one volume with one model or an ensemble, returned on the input's exact grid.

Memory model (3D CT-like input of N voxels, K classes, C channels, window ``w`` deep along the last axis, and
``d = w + step`` the accumulator depth):

* the input as stored (e.g. int16: 2N bytes), reoriented to RAS as a numpy view (no copy);
* when the model spacing equals the input spacing and normalisation is voxel-wise (CT clip + z-score, window,
  RGB scaling; no CLAHE), nothing else of the image's size: windows are cut from two float32 slabs of
  ``C x X x Y x w`` (the image's cross-section over one window depth, normalised). Otherwise one float32 copy
  on the model grid (MONAI preprocessing, as in training);
* the sliding-window accumulator: ``(K + 1) x X x Y x d`` values (float32; float16 for probabilities on CUDA);
* the label map on the model grid (1 byte per voxel); on the input grid a view of it when the model grid is the
  input reoriented, else another byte per voxel (mapped back by nearest neighbour through per-axis index arrays).

So a 512 x 512 x 600 int16 CT at the model's spacing, with 3 classes and 96 x 96 x 64 windows at overlap 0.5
(d = 96), needs about 315 MB + 134 MB + 403 MB + 157 MB, plus the network and the process. No float map per class of the whole
volume ever exists (``--save-probabilities`` adds one float16 map on request). See ``benchmarks/inference.py``
for measured peaks.

Averaging: TTA (mirroring over every subset of spatial axes) and ensembles average softmax probabilities,
window by window, before Gaussian blending. A single model without TTA blends logits (as MONAI and nnU-Net do);
its probabilities are the softmax of the blended logits.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import threads
from medseg.config import Config, planned
from medseg.device import select_device
from medseg.errors import InputError, ModelError
from medseg.inference.backends import Backend, load_backend
from medseg.inference.grid import axis_map, map_back
from medseg.inference.postprocess import postprocess
from medseg.inference.sliding_window import WindowLayout, argmax_labels, sliding_window
from medseg.io.nifti import float32_tensor as _as_float32
from medseg.io.nifti import stored_tensor
from medseg.io.orientation import ras_order, to_ras
from medseg.io.volume import Volume
from medseg.models.folder import ModelFolder
from medseg.plan.planner import Plan
from medseg.qc.signals import QcAccumulator
from medseg.transforms.identity import IMAGE, preprocessing_identity
from medseg.transforms.pointwise import Normalizer, pointwise_normalizer

log = logging.getLogger(__name__)
WindowCallback = Callable[[int, int], None]


@dataclass
class Member:
    """One model of an ensemble."""

    backend: Backend
    cfg: Config
    plan: Plan
    info: dict
    model_dir: Path
    network: torch.nn.Module | None = None  # the PyTorch network where there is one (explanations need it)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in (self.cfg.data.spacing or self.plan.spacing))

    @property
    def schemes(self) -> list[str]:
        scheme = self.cfg.data.intensity.scheme
        return [scheme] * int(self.info["in_channels"]) if scheme else list(self.plan.normalization)


@dataclass
class Prediction:
    """A label map on the input grid, optional probabilities (float16, same grid) and how it was made."""

    labels: Volume
    probabilities: Volume | None = None
    stats: dict = field(default_factory=dict)
    qc: dict | None = None  # medseg.qc.assess.assess: verdict, score, reasons, signals
    uncertainty: Volume | None = None  # normalised entropy, uint8 0..255 standing for 0..1, on the input grid
    saliency: Volume | None = None  # Grad-CAM per foreground label (medseg.inference.explain), float32 0..1, input grid


class Predictor:
    """Applies one model folder, or several (an ensemble, e.g. cross-validation folds), to volumes.

    Args:
        members: Loaded models; they must agree on dimensions, channels, labels, patch size and spacing.
        device: Where the networks run.
        tta: Mirror test-time augmentation (default: the first model's ``inference.tta``).
        overlap: Window overlap (default: the model's ``inference.overlap``).
        sw_batch_size: Windows per network call (default: the model's).
    """

    def __init__(self, members: list[Member], device: torch.device, tta: bool | None = None,
                 overlap: float | None = None, sw_batch_size: int | None = None, nnunet_fast: bool = False,
                 combine: bool = False) -> None:
        if not members:
            raise ModelError("MODEL_DIR_INVALID", "no model given")
        first = members[0]
        #: the nnU-Net description of a model from an nnU-Net results folder (predicted nnU-Net's way), else None
        self.nnunet: dict | None = first.info.get("nnunet")
        self.nnunet_fast = nnunet_fast
        #: per model combined by label (``combine``): what its own label values are shifted by, else None
        self.offsets: list[int] | None = None
        combined: dict[int, str] | None = None
        if combine:
            combined = self._combine(members)
        elif any(m.info.get("nnunet") for m in members) and len(members) > 1:
            raise ModelError("ENSEMBLE_INCOMPATIBLE", "nnU-Net models are not ensembled with other models here",
                             "pass one nnU-Net results folder (its folds are ensembled by --folds), or --combine "
                             "for models with disjoint labels")
        for other in members[1:] if not combine else []:
            for what, get in (("spatial dims", lambda m: m.info["spatial_dims"]), ("input channels", lambda m: m.info["in_channels"]),
                              ("labels", lambda m: m.info["labels"]), ("patch size", lambda m: tuple(m.cfg.data.patch_size)),
                              ("spacing", lambda m: m.spacing)):
                if get(other) != get(first):
                    raise ModelError("ENSEMBLE_INCOMPATIBLE", f"{other.model_dir} differs from {first.model_dir} in {what}",
                                     "ensemble models trained with the same plan (e.g. the folds of one cross-validation)")
        self.members, self.device = members, device
        self.cfg, self.plan, self.info = first.cfg, first.plan, first.info
        self.labels: dict[int, str] = first.info["labels"]
        if combined is not None:
            self.labels, self.info = combined, {**first.info, "labels": combined}
        inference = first.cfg.inference
        self.tta = inference.tta if tta is None else tta
        self.overlap = inference.overlap if overlap is None else overlap
        self.sw_batch_size = sw_batch_size or inference.sw_batch_size
        self.spatial_dims = int(first.info["spatial_dims"])
        pointwise = [None] if self.nnunet else [
            pointwise_normalizer(m.cfg.data.intensity, m.plan.normalization, m.plan.intensity, int(m.info["in_channels"]))
            for m in members]
        self.streaming = all(not m.cfg.data.clahe.enabled for m in members) and all(f is not None for f in pointwise)
        # voxel-wise normalisations (the functions training's transforms wrap) applied to slabs of the stored image
        self._normalize: list[Normalizer] = [f for f in pointwise if f is not None] if self.streaming else []
        identities = [{"nnunet": self.nnunet}] if self.nnunet else [preprocessing_identity(m.cfg, m.plan) for m in members]
        self._shared_normalisation = all(x == identities[0] for x in identities)
        self._preprocess_transforms: Any = None
        self._explainer: Any = None

    def _combine(self, members: list[Member]) -> dict[int, str]:
        """Checks models to combine by label (nnU-Net models with disjoint label names, same channels) and returns
        the combined labels: background, then each model's foreground labels in order.

        Raises:
            ModelError: ``COMBINE_INVALID`` (not nnU-Net models, one model, other channels, a label name in two).
        """
        if len(members) < 2 or not all(m.info.get("nnunet") for m in members):
            raise ModelError("COMBINE_INVALID", "--combine merges two or more nnU-Net models with disjoint labels",
                             "give each part with -m (nnU-Net results folders or folders from medseg import-nnunet)")
        channels = {int(m.info["in_channels"]) for m in members}
        if len(channels) > 1:
            raise ModelError("COMBINE_INVALID", f"the models to combine read different numbers of channels: {sorted(channels)}")
        labels: dict[int, str] = {0: "background"}
        self.offsets = []
        seen: dict[str, str] = {}
        for m in members:
            self.offsets.append(len(labels) - 1)
            for value, name in sorted(m.info["labels"].items()):
                if value == 0:
                    continue
                if name.casefold() in seen:
                    raise ModelError("COMBINE_INVALID", f"label {name!r} is in {seen[name.casefold()]} and in "
                                     f"{m.model_dir.resolve().name}: combined models must not share label names",
                                     "combine models with disjoint label sets; ensemble the folds of one model instead")
                seen[name.casefold()] = m.model_dir.resolve().name
                labels[len(labels)] = name
        return labels

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | Sequence[str | Path], device: str = "auto", backend: str = "auto",
                       *, tta: bool | None = None, fast: bool = False, overlap: float | None = None,
                       folds: Sequence[str] | None = None, checkpoint: str = "final", combine: bool = False) -> Predictor:
        """Loads one model folder or several (an ensemble) onto ``device`` (``auto|cpu|cuda|mps``) with ``backend``
        (``auto|torch|onnxruntime|openvino|tensorrt|tensorrt-fp32|litert``). ``fast`` uses ``inference.fast_overlap`` and no TTA.

        An nnU-Net v2 results folder is read directly (:mod:`medseg.models.nnunet`; ``folds`` and ``checkpoint``
        pick what it loads) and predicts nnU-Net's way (:mod:`medseg.inference.nnunet_exact`; ``fast``: its fast mode).
        ``combine`` merges nnU-Net models with disjoint labels into one label map (a voxel takes the most probable
        label the models predict there) instead of averaging them as an ensemble."""
        from medseg.models.nnunet import is_results_folder, read_results_folder, records

        dev = select_device(device)
        dirs = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
        if (folds or checkpoint != "final") and not any(is_results_folder(d) for d in dirs):
            raise ModelError("CONFIG_INVALID_VALUE", "--folds and --checkpoint choose what an nnU-Net results folder "
                             "loads; these models are medseg model folders", "give each fold's model folder with -m")
        members = []
        for d in dirs:
            if is_results_folder(d):
                model = read_results_folder(d, list(folds) if folds else None, checkpoint)
                cfg, plan, info = records(model)
                fold_net = model.network().to(dev)
                members.append(Member(load_backend(Path(d), backend, dev, fold_net, {"format": "pytorch", **info},
                                                   threads.current(), 1), cfg, plan, info, Path(d), fold_net))
                continue
            folder = ModelFolder.read(d)
            net = folder.load_network(dev)
            members.append(Member(load_backend(folder.path, backend, dev, net, folder.info, threads.current(),
                                               folder.config.inference.sw_batch_size),
                                  folder.config, folder.plan, folder.info, folder.path, net))
        if members[0].info.get("nnunet"):
            return cls(members, dev, tta=False if fast and tta is None else tta, overlap=overlap, nnunet_fast=fast,
                       combine=combine)
        if combine:
            raise ModelError("COMBINE_INVALID", "--combine merges nnU-Net models with disjoint labels",
                             "ensemble medseg models without --combine")
        if fast:
            tta, overlap = False, members[0].cfg.inference.fast_overlap if overlap is None else overlap
        return cls(members, dev, tta=tta, overlap=overlap)

    @classmethod
    def for_network(cls, net: torch.nn.Module, cfg: Config, plan: Plan, info: dict, device: torch.device) -> Predictor:
        """A predictor over a network in memory, for validation during training: the window layout, blending,
        TTA and stitching of ``medseg predict``, so what is validated is what is shipped. The network keeps its
        layout (no channels-last conversion: training goes on with it)."""
        from medseg.models.contract import final_output

        def backend(x: torch.Tensor) -> torch.Tensor:
            return final_output(net(x.to(device)))

        return cls([Member(backend, cfg, plan, info, Path("training"), net)], device)

    # ------------------------------------------------------------------------------------------- public

    @torch.inference_mode()
    def predict_preprocessed(self, image: torch.Tensor) -> np.ndarray:
        """Labels on the model grid of an image already preprocessed as in training (``(C, *spatial)`` float32,
        resampled and normalised): the sliding window of :meth:`predict_case` without the grid mapping."""
        layout = WindowLayout(tuple(int(s) for s in image.shape[1:]), tuple(planned(self.cfg.data.patch_size, "data.patch_size")), self.overlap)
        network = self._network(normalised=True)
        (labels, _, _), _ = with_cpu_fallback(
            lambda target: self._stitch(image, layout, network, target, False, None, True, None), self.device
        )
        return labels

    @torch.inference_mode()
    def logits_preprocessed(self, image: torch.Tensor) -> torch.Tensor:
        """Blended logits ``(K, *spatial)`` (float32, CPU) of one model without TTA over a preprocessed image, as
        :meth:`predict_preprocessed` blends them: what the temperature is fitted on."""
        if not self._blends_logits:
            raise ModelError("MODEL_DIR_INVALID", "logits are blended only by one model without TTA")
        layout = WindowLayout(tuple(int(s) for s in image.shape[1:]), tuple(planned(self.cfg.data.patch_size, "data.patch_size")), self.overlap)
        out = torch.empty((len(self.labels), *layout.shape), dtype=torch.float32)
        source = _window_source(image, layout, 0.0)
        for z0, z1, values in sliding_window(source, layout, self._network(True), len(self.labels),
                                              sw_batch_size=self.sw_batch_size, mode=self.cfg.inference.blend,
                                              sigma_scale=self.cfg.inference.gaussian_sigma, device=self.device, accumulate=torch.device("cpu"), dtype=torch.float32):
            out[..., z0:z1] = values.float().cpu()
        return out

    def model_input(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
        """The network's input for a whole volume: ``(C, *model grid)`` float32, reoriented, resampled and
        normalised as :meth:`predict_case` feeds its windows, with the model grid's 4x4 affine."""
        image, model_affine, normalised = self._model_grid(volume)
        tensor = _as_float32(image).cpu()  # the model grid may have been made on the GPU
        return (tensor if normalised else self._normalize[0](tensor)), model_affine

    def explainer(self) -> Any:
        """The Grad-CAM explainer of the (first) model, made once (``medseg predict --explain``;
        :class:`medseg.inference.explain.Explainer`).

        Raises:
            ModelError: ``MODEL_DIR_INVALID`` for an exported model (no gradients).
        """
        if self._explainer is None:
            from medseg.inference.explain import Explainer

            self._explainer = Explainer.for_predictor(self)
        return self._explainer

    def predict(self, volume: Volume, on_window: WindowCallback | None = None) -> Volume:
        """Segments one volume; returns the label map ``(1, X, Y[, Z])`` (uint8, or uint16 for >255 labels) on the
        input's grid (same shape and affine).

        Raises:
            InputError: ``CHANNELS_MISMATCH`` / ``SHAPE_INVALID`` when the input does not fit the model.
        """
        return self.predict_case(volume, on_window=on_window).labels

    @torch.inference_mode()
    def predict_case(self, volume: Volume, probabilities: bool = False, on_window: WindowCallback | None = None,
                     qc: bool | None = None, uncertainty: bool = False) -> Prediction:
        """Like :meth:`predict`, optionally with float16 class probabilities on the input grid, and run facts.

        Args:
            qc: Compute the QC verdict (:mod:`medseg.qc`; default ``inference.qc.enabled``).
            uncertainty: Also return the voxel uncertainty map (normalised entropy) on the input grid.
        """
        qc = self.cfg.inference.qc.enabled if qc is None else qc
        expected = int(self.info["in_channels"])
        if volume.array.shape[0] != expected:
            raise InputError("CHANNELS_MISMATCH", f"model expects {expected} channel(s), image has {volume.array.shape[0]}")
        dims = len(volume.spatial_shape)
        start = time.perf_counter()
        stats: dict = {"tta": self.tta, "overlap": self.overlap, "models": len(self.members)}
        acc = QcAccumulator(len(self.labels), self._qc_groups()) if (qc or uncertainty) else None
        if self.nnunet is not None:
            labels, probs, entropy = self._predict_nnunet(volume, probabilities, on_window, stats, acc, uncertainty)
        elif dims == self.spatial_dims:
            labels, probs, entropy = self._predict_grid(volume, probabilities, on_window, stats, acc, uncertainty)
        elif dims == 3 and self.spatial_dims == 2:
            labels, probs, entropy = self._predict_slices(volume, probabilities, on_window, stats, acc, uncertainty)
        else:
            raise InputError("SHAPE_INVALID", f"model is {self.spatial_dims}D, image is {dims}D {volume.spatial_shape}")
        label_volume = volume.with_array(labels[None], kind="label")
        if self._postprocesses:
            label_volume, stats["postprocess"] = postprocess(label_volume, self.cfg.inference.postprocess, self.labels)
        verdict = self._assess(volume, label_volume, acc) if qc and acc is not None else None
        stats["seconds"] = round(time.perf_counter() - start, 3)
        prob_volume = volume.with_array(probs, kind="probabilities") if probs is not None else None
        entropy_volume = volume.with_array(entropy[None], kind="uncertainty") if entropy is not None else None
        return Prediction(label_volume, prob_volume, stats, verdict, entropy_volume)

    # ------------------------------------------------------------------------------------------- QC

    @property
    def _postprocesses(self) -> bool:
        pp = self.cfg.inference.postprocess
        return bool(pp.largest_component or pp.min_component_mm3 > 0 or pp.min_component_mm3_per_label or pp.fill_holes)

    def _qc_groups(self) -> dict[str, int]:
        """Agreement units: members of an ensemble, flips of TTA (each a group of its own); none for nnU-Net models
        (their folds and mirrors are averaged as logits inside nnU-Net's sliding window)."""
        if not self.cfg.inference.qc.agreement or self.nnunet:
            return {}
        groups = {}
        if len(self.members) > 1:
            groups["ensemble"] = len(self.members)
        if self.tta:
            groups["tta"] = len(self.flips())
        return groups

    def flips(self) -> list[tuple[int, ...]]:
        """Tensor axes each TTA pass mirrors: ``()`` (no mirror) first, then every combination of the
        ``inference.tta_axes`` (spatial axes of the RAS model grid, 0 = X; all when null)."""
        if not self.tta:
            return [()]
        chosen = self.cfg.inference.tta_axes
        axes = range(self.spatial_dims) if chosen is None else sorted({a for a in chosen if a < self.spatial_dims})
        dims = [2 + a for a in axes]  # (B, C, *spatial)
        return [()] + [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]

    @property
    def temperature(self) -> float:
        """Softmax temperature of a single model's logits (model.json ``qc.temperature``; 1 when not fitted)."""
        return float((self.info.get("qc") or {}).get("temperature") or 1.0)

    def _assess(self, volume: Volume, labels: Volume, acc: QcAccumulator) -> dict:
        from medseg.plan.statistics import image_percentiles, label_stats
        from medseg.qc.assess import assess

        fg = sorted(k for k in self.labels if k)
        # components and border contact on the network's grid when it is coarser than the input's (the input-grid
        # map is its nearest-neighbour image; far fewer voxels to label) and no post-processing changed the map
        coarse = acc.model_labels
        use_coarse = coarse is not None and not self._postprocesses and coarse.size < labels.array[0].size
        per = label_stats(labels.array[0], labels.unit_volume_ml, fg, coarse if use_coarse else None)
        dims = len(volume.spatial_shape)
        spacing = [float(volume.spacing[i]) for i in ras_order(volume.affine, dims)]
        return assess(self.info.get("qc"), {self.labels[k]: v for k, v in per.items()}, image_percentiles(volume.array),
                      spacing, acc.result(self.labels), self.cfg.inference.qc)

    # ------------------------------------------------------------------------------------------- internals

    def _label_dtype(self) -> type:
        return np.uint8 if max(self.labels) < 256 else np.uint16

    def _predict_slices(self, volume: Volume, probabilities: bool, on_window: WindowCallback | None,
                        stats: dict, acc: QcAccumulator | None, uncertainty: bool) -> tuple[Any, ...]:
        """A 2D model over the axial (RAS z) slices of a 3D volume."""
        ras, affine = to_ras(volume.array, volume.affine)
        labels: np.ndarray = np.empty(ras.shape[1:], dtype=self._label_dtype())
        probs = np.empty((len(self.labels), *ras.shape[1:]), np.float16) if probabilities else None
        entropy = np.empty(ras.shape[1:], np.uint8) if uncertainty else None
        for k in range(ras.shape[-1]):
            plane = affine.copy()
            plane[:3, 3] = affine[:3, 3] + k * affine[:3, 2]
            part_labels, part_probs, part_entropy = self._predict_grid(Volume(ras[..., k], plane), probabilities, on_window,
                                                                       stats, acc, uncertainty)
            labels[..., k] = part_labels
            if probs is not None:
                probs[..., k] = part_probs
            if entropy is not None:
                entropy[..., k] = part_entropy
        mapping = axis_map(affine, volume.affine, ras.shape[1:], volume.spatial_shape)
        stats["slices"] = int(ras.shape[-1])
        if acc is not None:
            acc.model_labels = None  # one grid per slice: QC counts on the input grid
        return tuple(map_back(a, mapping) if a is not None else None for a in (labels, probs, entropy))

    def _predict_nnunet(self, volume: Volume, probabilities: bool, on_window: WindowCallback | None,
                        stats: dict, acc: QcAccumulator | None, uncertainty: bool) -> tuple[Any, ...]:
        """nnU-Net's preprocessing and prediction (:mod:`medseg.inference.nnunet_exact`) on the input's grid."""

        assert self.nnunet is not None
        if len(volume.spatial_shape) != 3:
            raise InputError("SHAPE_INVALID", f"nnU-Net models are run on 3D images here; this image is "
                             f"{len(volume.spatial_shape)}D {volume.spatial_shape}")
        if self.offsets is not None:
            return self._predict_combined(volume, probabilities, on_window, stats)
        need_probs = probabilities or acc is not None
        labels, probs, facts = self._nnunet_member(0, volume, need_probs, on_window)
        stats["nnunet"] = {**facts, "exact": self.nnunet_exact}
        entropy = None
        if acc is not None and probs is not None:
            mean = torch.from_numpy(probs)
            label_t = torch.from_numpy(labels.astype(np.int32 if labels.dtype == np.uint16 else np.uint8))
            slab_entropy = acc.add(mean, label_t, None, temperature=None, entropy_map=uncertainty)
            if uncertainty and slab_entropy is not None:
                entropy = (slab_entropy * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        out_probs = probs.astype(np.float16) if probabilities and probs is not None else None
        return labels, out_probs, entropy

    @property
    def nnunet_departures(self) -> list[str]:
        """How an nnU-Net model's prediction departs from nnU-Net's own (fast mode, other mirroring, other tile
        step), in the words of ``medseg predict``'s options; empty where it is nnU-Net-exact or not nnU-Net."""
        if not self.nnunet:
            return []
        mirrors = self.nnunet["origin"].get("mirroring_axes") is not None
        return [text for text, on in (
            ("fast mode (--fast)", self.nnunet_fast),
            ("mirroring off (--no-tta)", mirrors and not self.tta),
            ("mirroring on, which this model's trainer did not allow", self.tta and not mirrors),
            (f"tile overlap {self.overlap} (nnU-Net's: 0.5)", self.overlap != 0.5)) if on]

    @property
    def nnunet_exact(self) -> bool:
        """An nnU-Net model predicted exactly as nnU-Net does: not fast mode, its own mirroring, tile step 0.5."""
        return bool(self.nnunet) and not self.nnunet_departures

    def _nnunet_member(self, index: int, volume: Volume, probabilities: bool, on_window: WindowCallback | None,
                       confidence: bool = False) -> tuple[Any, ...]:
        from medseg.inference import nnunet_exact

        member = self.members[index]
        folds = getattr(member.network, "folds", None)
        # nnU-Net accumulates each fold's windows on its own (float16), then averages the folds' logits, and runs
        # each fold's network in its contiguous layout (no channels-last conversion, whose other convolution
        # kernels move float16-accumulated logits by a rounding step)
        backend: Any = ([_fold_function(net, self.device) for net in folds] if folds is not None
                        and not self.nnunet_fast else member.backend)
        return nnunet_exact.predict(volume.array, volume.spacing, member.info["nnunet"], backend, self.device,
                                    mirroring=self.tta, fast=self.nnunet_fast, probabilities=probabilities,
                                    step=1.0 - self.overlap, on_window=on_window, confidence=confidence)

    def _predict_combined(self, volume: Volume, probabilities: bool, on_window: WindowCallback | None,
                          stats: dict) -> tuple[Any, ...]:
        """Models with disjoint labels: each predicts nnU-Net's way; a voxel takes the label of the model whose
        foreground label there is the most probable (background where every model says background)."""
        if probabilities:
            raise InputError("COMBINE_INVALID", "--combine writes no probabilities (each model's classes sum to one "
                             "on their own)", "predict each model alone with --save-probabilities")
        assert self.offsets is not None
        labels: np.ndarray | None = None
        best: np.ndarray | None = None
        stats["nnunet"] = {"combined": []}
        for i in range(len(self.members)):
            part, confidence, facts = self._nnunet_member(i, volume, False, on_window, confidence=True)
            if labels is None:
                labels = np.zeros(part.shape, self._label_dtype())
                best = np.zeros(part.shape, np.float32)
            assert best is not None
            take = (part > 0) & (confidence > best)
            labels[take] = part[take].astype(labels.dtype) + self.offsets[i]
            best[take] = confidence[take]
            stats["nnunet"]["combined"].append({"model": self.members[i].model_dir.resolve().name, **facts})
        return labels, None, None

    def _model_grid(self, volume: Volume) -> tuple[np.ndarray | torch.Tensor, np.ndarray, bool]:
        """The image on the model grid: ``(array, 4x4 affine, normalised?)``."""
        dims = len(volume.spatial_shape)
        ras, affine = to_ras(volume.array, volume.affine)
        spacing = np.linalg.norm(affine[:3, :dims], axis=0)
        target = np.array(self.members[0].spacing[:dims])
        if self.streaming and np.allclose(spacing, target, rtol=1e-4, atol=0):
            return ras, affine, False
        if self.streaming and dims == 3:  # voxel-wise normalisation: resample axis by axis, then normalise
            resampled = self._resampled(ras, affine, tuple(float(t) for t in target))
            if resampled is not None:
                return resampled
        from medseg.transforms.pipeline import build_infer_transforms, volume_to_metatensor  # MONAI: only here

        if self._preprocess_transforms is None:
            self._preprocess_transforms = build_infer_transforms(self.cfg, self.plan)
        image = self._preprocess_transforms({IMAGE: volume_to_metatensor(volume)})[IMAGE]
        model_affine = np.asarray(image.affine, dtype=np.float64)
        if dims == 2:
            full = np.eye(4)
            full[np.ix_([0, 1, 3], [0, 1, 3])] = model_affine
            model_affine = full
        return image.as_tensor(), model_affine, True

    def _resampled(self, ras: np.ndarray, affine: np.ndarray,
                   spacing: tuple[float, ...]) -> tuple[torch.Tensor, np.ndarray, bool] | None:
        """The RAS view resampled to ``spacing`` as training's ``Spacingd`` does it, separably
        (:mod:`medseg.transforms.resample`), and normalised: ``(image, model affine, True)``; ``None`` where the
        map between the grids is not separable (MONAI's pipeline then resamples).

        Raises:
            InputError: ``MODEL_GRID_TOO_LARGE`` before resampling, as in training's pipeline.
        """
        from medseg.transforms.resample import check_model_grid, index_map, model_grid, resample_separable

        shape, model_affine = model_grid(tuple(int(n) for n in ras.shape[1:]), affine, spacing)
        check_model_grid(shape, int(ras.shape[0]), tuple(np.linalg.norm(affine[:3, :3], axis=0)), spacing)
        try:
            xform = index_map(affine, model_affine)
        except ValueError:
            return None
        image = resample_separable(ras, xform, shape, self.device if self.device.type in ("cuda", "mps") else None)
        return self._normalize[0](image), model_affine, True

    def _predict_grid(self, volume: Volume, probabilities: bool, on_window: WindowCallback | None,
                      stats: dict, acc: QcAccumulator | None = None, uncertainty: bool = False) -> tuple[Any, ...]:
        image, model_affine, normalised = self._model_grid(volume)
        shape = tuple(int(s) for s in image.shape[1:])
        stats["streamed"] = not normalised
        layout = WindowLayout(shape, tuple(planned(self.cfg.data.patch_size, "data.patch_size")), self.overlap)
        network = self._network(normalised, with_units=acc is not None and bool(acc.groups))

        def attempt(target: torch.device):
            part = QcAccumulator(acc.n_classes, acc.groups) if acc is not None else None  # a retry starts afresh
            return self._stitch(image, layout, network, target, probabilities, on_window, normalised, part,
                                uncertainty), part

        ((labels, probs, entropy), part), target = with_cpu_fallback(attempt, self.device)
        if acc is not None:
            acc.merge(part)
            acc.model_labels = labels  # for the QC label statistics (see _assess)
        stats["stitched_on"] = target.type
        mapping = axis_map(model_affine, volume.affine, shape, volume.spatial_shape)
        return tuple(map_back(a, mapping) if a is not None else None for a in (labels, probs, entropy))

    def _stitch(self, image: np.ndarray | torch.Tensor, layout: WindowLayout, network, target: torch.device,
                probabilities: bool, on_window: WindowCallback | None, normalised: bool, acc: QcAccumulator | None = None,
                uncertainty: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        shape = layout.shape
        k = len(self.labels)
        n_out = k + (acc.extra_channels if acc is not None else 0)
        labels: np.ndarray = np.empty(shape, dtype=self._label_dtype())
        probs = np.empty((k, *shape), np.float16) if probabilities else None
        entropy = np.empty(shape, np.uint8) if uncertainty and acc is not None else None
        logits = self._blends_logits
        temperature = self.temperature if logits else 1.0
        # probabilities are bounded, so a float16 accumulator is safe on the GPU; logits stay float32
        dtype = torch.float16 if target.type == "cuda" and not logits else torch.float32
        if normalised:
            source = _window_source(image, layout, 0.0)
        elif self._shared_normalisation:  # every member normalises alike: do it once per slab, pad with 0
            source = _window_source(image, layout, 0.0, self._normalise_slab, device=self.device)
        else:  # raw windows mark padding with NaN; each member normalises and zeroes it (see _network)
            source = _window_source(image, layout, float("nan"), device=self.device)
        for z0, z1, values in sliding_window(source, layout, network, n_out, sw_batch_size=self.sw_batch_size,
                                              mode=self.cfg.inference.blend, sigma_scale=self.cfg.inference.gaussian_sigma,
                                              device=self.device, accumulate=target,
                                              dtype=dtype, on_window=on_window):
            mean = values[:k]
            label_slab = argmax_labels(mean, torch.int32 if labels.dtype == np.uint16 else torch.uint8)
            labels[..., z0:z1] = label_slab.cpu().numpy()
            if probs is not None:
                slab = torch.softmax(mean.float(), dim=0) if logits else mean
                probs[..., z0:z1] = slab.to("cpu", torch.float16).numpy()
            if acc is not None:
                slab_entropy = acc.add(mean, label_slab, values[k:] if acc.groups else None,
                                       temperature=temperature if logits else None, entropy_map=entropy is not None)
                if entropy is not None and slab_entropy is not None:
                    entropy[..., z0:z1] = (slab_entropy * 255).round().clamp(0, 255).to("cpu", torch.uint8).numpy()
        return labels, probs, entropy

    @property
    def _blends_logits(self) -> bool:
        """One model without TTA blends logits (as MONAI and nnU-Net do); averaging needs probabilities."""
        return len(self.members) == 1 and not self.tta

    def _normalise_slab(self, raw: torch.Tensor) -> torch.Tensor:
        return self._normalize[0](raw)

    def _network(self, normalised: bool, with_units: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batch function of the sliding window: the averaged output ``(B, K, ...)`` and, ``with_units``,
        each ensemble member's and each flip's probabilities after it (the QC agreement units)."""
        flips = self.flips()
        use_amp = self.device.type == "cuda" and self.cfg.inference.amp
        per_member = not normalised and not self._shared_normalisation
        logits = self._blends_logits

        groups = self._qc_groups() if with_units else {}

        normalizers: list[Normalizer | None] = list(self._normalize) or [None] * len(self.members)

        def run(batch: torch.Tensor) -> torch.Tensor:
            total: Any = None
            member_sums: list[Any] = []
            flip_sums: list[Any] = [None] * len(flips)
            for member, normalize in zip(self.members, normalizers):
                member_sum: Any = None
                x = batch
                if per_member and normalize is not None:  # raw windows: this member's normalisation, NaN padding -> 0
                    scaled = normalize(batch.transpose(0, 1)).transpose(0, 1)
                    x = torch.where(torch.isnan(batch), 0.0, scaled)
                x = x.to(self.device)
                for f, axes in enumerate(flips):
                    inp = torch.flip(x, axes) if axes else x
                    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                        out = member.backend(inp).float()
                    if logits:
                        return out
                    out = torch.softmax(out, dim=1)
                    out = torch.flip(out, axes) if axes else out
                    total = out if total is None else total + out
                    if groups:
                        member_sum = out if member_sum is None else member_sum + out
                        flip_sums[f] = out if flip_sums[f] is None else flip_sums[f] + out
                member_sums.append(member_sum)
            mean = total / (len(self.members) * len(flips))
            if not groups:
                return mean
            units = [mean]
            if "ensemble" in groups:
                units += [m / len(flips) for m in member_sums]
            if "tta" in groups:
                units += [f / len(self.members) for f in flip_sums]
            return torch.cat(units, dim=1)

        return run


def _fold_function(net: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: net(x.to(device))


def with_cpu_fallback(attempt: Callable[[torch.device], object], device: torch.device):
    """Runs ``attempt(device)``; on CUDA out-of-memory (only that error) frees the cache and runs
    ``attempt(cpu)``, so the network stays on the GPU and stitching moves to the host.

    Returns:
        ``(result, device the accumulator lived on)``.
    """
    if device.type != "cuda":
        return attempt(torch.device("cpu")), torch.device("cpu")
    try:
        return attempt(device), device
    except torch.cuda.OutOfMemoryError:
        log.warning("CUDA out of memory while stitching windows on the GPU; stitching on the CPU instead")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return attempt(torch.device("cpu")), torch.device("cpu")


def _window_source(image: np.ndarray | torch.Tensor, layout: WindowLayout, fill: float,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None, device: torch.device | None = None):
    """Cuts windows (slices of the padded image) from the unpadded image through *slabs*: for each window range
    along the last axis, the image's whole cross-section over that range is converted to float32 once,
    ``transform`` (normalisation) is applied to the part inside the image, and the rest is padded with ``fill``;
    windows are views into the slab (or into a float32 tensor image itself). Windows arrive in order of their
    last-axis start, so two slabs are kept: each voxel is converted and normalised about once per window start
    along the last axis, not once per window (about 4x fewer with overlap 0.5 in 3D), and the window copies read
    whole contiguous rows.

    With a CUDA or MPS ``device`` the stored slab goes there in its own dtype (an int16 CT: half the bytes of
    float32), and conversion, normalisation, padding and window cutting run on the device: only the stored voxels
    cross the bus, once per slab."""
    pad, shape = layout.pad, layout.shape
    inner = tuple(slice(before, before + size) for (before, _), size in zip(pad[:-1], shape[:-1]))
    slabs: dict[tuple[int, int], torch.Tensor] = {}

    def slab(span: slice) -> torch.Tensor:
        key = (span.start, span.stop)
        if key not in slabs:
            before = pad[-1][0]
            lo, hi = max(span.start - before, 0), min(span.stop - before, shape[-1])
            raw = image[..., lo:hi]
            if device is not None and device.type in ("cuda", "mps") and isinstance(raw, np.ndarray):
                raw = _to_device(raw, device)
            part = _as_float32(raw)
            if transform is not None:
                part = transform(part).to(torch.float32)
            depth = span.stop - span.start
            if tuple(part.shape[1:]) != (*layout.padded[:-1], depth):
                full = torch.full((image.shape[0], *layout.padded[:-1], depth), fill, dtype=torch.float32, device=part.device)
                full[(slice(None), *inner, slice(lo + before - span.start, hi + before - span.start))] = part
                part = full
            if len(slabs) == 2:
                del slabs[next(iter(slabs))]
            slabs[key] = part
        return slabs[key]

    def source(slices: Sequence[slice]) -> torch.Tensor:
        return slab(slices[-1])[(slice(None), *slices[:-1])]

    return source


def _to_device(part: np.ndarray, device: torch.device) -> torch.Tensor:
    """A stored slab on ``device`` in its own dtype (through pinned memory on CUDA)."""
    host, flipped = stored_tensor(part)
    host = host.contiguous()
    moved = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return moved.flip(flipped) if flipped else moved
