"""The smallest sensible network of each registered model (``--set`` overrides of the smoke preset), shared by the
model tests, and which entries this environment can build.

Networks built from torchvision (``smp``, ``deeplabv3``) cannot run beside the CPU build of torch that ``make test``
installs here (no CPU torchvision wheel is reachable; PyPI's is built for CUDA torch). Their tests skip there and run
under ``make test-torchvision`` (a CUDA build of torch with its torchvision, as a GPU user installs), where
``MEDSEG_REQUIRE_ALL_NETWORKS=1`` turns a skip into a failure; CI runs both.
"""

import os

import pytest

SMALL = {
    "unet": ["model.channels=[4, 8]", "model.strides=[2]"],
    "dynunet": ["model.channels=[4, 8, 8]", "model.strides=[2, 2]"],
    "unetpp": ["model.channels=[4, 4, 8, 8, 8]", "model.strides=[2, 2, 2, 2]"],
    "segresnet": ["model.channels=[4, 8, 16]", "model.strides=[2, 2]"],
    "swinunetr": ["model.channels=[12, 24, 48, 96, 192, 384]", "model.strides=[2, 2, 2, 2, 2]"],
    "resenc_unet": ["model.channels=[4, 8, 8]", "model.strides=[2, 2]"],  # size null = cpu blocks (1, 2, 2)
    "segformer": ["model.channels=[4, 4, 4, 4, 4, 4]", "model.strides=[2, 2, 2, 2, 2]"],  # size null = b0; channels unread
    "smp": ["model.channels=[4, 4, 4, 4, 4, 4]", "model.strides=[2, 2, 2, 2, 2]", "model.encoder=tu-mobilenetv3_small_050"],
    "deeplabv3": ["model.channels=[4, 4, 4, 4, 4]", "model.strides=[2, 2, 2, 2]", "model.encoder=mobilenet_v3_large"],
}


def dims_of(name: str) -> tuple[int, ...]:
    """The spatial dimensions a registry entry supports (its :class:`~medseg.models.registry.NetworkSpec`)."""
    from medseg.models.registry import spec_of

    return spec_of(name).dims


def needs(name: str) -> pytest.MarkDecorator:
    """Skips a test of an entry whose package does not import here, unless MEDSEG_REQUIRE_ALL_NETWORKS=1."""
    from medseg.models.registry import missing_package

    missing = missing_package(name)
    return pytest.mark.skipif(missing is not None and os.environ.get("MEDSEG_REQUIRE_ALL_NETWORKS") != "1",
                              reason=f"{name} needs {missing}, which does not import here: run `make test-torchvision`")


def entries(names=None) -> list:
    """``(name, dims)`` parameters over every registry entry and the dimensions it supports, with :func:`needs`."""
    from medseg.models import MODELS

    return [pytest.param(n, d, marks=needs(n), id=f"{n}-{d}") for n in (names or MODELS.names()) for d in dims_of(n)]
