"""What decides the preprocessed arrays a network reads, without MONAI (prediction with an exported model checks
it without importing MONAI; :mod:`medseg.transforms.pipeline` re-exports these names)."""

from __future__ import annotations

from medseg.config import Config
from medseg.plan.planner import Plan

IMAGE, LABEL = "image", "label"


def config_identity(cfg: Config) -> dict:
    """The configured preprocessing (spacing, intensity scheme and window, CLAHE)."""
    return {
        "spacing": [round(float(s), 4) for s in cfg.data.spacing] if cfg.data.spacing else None,
        "intensity": cfg.data.intensity.model_dump(mode="json"),
        "clahe": cfg.data.clahe.model_dump(mode="json"),
    }


def preprocessing_identity(cfg: Config, plan: Plan) -> dict:
    """Everything that decides the preprocessed arrays a network reads: the configured preprocessing and the planned
    normalisation with its dataset statistics. The one definition: the training cache is keyed by it
    (:func:`preprocessing_hash`), distillation requires teachers and student to share it, an ensemble normalises
    once when its members share it."""
    import json

    return {
        **config_identity(cfg),
        "normalization": list(plan.normalization),
        "intensity_statistics": json.loads(json.dumps(plan.intensity, sort_keys=True, default=float)),
    }


def preprocessing_hash(cfg: Config, plan: Plan) -> str:
    """Short hash of :func:`preprocessing_identity`, the plan and medseg's version (what keys the training cache)."""
    import medseg
    from medseg.fsutil import json_hash

    return json_hash({**preprocessing_identity(cfg, plan), "plan": plan.hash(), "medseg": medseg.__version__})
