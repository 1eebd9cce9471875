"""Run configuration: YAML files validated by pydantic, deep-merged over ``configs/base.yaml``.

``configs/base.yaml`` is the single source of defaults: the schema below declares types and ranges but no
default values, so every run's configuration is ``base.yaml`` <- preset or user file <- ``--set`` overrides,
and the merged result must be complete. Unknown keys are errors that list the valid keys and suggest the
closest one. The resolved configuration is saved in every run folder (:func:`save_config`).

Presets are looked up by name (``demo``, ``smoke``, ...) in the ``configs/`` folder, which is installed as
the ``medseg.presets`` package, or given as a path to any YAML file.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from medseg.errors import ConfigError, InputError, describe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntensityConfig(_Strict):
    """Intensity normalisation (null scheme: chosen by the plan from the modality).

    ``ct``: clip to the dataset's foreground 0.5/99.5 percentiles, z-score with its foreground mean/std;
    ``window``: clip to ``window`` and rescale to [0, 1]; ``zscore``: per image over non-zero voxels (MR);
    ``percentile``: per image, rescale ``percentiles`` to [0, 1]; ``rgb``: divide by 255 (photos).
    """

    scheme: Literal["ct", "window", "zscore", "percentile", "rgb"] | None
    window: tuple[float, float] | None
    percentiles: tuple[float, float]


class ClaheConfig(_Strict):
    """Contrast-limited adaptive histogram equalisation (scikit-image), applied before normalisation."""

    enabled: bool
    kernel_size: int | tuple[int, ...] | None = Field(description="tile size in voxels; null = 1/8 of each axis")
    clip_limit: float = Field(gt=0, le=1)
    nbins: int = Field(ge=2)


class LabelSource(_Strict):
    """Which RTSTRUCT ROIs / DICOM-SEG segments make one label of a DICOM-study dataset (:mod:`medseg.io.dicom_labels`)."""

    patterns: tuple[str, ...] = Field(min_length=1, description="regular expressions searched in the ROI name (case and spaces ignored)")
    required: bool = Field(True, description="a case without a matching, non-empty ROI is refused (LABEL_ROI_MISSING)")
    priority: int | None = Field(None, description="where ROIs overlap the higher priority wins; null = declaration order (later wins)")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for pattern in patterns:
            if len(pattern) > 200:
                raise ValueError(f"pattern of {len(pattern)} characters (at most 200)")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {describe(exc)}") from None
        return patterns


def _label_source(value: Any) -> Any:
    """``name: [pattern, ...]`` or ``name: pattern`` is shorthand for ``name: {patterns: [...]}``."""
    if isinstance(value, str):
        return {"patterns": [value]}
    if isinstance(value, (list, tuple)):
        return {"patterns": list(value)}
    return value


class DataConfig(_Strict):
    dataset: str | None = Field(description="dataset folder (MSD layout with dataset.json)")
    labels: dict[str, Annotated[LabelSource, BeforeValidator(_label_source)]] | None = Field(
        description="DICOM-study datasets: label name -> RTSTRUCT ROI / SEG segment name patterns, in label-value order")
    val_fraction: float = Field(gt=0, lt=1)
    spacing: tuple[float, ...] | None = Field(min_length=2, max_length=3, description="target spacing; null = plan")
    patch_size: tuple[int, ...] | None = Field(min_length=2, max_length=3, description="null = plan")
    intensity: IntensityConfig
    clahe: ClaheConfig
    cache: Literal["disk", "memory", "none"]
    cache_dir: str | None = Field(description="preprocessed-case cache; null = <run dir>/cache")
    folds: int = Field(ge=2, description="k of k-fold cross-validation (medseg train --fold/--folds)")
    num_workers: int = Field(ge=0)


class AugmentConfig(_Strict):
    pos_neg_ratio: float = Field(ge=0, description="foreground:background ratio of random crop centres")
    flip_prob: float = Field(ge=0, le=1)
    rotate_prob: float = Field(ge=0, le=1)
    rotate_deg: float = Field(ge=0, le=180)
    scale_prob: float = Field(ge=0, le=1)
    scale_range: float = Field(ge=0, lt=1)
    elastic_prob: float = Field(ge=0, le=1)
    elastic_sigma: tuple[float, float]
    elastic_magnitude: tuple[float, float]
    intensity_prob: float = Field(ge=0, le=1)
    intensity_scale: float = Field(ge=0)
    intensity_shift: float = Field(ge=0)
    gamma_prob: float = Field(ge=0, le=1)
    gamma_range: tuple[float, float]
    noise_prob: float = Field(ge=0, le=1)
    noise_std: float = Field(ge=0)
    blur_prob: float = Field(ge=0, le=1)
    blur_sigma: tuple[float, float]
    lowres_prob: float = Field(ge=0, le=1)
    lowres_zoom: tuple[float, float]
    colour_prob: float = Field(ge=0, le=1)
    colour_scale: float = Field(ge=0)


class ModelConfig(_Strict):
    name: str
    channels: tuple[int, ...] | None = Field(min_length=2, description="null (with strides null) = plan")
    strides: tuple[int, ...] | None = Field(min_length=1)
    num_res_units: int = Field(ge=0)
    dropout: float = Field(ge=0, lt=1)
    deep_supervision: bool
    pretrained: str | None = Field(description="local checkpoint (.safetensors or torch state dict) to start from; never downloaded")
    size: str | None = Field(description="architecture size (resenc_unet: M, L, cpu; segformer: b0, b1, b2); null = its default")
    arch: str | None = Field(description="smp architecture: Unet (null), UnetPlusPlus, DeepLabV3Plus, FPN")
    encoder: str | None = Field(description="encoder / backbone: smp encoder name (null = resnet34); deeplabv3: resnet50 (null), resnet101, mobilenet_v3_large")


class PlanConfig(_Strict):
    """Budgets the planner sizes patches and networks for."""

    gpu_memory_gb: float = Field(gt=0)
    cpu_memory_gb: float = Field(gt=0)
    base_channels: int = Field(ge=1)
    max_channels: int = Field(ge=1)
    max_batch_size: int = Field(ge=1, description="the plan doubles the batch while the patch covers the image, up to this")
    anisotropy_ratio: float = Field(gt=1, description="largest / smallest median spacing above which a dataset is anisotropic")
    ct_clip_percentiles: tuple[float, float] = Field(description="foreground percentiles CT normalisation clips to")

    @field_validator("ct_clip_percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError("two percentiles, 0 <= low < high <= 100")
        return value


class LossConfig(_Strict):
    name: str
    activation: Literal["softmax", "sigmoid"] = Field(description="applied by every term of the loss")
    dice_weight: float = Field(ge=0)
    focal_weight: float = Field(ge=0)
    focal_gamma: float = Field(ge=0)
    ce_weight: float = Field(ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(ge=1)
    iterations_per_epoch: int = Field(ge=1)
    batch_size: int | None = Field(ge=1, description="null = plan")
    optimizer: str = Field(description="a name in medseg.training.optim.OPTIMIZERS: adamw, sgd")
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    schedule: Literal["cosine", "poly", "plateau"]
    poly_exponent: float = Field(gt=0, description="exponent of the poly schedule, (1 - progress)^exponent")
    plateau_factor: float = Field(gt=0, lt=1, description="plateau schedule: the LR is multiplied by this when the "
                                                         "validation Dice stops improving")
    plateau_patience: int = Field(ge=0, description="plateau schedule: validations without improvement before the LR drops")
    accumulate: int = Field(ge=1, description="gradient accumulation: each optimizer step sums this many batches "
                                              "(effective batch = accumulate x batch_size)")
    momentum: float = Field(ge=0, lt=1, description="SGD (Nesterov) momentum")
    deep_supervision_decay: float = Field(gt=0, le=1, description="weight ratio of each coarser deep-supervision output")
    early_stopping: int | None = Field(ge=1, description="stop after this many validations without improvement")
    grad_clip: float | None = Field(gt=0)
    val_every: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"]
    amp: bool


class PostprocessConfig(_Strict):
    """Clean-up of predicted label maps, by label name (see medseg.inference.postprocess)."""

    largest_component: list[str] = Field(description="labels reduced to their largest connected component")
    min_component_mm3: float = Field(ge=0, description="remove components smaller than this, every label (0 = off)")
    min_component_mm3_per_label: dict[str, float] = Field(description="per label name, overriding the default")
    fill_holes: list[str] = Field(description="labels whose enclosed holes are filled")


class DicomConfig(_Strict):
    """When a DICOM slice stack is one volume (medseg.io.dicom_geometry.DicomTolerances; ``--dicom KEY=VALUE``)."""

    min_slices: int = Field(ge=1, description="fewer slices are refused (localizers)")
    orientation: float = Field(gt=0, description="largest difference between the slices' direction cosines")
    step_relative: float = Field(ge=0, lt=0.5, description="largest |step - median step| / median step")
    step_floor_mm: float = Field(ge=0, description="absolute step tolerance where larger (capped at half a step)")
    drift_px: float = Field(ge=0, description="in-plane drift (pixels) treated as jitter; more is gantry tilt")


class QcConfig(_Strict):
    """Reference-free quality control at prediction (see medseg.qc); a case is ``review`` when any check fails."""

    enabled: bool = Field(description="compute QC signals and a verdict per case")
    calibrate: bool = Field(description="fit a softmax temperature on the validation cases at the end of training")
    agreement: bool = Field(description="ensembles / TTA: mean pairwise Dice between members and between flips "
                                        "(K more accumulator channels per member and per flip)")
    min_agreement: float = Field(ge=0, le=1, description="review when the mean pairwise Dice of a label is lower")
    max_uncertainty: float = Field(ge=0, le=1, description="review when the mean normalised entropy in and near a label is higher")
    min_present: float = Field(ge=0, le=1, description="an empty label present in at least this share of training cases is reviewed")
    volume_margin: float = Field(ge=0, description="a label volume outside [min / (1 + m), max * (1 + m)] of training is reviewed")
    components_margin: int = Field(ge=0, description="more components than the training maximum plus this are reviewed")
    border: bool = Field(description="review a structure touching the field-of-view border when training cases' rarely did")
    border_share: float = Field(ge=0, le=1, description="'rarely': in fewer than this share of the training cases")
    intensity_margin: float = Field(ge=0, description="input percentiles outside the training range widened by this share "
                                                      "of the training 1-99 % spread are reviewed")
    spacing_factor: float = Field(ge=1, description="a spacing outside [min / f, max * f] of training is reviewed")


class SeriesSelectionConfig(_Strict):
    """Which series of a study (DICOMweb, listener) are segmented; every series is recorded with the reason."""

    modalities: list[str] = Field(description="DICOM Modality values accepted; empty = any")
    description_regex: str = Field(description="regex searched (case-insensitive) in SeriesDescription; empty = any")
    min_slices: int = Field(ge=1, description="image instances a series needs")
    orientation: Literal["any", "axial", "coronal", "sagittal"] = Field(
        description="main axis of the slice normal (from ImageOrientationPatient)")

    @field_validator("description_regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            from medseg.errors import describe

            raise ValueError(f"not a regular expression: {describe(exc)}") from None
        return value


class InferenceConfig(_Strict):
    overlap: float = Field(ge=0, lt=1)
    sw_batch_size: int = Field(ge=1)
    blend: Literal["gaussian", "constant"]
    tta: bool = Field(description="average predictions over mirrored inputs (2^axes flips)")
    tta_axes: list[Annotated[int, Field(ge=0, le=2)]] | None = Field(
        description="spatial axes TTA mirrors (0 = X); null = every axis")
    gaussian_sigma: float = Field(gt=0, le=1, description="Gaussian blending: sigma as a share of the window size")
    fast_overlap: float = Field(ge=0, lt=1, description="overlap used by --fast (which also turns TTA off)")
    amp: bool = Field(description="mixed precision for the network on CUDA")
    dicom: DicomConfig
    series_selection: SeriesSelectionConfig
    postprocess: PostprocessConfig
    qc: QcConfig


class EvaluationConfig(_Strict):
    """Metric settings and the report's flag thresholds (see medseg.metrics)."""

    nsd_tolerance_mm: float = Field(gt=0, description="default tolerance τ of normalised surface Dice")
    nsd_tolerance_per_label: dict[str, float] = Field(description="τ per label name, overriding the default")
    lesion_overlap: float = Field(gt=0, le=1, description="overlap fraction that makes a lesion match")
    lesion_connectivity: Literal["full", "face"]
    empty_both: Literal["nan", "perfect"]
    empty_one_distance: Literal["nan", "diagonal"]
    bootstrap: int = Field(ge=100)
    ci_level: float = Field(gt=0.5, lt=1)
    flag_dice_below: float = Field(ge=0, le=1)
    flag_worst_fraction: float = Field(ge=0, lt=1)
    flag_volume_error_pct: float = Field(gt=0)
    small_subgroup: int = Field(ge=1)
    report_max_flagged_overlays: int = Field(ge=0, description="flagged cases drawn in the report (best/median/worst always)")
    report_slice_thickness_bins_mm: list[float] = Field(description="slice-thickness subgroup edges in the report (mm)")
    workers: int = Field(ge=0, description="parallel processes over cases; 0 = one per thread of this process's CPU share")


class TrackingConfig(_Strict):
    uri: str | None = Field(description="MLflow tracking URI; null = sqlite:///<run dir>/mlflow.db")
    experiment: str
    log_model: bool = Field(description="log the best network with mlflow.pytorch (signature, input example)")
    registered_model: str | None = Field(description="register the logged model under this name")
    alias: str | None = Field(description="alias for the registered version, e.g. candidate")
    system_metrics: bool = Field(description="log CPU/GPU/memory use during training")
    log_pyfunc: bool = Field(description="log the best model folder as an MLflow pyfunc model (medseg_model)")
    tensorboard: bool = Field(description="also write TensorBoard event files (medseg[tensorboard])")
    tensorboard_dir: str | None = Field(description="their folder; null = <run dir>/tensorboard")


class DistillConfig(_Strict):
    """``medseg distill``: the student's loss is (1 - weight) * its own loss + weight * T^2 * KL to the teachers."""

    temperature: float = Field(gt=0, description="softens teacher and student probabilities (Hinton et al. 2015)")
    weight: float = Field(ge=0, le=1, description="share of the distillation term; 0 = plain training")


class PacsConfig(_Strict):
    """DICOM networking (``medseg predict -i URL``, ``--push``, ``medseg serve``) and the identity of derived DICOM
    objects; ``--pacs KEY=VALUE`` overrides a key for one command."""

    uid_root: str = Field(description="new SEG/RTSTRUCT UIDs are generated under this prefix (your organisation's root)")
    token_env: str = Field(description="environment variable holding a DICOMweb bearer token (or --token-file)")
    timeout_s: float = Field(gt=0, description="seconds without an answer before a DICOMweb request fails")
    retries: int = Field(ge=0, description="retries of a failed connection or a 502/503/504 answer")
    backoff_s: float = Field(ge=0, description="first wait between retries, doubled each time")
    max_series_mb: float = Field(gt=0, description="a series larger than this is refused (download or listener)")
    max_study_mb: float = Field(gt=0, description="DICOMweb: selected series larger than this together are not downloaded")
    idle_s: float = Field(gt=0, description="listener: a series is complete when no instance came for this long")
    max_queue: int = Field(ge=1, description="listener: complete series waiting for segmentation; more are refused")
    max_incoming_mb: float = Field(gt=0, description="listener: disk held by received, unprocessed instances")
    allowed_calling_aets: list[str] = Field(description="listener: calling AE titles accepted; empty = any (others: LISTENER_CALLER_REJECTED)")
    send_retries: int = Field(ge=0, description="listener: retries of the C-STORE of a result to --dest")
    dimse_timeout_s: float = Field(gt=0, description="listener: seconds without an answer on a DICOM association")

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.", value) or len(value) > 40:
            raise ValueError("not a UID prefix: digits and dots ending in '.', at most 40 characters "
                             "(the generated part needs the rest of the 64)")
        return value


Code = tuple[str, str, str]  # (coding scheme, value, meaning), e.g. ("SCT", "10200004", "Liver")



class LabelCoding(_Strict):
    """How DICOM outputs code one label (``labels.<name>``): the DICOM-SEG segment's SNOMED CT property category and
    type, and the RTSTRUCT ROI's RTROIInterpretedType."""

    category: Code | None = None
    type: Code | None = None
    rt_type: Literal["", "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "BOLUS", "AVOIDANCE",
                     "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL",
                     "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION",
                     "CONTROL"] = ""


class Config(_Strict):
    """The complete, validated configuration of a run."""

    seed: int
    data: DataConfig
    augment: AugmentConfig
    plan: PlanConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    inference: InferenceConfig
    evaluation: EvaluationConfig
    tracking: TrackingConfig
    distill: DistillConfig
    pacs: PacsConfig
    labels: dict[str, LabelCoding]


def presets_dir() -> Path:
    """Returns the folder holding ``base.yaml`` and the named presets."""
    return Path(str(resources.files("medseg.presets")))


def preset_names() -> list[str]:
    """Returns the names of the shipped presets (without ``.yaml``), excluding ``base``."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml") if p.stem != "base")


#: What a config file may cost to parse: its size, its nesting and the nodes its aliases expand to (a YAML
#: "billion laughs" file expands 9 aliases over 9 levels to 387 million strings).
T = TypeVar("T")

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


class _BudgetLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses, while composing (before anything is constructed), a document nested
    deeper than :data:`MAX_YAML_DEPTH`; the expansion budget is checked on the composed graph."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise _TooComplex(f"nested more than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _TooComplex(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _expanded_nodes(root: yaml.Node) -> int:
    """Nodes of ``root`` once every alias is expanded, computed on the shared graph (memoised: linear in its
    size), stopping at :data:`MAX_YAML_NODES`; a recursive alias is refused."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _TooComplex("an alias refers to a node that contains it (a recursive structure)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise _TooComplex(f"its aliases expand to more than {MAX_YAML_NODES:,} nodes")
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str | bytes, source: str) -> Any:
    """Parses one YAML document within a budget: at most :data:`MAX_YAML_BYTES`, nested at most
    :data:`MAX_YAML_DEPTH` levels, expanding to at most :data:`MAX_YAML_NODES` nodes; only plain data types
    (PyYAML's safe constructors).

    Raises:
        ConfigError: ``CONFIG_YAML_INVALID`` (not UTF-8, not YAML) or ``CONFIG_TOO_COMPLEX``.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError("CONFIG_TOO_COMPLEX", f"{source}: {len(text):,} bytes, more than a config may hold "
                          f"({MAX_YAML_BYTES:,})", "a medseg config is a few kB of YAML")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("CONFIG_YAML_INVALID", f"{source}: not UTF-8 text (byte {exc.start})",
                              "give a YAML text file") from None
    loader = None
    try:
        loader = _BudgetLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node)
        return loader.construct_document(node)
    except _TooComplex as exc:
        raise ConfigError("CONFIG_TOO_COMPLEX", f"{source}: {exc.reason}", "write the values out; configs need no deep "
                          "nesting or repeated aliases") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError("CONFIG_YAML_INVALID", f"{source}: malformed YAML{where}: {problem}") from None
    except RecursionError:  # pragma: no cover - the depth budget stops this first
        raise ConfigError("CONFIG_TOO_COMPLEX", f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """Reads a YAML mapping (within :func:`parse_yaml`'s budget).

    Raises:
        InputError: ``PATH_NOT_FOUND`` if the file does not exist; ``INPUT_UNREADABLE`` if it cannot be read.
        ConfigError: ``CONFIG_YAML_INVALID`` if it is not valid YAML or not a mapping; ``CONFIG_TOO_COMPLEX``.
    """
    from medseg.errors import require_file

    if not path.exists() and not path.is_symlink():
        raise InputError("PATH_NOT_FOUND", f"config file not found: {path}", "give a YAML path or a preset name")
    require_file(path, "config file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError("CONFIG_TOO_COMPLEX", f"{path.name}: {path.stat().st_size:,} bytes, more than a config may "
                          f"hold ({MAX_YAML_BYTES:,})", "a medseg config is a few kB of YAML")
    data = parse_yaml(path.read_bytes(), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "CONFIG_YAML_INVALID", f"{path}: expected a mapping of keys at the top level, found {type(data).__name__}"
        )
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Returns ``base`` updated recursively by ``override`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(tree: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Applies one ``a.b.c=value`` override; the value is parsed as YAML (``3``, ``[1, 2]``, ``null``).

    Raises:
        ConfigError: ``CONFIG_BAD_OVERRIDE`` if the text is not ``key=value``.
    """
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            "CONFIG_BAD_OVERRIDE", f"override {assignment!r} is not of the form key.sub=value", "e.g. --set train.epochs=3"
        )
    try:
        value = parse_yaml(raw, f"--set {key}")
    except ConfigError as exc:
        if exc.code != "CONFIG_YAML_INVALID":
            raise
        value = raw  # not YAML: the text itself (e.g. a path with a colon)
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return deep_merge(tree, nested)


def _resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = presets_dir() / f"{Path(str(name_or_path)).stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and path.parent == Path(".") and candidate.is_file():
        return candidate
    raise InputError(
        "PATH_NOT_FOUND",
        f"config not found: {name_or_path}",
        f"give a YAML file path or a preset name: {', '.join(preset_names())}",
    )


def _format_validation_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Config
        for part in loc[:-1]:
            annotation = model.model_fields[part].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model = annotation
        valid = list(model.model_fields)
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean '{'.'.join(loc[:-1] + close[:1])}'?" if close else None
        section = f"under '{'.'.join(loc[:-1])}'" if len(loc) > 1 else "at the top level"
        return ConfigError(
            "CONFIG_UNKNOWN_KEY",
            f"{source}: unknown key '{dotted}'; valid keys {section}: {', '.join(valid)}",
            hint,
        )
    if err["type"] == "missing":
        return ConfigError("CONFIG_MISSING_KEY", f"{source}: required key '{dotted}' is missing", "see configs/base.yaml")
    found = err.get("input")
    shown = repr(found)
    shown = shown if len(shown) <= 200 else shown[:200] + " ..."
    return ConfigError("CONFIG_INVALID_VALUE", f"{source}: '{dotted}': {err['msg']} (found {shown})")


def planned(value: T | None, key: str) -> T:
    """``value`` of a config key whose ``null`` means "the plan sets it" (``data.patch_size``, ``data.spacing``,
    ``train.batch_size``, ``model.channels``/``strides``), refused when no plan filled it in.

    Examples:
        >>> planned((96, 96, 64), "data.patch_size")
        (96, 96, 64)
        >>> planned(None, "data.patch_size")
        Traceback (most recent call last):
        ...
        medseg.errors.ConfigError: data.patch_size is null and no plan filled it in
    """
    if value is None:
        raise ConfigError("CONFIG_INVALID_VALUE", f"{key} is null and no plan filled it in",
                          "use a planned config (medseg plan / train plan it), or set the value")
    return value

def load_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads and validates a configuration.

    Args:
        name_or_path: A preset name (``"demo"``) or a YAML path; ``None`` uses ``base.yaml`` alone.
        overrides: ``key.sub=value`` strings applied last, in order.

    Returns:
        The validated :class:`Config`.

    Raises:
        InputError: ``PATH_NOT_FOUND`` when the file or preset does not exist.
        ConfigError: ``CONFIG_YAML_INVALID``, ``CONFIG_UNKNOWN_KEY``, ``CONFIG_MISSING_KEY``,
            ``CONFIG_INVALID_VALUE`` or ``CONFIG_BAD_OVERRIDE``.
    """
    tree = read_yaml(presets_dir() / "base.yaml")
    source = "base.yaml"
    if name_or_path is not None:
        path = _resolve_config_path(name_or_path)
        tree = deep_merge(tree, read_yaml(path))
        source = str(path)
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    if overrides:
        source += " + --set"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _format_validation_error(exc, source) from None


def dicom_settings(cfg: Config | None, assignments: Sequence[str] = ()) -> DicomConfig:
    """The DICOM stack tolerances of ``cfg`` (``base.yaml``'s when ``None``) with ``KEY=VALUE`` overrides
    (``medseg predict/convert --dicom``), validated by the schema.

    Raises:
        ConfigError: ``CONFIG_BAD_OVERRIDE``, ``CONFIG_UNKNOWN_KEY`` or ``CONFIG_INVALID_VALUE``.
    """
    return with_overrides(cfg, "inference.dicom", assignments, "--dicom").inference.dicom


def with_overrides(cfg: Config | None, section: str, assignments: Sequence[str], flag: str) -> Config:
    """``cfg`` (``base.yaml``'s when ``None``) with ``KEY=VALUE`` overrides of one dotted ``section`` (a command's
    ``--dicom``, ``--pacs`` or ``--select`` flag), validated by the schema.

    Raises:
        ConfigError: ``CONFIG_BAD_OVERRIDE``, ``CONFIG_UNKNOWN_KEY`` or ``CONFIG_INVALID_VALUE``.
    """
    tree = config_to_dict(cfg if cfg is not None else load_config())
    for assignment in assignments:
        tree = apply_override(tree, f"{section}.{assignment.strip()}")
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _format_validation_error(exc, flag) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Returns the configuration as plain JSON-compatible data."""
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: Path) -> None:
    """Writes the resolved configuration as YAML (loadable again with :func:`load_config`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


LOCAL_PATHS = ("dataset", "cache_dir")  # data.* keys naming places on this machine (and model.pretrained,
# tracking.tensorboard_dir)


def shareable(cfg: Config) -> Config:
    """``cfg`` without the paths of this machine (``data.dataset``, ``data.cache_dir``, ``model.pretrained``,
    ``tracking.tensorboard_dir`` set to null; the pretrained file's name and hash are in ``model.json``): what model
    folders, MLflow params and artifacts record. Input folders are often named after patients, and a model folder
    travels to other sites; the run folder's own ``config.yaml`` keeps the paths so that ``--resume`` finds the
    data."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={k: None for k in LOCAL_PATHS}),
                                  "model": cfg.model.model_copy(update={"pretrained": None}),
                                  "tracking": cfg.tracking.model_copy(update={"tensorboard_dir": None})})


def with_tensorboard(cfg: Config, log_dir: str | Path | None) -> Config:
    """``cfg`` with TensorBoard switched on into ``log_dir`` (``--tensorboard DIR``); ``cfg`` itself when None."""
    if log_dir is None:
        return cfg
    tracking = cfg.tracking.model_copy(update={"tensorboard": True, "tensorboard_dir": str(log_dir)})
    return cfg.model_copy(update={"tracking": tracking})


def config_hash(cfg: Config) -> str:
    """Returns a short SHA-256 of the canonical JSON form of the configuration, without the paths of this
    machine (:func:`shareable`): the same settings on another machine have the same hash."""
    from medseg.fsutil import json_hash

    return json_hash(config_to_dict(shareable(cfg)), compact=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested mappings to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
