"""Deployment: exported model folders (ONNX, TorchScript) with parity checks."""
