"""Inference: ``Predictor.from_model_dir(dir).predict(volume)`` and the folder runner."""
