"""Networks from a registry: ``build_model(cfg.model, spatial_dims, in_channels, out_channels)``."""

from medseg.models import deeplabv3 as _deeplabv3  # noqa: F401  (registers "deeplabv3")
from medseg.models import dynunet as _dynunet  # noqa: F401  (registers "dynunet")
from medseg.models import resenc as _resenc  # noqa: F401  (registers "resenc_unet")
from medseg.models import segformer as _segformer  # noqa: F401  (registers "segformer")
from medseg.models import segresnet as _segresnet  # noqa: F401  (registers "segresnet")
from medseg.models import smp as _smp  # noqa: F401  (registers "smp")
from medseg.models import swinunetr as _swinunetr  # noqa: F401  (registers "swinunetr")
from medseg.models import unet as _unet  # noqa: F401  (registers "unet")
from medseg.models import unetpp as _unetpp  # noqa: F401  (registers "unetpp")
from medseg.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
