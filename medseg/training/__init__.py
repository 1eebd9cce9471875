"""Training: ``fit(cfg, run_dir)``."""
