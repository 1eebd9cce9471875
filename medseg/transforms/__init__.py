"""MONAI transform pipelines built from the run configuration."""
