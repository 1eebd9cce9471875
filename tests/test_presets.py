import pytest

from medseg.config import load_config, preset_names
from medseg.models import build_model


def test_the_documented_presets_exist():
    assert {"demo", "smoke", "organ3d_unet", "lesion2d_unetpp", "mr3d_unet", "organ3d_resenc", "lesion2d_segformer"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name: str):
    from medseg.models import MODELS

    cfg = load_config(name)
    assert cfg.model.name in MODELS.names()


def test_preset_choices():
    organ, mr, lesion = load_config("organ3d_unet"), load_config("mr3d_unet"), load_config("lesion2d_unetpp")
    assert organ.data.intensity.scheme == "ct" and organ.data.spacing is None  # planned
    assert mr.data.intensity.scheme == "zscore"
    assert lesion.model.name == "unetpp" and lesion.model.deep_supervision and lesion.data.clahe.enabled
    assert lesion.augment.elastic_prob > 0 and lesion.augment.colour_prob > 0
    net = build_model(lesion.model.model_copy(update={"channels": (4, 4, 8, 8, 8), "strides": (2, 2, 2, 2)}), 2, 3, 2)
    assert net is not None


def test_new_network_presets():
    """organ3d_resenc is nnU-Net's ResEnc L (its GPU plan: 24 GB, 32..320 features) with deep supervision;
    lesion2d_segformer is SegFormer-B0 on RGB; both build at their plan's depth."""
    from medseg.models.resenc import plan_hints

    resenc, segformer = load_config("organ3d_resenc"), load_config("lesion2d_segformer")
    assert resenc.model.name == "resenc_unet" and resenc.model.size == "L" and resenc.model.deep_supervision
    assert plan_hints(resenc.model, 3) == {"gpu_memory_gb": 24.0, "base_channels": 32, "max_channels": 320}
    assert segformer.model.name == "segformer" and segformer.model.size == "b0" and segformer.data.intensity.scheme == "rgb"
    net = build_model(segformer.model.model_copy(update={"channels": (4,) * 6, "strides": (2,) * 5}), 2, 3, 2)
    assert net is not None
