"""Segmentation metrics and folder evaluation."""
