"""Networks from a registry: ``build_model(cfg.model, spatial_dims, in_channels, out_channels)``; the network
modules (:data:`medseg.models.registry.BUILTIN`) are imported when the registry is first read."""

from medseg.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
