"""Errors with stable codes.

Every error a user can cause (bad path, bad config, bad input file) is a :class:`MedsegError` carrying a
stable ``code`` (for scripts and manifests), a message saying what was expected and what was found, and a
``hint`` saying how to fix it. The CLI prints them as one line and exits non-zero; it never shows a traceback
for them. Messages must never contain patient identifiers: name files by path or case ID only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

#: Every error code medseg reports, declared once with its meaning (``docs/errors.md`` is generated from it:
#: ``python -m medseg.errors > docs/errors.md``; a test fails when code raises a code missing here).
CODES: dict[str, str] = {
    # paths, formats and other inputs
    "PATH_NOT_FOUND": "A file or folder given on the command line or in the config does not exist.",
    "FORMAT_UNSUPPORTED": "A file whose ending no reader knows (NIfTI, NRRD/MetaImage, PNG/JPEG/TIFF/BMP, DICOM).",
    "NO_INPUTS": "A folder without any image files or DICOM series (or, for evaluation, without reference labels).",
    "SHAPE_INVALID": "An image of the wrong dimensionality or channel layout for the operation (e.g. a 2D model on 4D).",
    "SHAPE_MISMATCH": "An array's spatial shape differs from the volume it replaces (internal consistency check).",
    "CHANNELS_MISMATCH": "An image has another number of channels than the model or dataset declares.",
    "RGB_RANGE_INVALID": "An image for an RGB-normalised nnU-Net model (RGBTo01Normalization) with values outside 0..255.",
    "CHANNELS_GRID_MISMATCH": "The channel files of one case are not on one grid (shape, spacing, origin, direction).",
    "AFFINE_INVALID": "A volume with a sheared affine was to be written as a DICOM series (which needs orthogonal axes).",
    "AFFINE_SHEARED": "A NIfTI/NRRD/MHA file whose affine or direction matrix is sheared or degenerate.",
    "VALUE_RANGE": "Voxel values that do not fit int16 after rescaling, writing a DICOM series.",
    "GRID_NOT_SEPARABLE": "A model grid that is not an axis-wise resampling of the input grid (internal check).",
    "IMAGE_CORRUPT": "A 2D picture (PNG, JPEG, TIFF, BMP) that cannot be decoded.",
    "IMAGE_NONFINITE": "An NRRD/MetaImage file with NaN or Inf voxels.",
    "IMAGE_TOO_LARGE": "An image whose voxel buffer would exceed the reader's size cap (corrupt header or bomb).",
    "NIFTI_CORRUPT": "A NIfTI file that cannot be read: truncated, bad gzip stream, bad header.",
    "NIFTI_NONFINITE": "A NIfTI file with NaN or Inf voxels.",
    "METADATA_INVALID": "A subgroup metadata CSV for evaluation without a 'case' column.",
    "INPUT_UNREADABLE": "An input that exists by name but cannot be read: a broken symbolic link, a link loop, a device, pipe or other non-regular file, or no read permission.",
    "IMAGE_DTYPE_UNSUPPORTED": "An image whose voxel type medseg does not segment (complex, RGB24/RGBA32 records, float128, ...): refused, never silently converted.",
    "AFFINE_NONFINITE": "An image whose voxel-to-world transform holds NaN or Inf (a damaged sform/qform or direction).",
    "MODEL_GRID_TOO_LARGE": "An image that, resampled to the model's spacing, would exceed the memory cap (e.g. 1000 mm voxels): refused before resampling.",
    # DICOM
    "DICOM_UNREADABLE": "A DICOM file whose header cannot be parsed.",
    "DICOM_NOT_DICOM": "A file in a DICOM folder that is not DICOM (counted, not listed).",
    "DICOM_NOT_IMAGE": "A DICOM object that is not an image (RTSTRUCT, SR, SEG, ...): skipped.",
    "DICOM_NO_GEOMETRY": "A DICOM image without position/orientation/pixel spacing; 1 mm is never assumed.",
    "DICOM_NO_SERIES": "A DICOM folder without any image series.",
    "DICOM_MULTIPLE_SERIES": "A folder read as one series holds several; convert splits them, one output each.",
    "DICOM_NO_TRANSFER_SYNTAX": "A DICOM file without TransferSyntaxUID in its file meta information.",
    "DICOM_TRANSFER_SYNTAX_UNSUPPORTED": "A DICOM transfer syntax for which no pixel decoder exists.",
    "DICOM_DECODER_MISSING": "A compressed transfer syntax whose decoder plugin is not installed (named in the hint).",
    "DICOM_DECODE_FAILED": "Pixel data that the decoder rejects.",
    "DICOM_TRUNCATED": "Pixel data shorter than rows x columns x frames x bytes per sample.",
    "DICOM_PIXELS_CORRUPT": "A slice whose matrix size differs from the rest of its series.",
    "DICOM_TOO_FEW_SLICES": "A series of fewer than 3 slices (localizers, single images): skipped, not a volume.",
    "DICOM_TOO_LARGE": "A series whose voxel buffer would exceed the size cap.",
    "DICOM_ORIENTATION_INCONSISTENT": "Slices of one series with different orientations (mixed image planes).",
    "DICOM_ORIENTATION_INVALID": "ImageOrientationPatient whose row and column directions are not orthogonal.",
    "DICOM_NOT_A_VOLUME": "All slices of a series at one position (a time series or repeats).",
    "DICOM_DUPLICATE_POSITION": "Two slices of a series at one position (echoes, phases or repeats mixed).",
    "DICOM_SLICE_GAP": "A slice step more than 5 % (or 0.1 mm, never half a step) off the median: a missing slice.",
    "DICOM_GANTRY_TILT": "A sheared stack (a slice more than a quarter pixel off the normal); --allow-tilt resamples.",
    "DICOM_SEG_NO_SOURCE": "DICOM-SEG or RTSTRUCT output asked for an input that is not a DICOM series.",
    "DICOM_SEG_GRID_MISMATCH": "A label map that is not on its source series' grid, writing DICOM-SEG or RTSTRUCT.",
    "DICOM_SEG_LABELS": "A label value without a name, writing DICOM-SEG or RTSTRUCT.",
    "DICOM_RESCALE_INVALID": "A DICOM slice whose RescaleSlope is 0, NaN or Inf, or whose RescaleIntercept is NaN or Inf (the voxels would be meaningless).",
    # datasets
    "DATASET_JSON_MISSING": "A dataset folder in none of the known layouts (dataset.json, dataset.csv, images/+labels/).",
    "DATASET_JSON_INVALID": "A dataset.json or CSV manifest that cannot be parsed or lacks required entries.",
    "DATASET_FILES_MISSING": "Cases whose image or label files are missing (or labels without images).",
    "DATASET_DUPLICATE_ID": "Two files (or CSV rows) with one case ID.",
    "DATASET_COUNT_MISMATCH": "dataset.json's numTraining differs from the training cases found.",
    "DATASET_EMPTY": "A dataset without training cases.",
    "DATASET_TOO_SMALL": "Too few training cases for the requested folds or split.",
    "DATASET_NO_TEST_LABELS": "A dataset without test images and labels, where the demo workflow needs them.",
    "IMAGE_LABEL_MISMATCH": "An image and its label map differ in shape, spacing, origin or direction.",
    "LABEL_CHANNELS": "A label map with more than one channel.",
    "LABEL_NOT_INTEGER": "A label map with non-integer values.",
    "LABEL_VALUES_UNEXPECTED": "A label map with values the dataset does not declare.",
    "LABEL_RULES_MISSING": "A DICOM-study dataset (series labelled by RTSTRUCT/SEG) with no data.labels in the config to say which ROIs make which label.",
    "LABEL_ROI_MISSING": "A case of a DICOM-study dataset without a non-empty ROI (or segment) matching a required label of data.labels.",
    "LABEL_ROI_AMBIGUOUS": "An RTSTRUCT ROI or SEG segment whose name matches the patterns of two labels of data.labels.",
    "LABEL_REFERENCE_MISSING": "An RTSTRUCT or SEG whose referenced image series is not in its study (missing, or in another study).",
    "RTSTRUCT_CONTOUR_OFF_GRID": "An RTSTRUCT contour off every slice plane of its series (more than a quarter slice step away), or in another frame of reference.",
    "SEG_FRAME_OFF_GRID": "A DICOM-SEG frame that is not on its series' grid (position, orientation, matrix or pixel spacing).",
    "SPLITS_MISMATCH": "A saved splits.json that does not fit the dataset or data.folds.",
    # configuration
    "CONFIG_YAML_INVALID": "A config file that is not valid YAML (or not UTF-8 text).",
    "CONFIG_TOO_COMPLEX": "A config file (or --set value) beyond the parser's budget: larger than 1 MiB, nested more than 64 levels, or expanding through YAML aliases to more than 100,000 nodes (a 'billion laughs' file).",
    "CONFIG_UNKNOWN_KEY": "A config key (in a file or --set) that the schema does not know; the valid keys are listed.",
    "CONFIG_UNKNOWN_NAME": "An unknown name for a registry entry (model, loss, ...); the valid names are listed.",
    "CONFIG_MISSING_KEY": "A required setting or option that was not given.",
    "CONFIG_INVALID_VALUE": "A config or option value of the wrong type or out of range.",
    "CONFIG_BAD_OVERRIDE": "A --set that is not of the form key.sub=value.",
    "THREADS_INVALID": "A --threads (MEDSEG_THREADS) value that is neither 'auto' nor a positive integer.",
    "OPTION_INVALID": "A command-line option or argument that is unknown, missing, malformed or out of range (the command's -h lists them).",
    "DEVICE_UNAVAILABLE": "A device (cuda, mps) that this machine does not have.",
    # training
    "TRAIN_NONFINITE_LOSS": "A NaN/Inf training loss (epoch, step and case IDs named); the best model is kept.",
    "CUDA_OUT_OF_MEMORY": "The GPU ran out of memory with the configured patch and batch size.",
    "CHECKPOINT_NOT_FOUND": "--resume without a checkpoint in the run folder.",
    "CHECKPOINT_UNREADABLE": "A checkpoint that cannot be read.",
    "RESUME_NOTHING_TO_DO": "--resume of a run that already finished its epochs.",
    "RESUME_CONFIG_CHANGED": "--resume with changed settings other than the resumable ones.",
    "RESUME_MISMATCH": "--resume with another number of processes than the checkpoint was written by, or (distill) other teachers.",
    "DISTILL_TEACHER_MISMATCH": "medseg distill with teachers that are exported, disagree with each other, or whose task or preprocessing (spacing, normalisation) is not the student's.",
    # models and inference
    "MODEL_DEPENDENCY_MISSING": "A network whose third-party package (segmentation-models-pytorch, torchvision, transformers, dynamic-network-architectures) is not installed or does not import.",
    "EXTRA_MISSING": "A feature whose optional extra is not installed (medseg[tensorboard], medseg[lightning], medseg[prune], medseg[litert], medseg[tensorrt]); the hint names the install command.",
    "MODEL_NOT_FOUND": "A model folder that does not exist.",
    "MODEL_DIR_INVALID": "A model folder with files missing or unreadable (or of the wrong kind).",
    "MODEL_CORRUPT": "A model folder whose network file or plan does not match the SHA-256 in model.json.",
    "PRETRAINED_UNREADABLE": "A model.pretrained file that is not a safetensors or torch state dict (or holds no tensors).",
    "PRETRAINED_MISMATCH": "A model.pretrained file of which not one tensor fits the configured network.",
    "MODEL_WEIGHTS_MISMATCH": "Weights that do not fit the network the model's config describes.",
    "ENSEMBLE_INCOMPATIBLE": "Ensemble members that differ in dimensions, channels, labels, patch or spacing.",
    "NNUNET_FILE_MISSING": "An nnU-Net results folder without plans.json, dataset.json, a fold or its checkpoint (named).",
    "NNUNET_CONFIGURATION_MISSING": "An nnU-Net configuration the plans do not have (or a broken inherits_from).",
    "NNUNET_NETWORK_UNBUILDABLE": "An nnU-Net network the plans describe that dynamic-network-architectures cannot build.",
    "NNUNET_CHECKPOINT_UNSAFE": "An nnU-Net checkpoint whose pickle holds objects beyond nnU-Net's own (it could run code).",
    "NNUNET_CHECKPOINT_INVALID": "An unreadable nnU-Net checkpoint, or weights that do not fit the plans' network.",
    "NNUNET_FOLDS_INCOMPATIBLE": "nnU-Net folds trained with different trainers, plans or configurations.",
    "COMBINE_INVALID": "--combine with fewer than two nnU-Net models, other channel counts, or a label name in two of them.",
    "NNUNET_UNSUPPORTED": "An nnU-Net model medseg does not run exactly (region-based, cascade, other readers or resampling).",
    "BACKEND_UNKNOWN": "An unknown inference backend name.",
    "BACKEND_UNAVAILABLE": "A backend or exporter whose package is not installed (named in the hint).",
    "BACKEND_NEEDS_EXPORT": "A backend that needs another model format (e.g. ONNX Runtime on PyTorch weights).",
    "EXPORT_FORMAT_UNKNOWN": "An unknown export format or quantisation option.",
    "EXPORT_UNSUPPORTED": "A network whose ONNX/TorchScript graph would hold only for the traced input shape (SwinUNETR), or a 3D network for LiteRT (2D only).",
    "BACKEND_NEEDS_GPU": "A backend that runs only on an NVIDIA GPU (tensorrt) asked for on a machine without CUDA.",
    "PRUNE_UNSUPPORTED": "A network medseg prune cannot narrow into a configuration it can rebuild (only MONAI UNet).",
    "EXPORT_FAILED": "A network that neither ONNX exporter (dynamo, then TorchScript-based) could turn into a graph that runs at several input sizes.",
    "EXPORT_PARITY_FAILED": "An exported network whose logits differ from PyTorch's by more than the tolerance.",
    "SHARD_INVALID": "A --shard that is not i/n with 0 <= i < n, or --shard auto outside a Slurm array job or a Kubernetes indexed Job (or with its variables incomplete).",
    "PREDICTION_FAILED": "A workflow in which no case could be predicted.",
    "OUT_OF_MEMORY": "The machine ran out of memory (an allocation failed) for this case or command.",
    "RUN_INTERRUPTED": "The command was stopped by SIGINT (Ctrl-C) or SIGTERM; what was complete is recorded (--resume continues).",
    "INTERNAL_ERROR": "An unexpected error (a bug): one line; MEDSEG_DEBUG=1 shows the traceback.",
    # outputs
    "OUTPUT_EXISTS": "An output that exists already (or an output folder holding a finished run's manifest); --overwrite replaces it, --resume completes the run.",
    "OUTPUT_IS_FILE": "An output folder (-o) that is an existing file, or an output file whose place is taken by a folder.",
    "OUTPUT_NOT_WRITABLE": "An output location that cannot be written (read-only file system, no permission); checked before any work.",
    "DISK_FULL": "The disk (or quota) holding the outputs is full; what was complete is kept and recorded.",
    "OUTPUT_INSIDE_INPUT": "An output folder inside an input folder, or the folder of an input file itself.",
    "OUTPUT_NAME_INVALID": "An output file name of a format that cannot be written there.",
    "OUTPUT_PATH_UNSAFE": "An output path that would leave the output folder.",
    "OUTPUT_TYPE_INVALID": "An unknown --output-type.",
    # evaluation and reports
    "GRID_MISMATCH": "A prediction and its reference label map on different grids.",
    "EVAL_MISSING_PREDICTIONS": "Reference cases without a prediction.",
    "EVAL_UNKNOWN_CASES": "Cases asked for that have no reference label.",
    "EVAL_DIR_INVALID": "An evaluation folder without the files `medseg report` needs.",
    "PREDICTION_DIR_INVALID": "A prediction folder for `medseg report` without a readable manifest.json.",
    # PACS: DICOMweb (predict -i URL, --push) and the DICOM listener (medseg serve)
    "DICOMWEB_URL_INVALID": "An input or --push URL that is not http(s)://host[:port]/<root>/studies/<StudyInstanceUID> (or a DICOMweb root for --push).",
    "DICOMWEB_TOKEN_INVALID": "A --token-file that cannot be read or is empty.",
    "DICOMWEB_UNREACHABLE": "A DICOMweb server that refused or dropped the connection after every retry.",
    "DICOMWEB_TIMEOUT": "A DICOMweb server that stopped answering (pacs.timeout_s), also in the middle of a download.",
    "DICOMWEB_TLS": "A DICOMweb server whose TLS certificate is not trusted (--ca-bundle names a hospital CA).",
    "DICOMWEB_UNAUTHORIZED": "HTTP 401: the server wants credentials, or the bearer token is wrong or expired.",
    "DICOMWEB_FORBIDDEN": "HTTP 403: the credentials are valid but may not read (or store) this study.",
    "DICOMWEB_STUDY_NOT_FOUND": "A StudyInstanceUID the DICOMweb server does not hold.",
    "DICOMWEB_HTTP_ERROR": "Any other HTTP error status from a DICOMweb server.",
    "DICOMWEB_PUSH_REJECTED": "A STOW-RS store the server refused, wholly or for some instances (the local outputs stay).",
    "SERIES_NOT_SELECTED": "A series of a study left out by inference.series_selection (the reason is recorded).",
    "SERIES_TOO_LARGE": "A series larger than pacs.max_series_mb (refused before download, or while receiving).",
    "STUDY_TOO_LARGE": "A DICOMweb study whose selected series together exceed pacs.max_study_mb (nothing is downloaded).",
    "NO_SERIES_MATCHED": "A study in which no series matched inference.series_selection.",
    "DEST_INVALID": "A --dest that is not AE@host:port, or an AE title (--ae-title, pacs.allowed_calling_aets) that DICOM does not allow.",
    "LISTENER_CALLER_REJECTED": "An association from a calling AE title not in pacs.allowed_calling_aets (rejected, recorded).",
    "LISTENER_PORT_IN_USE": "A listener port that cannot be bound (in use, or privileged).",
    "LISTENER_MALFORMED": "A received object that is not a usable DICOM instance (no SOP/series UID, undecodable); refused, recorded.",
    "LISTENER_QUEUE_FULL": "A store refused because pacs.max_queue series wait for segmentation.",
    "LISTENER_DISK_FULL": "A store refused because received instances hold pacs.max_incoming_mb of disk.",
    "LISTENER_ABORTED": "An association aborted by the sender: what arrived is kept and processed when its series goes idle.",
    "LISTENER_STOPPED": "A series received but not segmented when the listener stopped; kept for the next start.",
    "DICOM_SEND_FAILED": "A result the listener could not C-STORE to --dest after its retries (the local output stays).",
    # HTTP serving (medseg serve-http)
    "REQUEST_TOO_LARGE": "An HTTP request body (or the zip it holds, unpacked) larger than --max-body-mb: answered 413.",
    "SERVER_BUSY": "More HTTP requests in progress or waiting than --queue allows: answered 503 with Retry-After.",
    "MODEL_LOADING": "An HTTP request before the model finished loading: answered 503 with Retry-After.",
}

#: Upper-case strings in medseg's code that are not error codes (environment variables, library settings).
NOT_CODES = frozenset({
    "MEDSEG_DEBUG", "MEDSEG_THREADS", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "LOCAL_RANK", "WORLD_SIZE",
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "LPS_TO_RAS",
    "MEDSEG_DICOMWEB_TOKEN", "MEDSEG_NIIVUE_JS", "CLOSED_PLANAR", "AUTOMATIC", "RTSTRUCT", "MEDSEG", "SC_CLK_TCK",
    # RT ROI Interpreted Type values (labels.<name>.rt_type in the config)
    "TREATED_VOLUME", "IRRAD_VOLUME", "CONTRAST_AGENT", "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP",
    "BRACHY_CHNL_SHLD", "DOSE_REGION",
    # the job schedulers' variables that --shard auto reads
    "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX", "MEDSEG_SHARD_COUNT",
    # turns medseg.lean_imports off
    "MEDSEG_MONAI_FULL_IMPORT",
    # environment variables that quiet LiteRT's converter and runtime
    "LITERT_TORCH_SHOW_PROGRESS", "TF_CPP_MIN_LOG_LEVEL",
    # where rasterised DICOM-study datasets are cached; RTSTRUCT and SEG vocabulary
    "MEDSEG_CACHE_DIR", "XDG_CACHE_HOME", "RTSTRUCT_SOP", "SEG_SOP", "RASTER_VERSION", "PLANE_TOLERANCE",
    "IN_PLANE_TOLERANCE", "FRACTIONAL", "BINARY", "SEG",
})


class MedsegError(Exception):
    """Base class for all user-facing medseg errors.

    Args:
        code: Stable, upper-snake-case error code, e.g. ``"CONFIG_UNKNOWN_KEY"``.
        message: What was expected and what was found.
        hint: How to fix it (optional).
    """

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def __reduce__(self):  # keep code and hint when raised in a worker process
        return (self.__class__, (self.code, self.message, self.hint))

    def one_line(self, roots: Sequence[str | os.PathLike] = ()) -> str:
        """Returns the error as a single line: ``CODE: message (hint: ...)``, scrubbed of folder names
        (:func:`scrub_paths`; paths under ``roots`` shown relative to them)."""
        text = f"{self.code}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return scrub_paths(" ".join(text.split()), roots)


class ConfigError(MedsegError):
    """Invalid, unreadable or inconsistent configuration."""


class InputError(MedsegError):
    """A missing, unreadable or invalid input file or folder."""


class DatasetError(MedsegError):
    """A dataset folder whose layout or contents are not what its description says."""


class ModelError(MedsegError):
    """A model folder that is missing, incomplete or incompatible."""


class OutputError(MedsegError):
    """An output that cannot be written safely (exists, or lies inside the input tree)."""


class TrainingError(MedsegError):
    """Training cannot continue (non-finite loss, out of memory, ...)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (the CLI turns SIGTERM into this, so both stop alike): the command records what
    is complete, then exits ``128 + signal``."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(signum)
        self.signum = signum


# a quoted path (any quotes a library puts around a file name; spaces allowed inside) and a bare absolute path
_QUOTED_PATH = re.compile(r"""(['"`])((?:[A-Za-z]:)?[^'"`\n]*[/\\][^'"`\n]*)\1""")
_BARE_PATH = re.compile(r"""(?<![\w.~$/:-])(?:~|[A-Za-z]:)?/(?:[^\s'"`:;,()\[\]{}<>]+/?)*""")


def _path_forms(path: str | os.PathLike) -> set[str]:
    forms = {str(path), os.path.abspath(path)}
    try:
        forms.add(str(Path(path).resolve()))
    except (OSError, RuntimeError):  # a link loop
        pass
    return {f.rstrip("/\\") for f in forms if f and f not in (".", "/")}


def _last_part(text: str) -> str:
    name = re.split(r"[/\\]", text.rstrip("/\\"))[-1]
    return name or "<path>"


def scrub_paths(text: str, roots: Sequence[str | os.PathLike] = (), files: Sequence[str | os.PathLike] = ()) -> str:
    """``text`` without folder names: what every message medseg records or shows passes through.

    Input folders are often named after patients (PACS exports: ``DOE^JANE_19010203/``), and third-party libraries
    put whole paths into their messages. A file in ``files`` becomes its name; a path under one of ``roots``
    becomes relative to it (``roots`` themselves become ``<input>``); any other path (quoted, or absolute) keeps only
    its last part.

    >>> scrub_paths('cannot open "/data/DOE^JANE_19010203/ct 1.nii.gz": bad gzip', roots=["/data/DOE^JANE_19010203"])
    'cannot open "ct 1.nii.gz": bad gzip'
    >>> scrub_paths("No such file: '/srv/exports/SMITH^J/x.nrrd'")
    "No such file: 'x.nrrd'"
    """
    for path in files:
        for form in sorted(_path_forms(path), key=len, reverse=True):
            text = text.replace(form, Path(path).name)
    for root in roots:
        for form in sorted(_path_forms(root), key=len, reverse=True):
            text = text.replace(form + "/", "").replace(form + "\\", "").replace(form, "<input>")
    text = _QUOTED_PATH.sub(lambda m: m.group(0) if "://" in m.group(2) else m.group(1) + _last_part(m.group(2)) + m.group(1),
                            text)
    return _BARE_PATH.sub(lambda m: _last_part(m.group(0)) if len(m.group(0)) > 1 else m.group(0), text)


def describe(exc: BaseException, *files: str | os.PathLike, roots: Sequence[str | os.PathLike] = (),
             limit: int = 300) -> str:
    """The one way a third-party exception's text enters medseg's messages and records: ``Type: first line``,
    scrubbed of paths (:func:`scrub_paths`; ``files`` become their names) and cut to ``limit`` characters.

    >>> describe(FileNotFoundError(2, "No such file or directory", "/home/DOE^JANE/scan.nii"))
    "FileNotFoundError: [Errno 2] No such file or directory: 'scan.nii'"
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return scrub_paths(text, roots, files)[:limit]


def unwrap(exc: BaseException) -> BaseException:
    """The medseg error (or allocation failure) that ``exc`` wraps, if any, else ``exc``: MONAI's ``Compose`` and
    data loaders re-raise what a transform raised as ``RuntimeError(...) from error``, which must still reach the
    user as the original coded error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (MedsegError, MemoryError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc


def require_extra(module: str, extra: str, feature: str) -> None:
    """Imports ``module`` or refuses ``feature`` naming the optional extra that provides it.

    Raises:
        ConfigError: ``EXTRA_MISSING``.
    """
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError("EXTRA_MISSING", f"{feature} needs the {module.split('.')[0]} package ({describe(exc)})",
                          f"pip install 'medseg[{extra}]'") from None


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`Path` when it is a regular, readable file.

    Raises:
        InputError: ``PATH_NOT_FOUND`` when nothing is there; ``INPUT_UNREADABLE`` for a broken symbolic link, a
            link loop, a folder, device, pipe or socket, or a file this process may not read.
    """
    import stat

    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        if p.is_symlink():
            raise InputError("INPUT_UNREADABLE", f"{what} {p.name} is a broken symbolic link",
                             "restore the file it points to, or remove the link") from None
        raise InputError("PATH_NOT_FOUND", f"{what} not found: {p.name}", "check the path") from None
    except OSError as exc:
        raise InputError("INPUT_UNREADABLE", f"{what} {p.name} cannot be opened: {describe(exc, p)}",
                         "a symbolic link loop or an unreachable mount?") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
        raise InputError("INPUT_UNREADABLE", f"{what} {p.name} is {kind}", "give an image file")
    if not os.access(p, os.R_OK):
        raise InputError("INPUT_UNREADABLE", f"{what} {p.name} cannot be read (permission denied)",
                         "check the file's permissions")
    return p


def from_os_error(exc: OSError, name: str | None = None) -> MedsegError:
    """An ``OSError`` met while writing ``name`` (default: the error's own file name), as the coded error a user
    can act on (``DISK_FULL``, ``OUTPUT_NOT_WRITABLE``, ``OUTPUT_IS_FILE``; anything else ``OUTPUT_NOT_WRITABLE``
    with the system's reason). Only the file's name is shown."""
    import errno

    name = name or (Path(str(exc.filename)).name if getattr(exc, "filename", None) else "output")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return OutputError("DISK_FULL", f"no space left writing {name}",
                           "free disk space (or raise the quota), then rerun with --resume to keep what is complete")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return OutputError("OUTPUT_IS_FILE", f"cannot write {name}: {os.strerror(exc.errno).lower()}",
                           "-o must name a folder (or a new file) where no file or folder of that name is in the way")
    if exc.errno == errno.ENOMEM:
        return MedsegError("OUT_OF_MEMORY", f"out of memory writing {name}", "free memory or use a smaller input")
    reason = os.strerror(exc.errno).lower() if exc.errno else describe(exc)
    return OutputError("OUTPUT_NOT_WRITABLE", f"cannot write {name}: {reason}",
                       "choose an output folder on a writable disk where you have write permission")


def require_exists(path: str | object, what: str) -> None:
    """Raises :class:`InputError` ``PATH_NOT_FOUND`` when ``path`` does not exist.

    Args:
        path: A filesystem path.
        what: What the path was supposed to be, e.g. ``"dataset folder"``.

    Raises:
        InputError: With code ``PATH_NOT_FOUND``.
    """
    from pathlib import Path

    p = Path(str(path))
    if not p.exists():
        if p.is_symlink():
            raise InputError("INPUT_UNREADABLE", f"{what} {p.name} is a broken symbolic link",
                             "restore the file it points to, or remove the link")
        raise InputError("PATH_NOT_FOUND", f"{what} not found: {p}", "check the path and the current directory")


def catalogue_markdown() -> str:
    """``docs/errors.md``: every code with its meaning, grouped as in :data:`CODES`."""
    lines = ["# Error codes", "", "Every error medseg reports carries one of these stable codes: the CLI prints "
             "`error: CODE: message (hint: ...)` and exits with 2 (3 for `INTERNAL_ERROR`); per-case failures are recorded with their code in "
             "`manifest.json`. Generated from `medseg/errors.py` (`python -m medseg.errors > docs/errors.md`).", "",
             "| code | meaning |", "| --- | --- |"]
    lines += [f"| `{code}` | {meaning} |" for code, meaning in CODES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(catalogue_markdown(), end="")
