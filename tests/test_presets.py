import pytest

from medseg.config import load_config, preset_names
from medseg.models import build_model


def test_the_documented_presets_exist():
    assert {"demo", "smoke", "organ3d_unet", "lesion2d_unetpp", "mr3d_unet"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name: str):
    cfg = load_config(name)
    assert cfg.model.name in ("unet", "unetpp")


def test_preset_choices():
    organ, mr, lesion = load_config("organ3d_unet"), load_config("mr3d_unet"), load_config("lesion2d_unetpp")
    assert organ.data.intensity.scheme == "ct" and organ.data.spacing is None  # planned
    assert mr.data.intensity.scheme == "zscore"
    assert lesion.model.name == "unetpp" and lesion.model.deep_supervision and lesion.data.clahe.enabled
    assert lesion.augment.elastic_prob > 0 and lesion.augment.colour_prob > 0
    net = build_model(lesion.model.model_copy(update={"channels": (4, 4, 8, 8, 8), "strides": (2, 2, 2, 2)}), 2, 3, 2)
    assert net is not None
