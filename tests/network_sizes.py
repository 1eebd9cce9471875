"""The smallest sensible network of each registered model (``--set`` overrides of the smoke preset), shared by the
model tests."""

SMALL = {
    "unet": ["model.channels=[4, 8]", "model.strides=[2]"],
    "dynunet": ["model.channels=[4, 8, 8]", "model.strides=[2, 2]"],
    "unetpp": ["model.channels=[4, 4, 8, 8, 8]", "model.strides=[2, 2, 2, 2]"],
    "segresnet": ["model.channels=[4, 8, 16]", "model.strides=[2, 2]"],
    "swinunetr": ["model.channels=[12, 24, 48, 96, 192, 384]", "model.strides=[2, 2, 2, 2, 2]"],
}
