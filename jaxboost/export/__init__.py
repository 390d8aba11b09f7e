"""Trained jaxboost models out, in the layouts the PyTorch originals load (one file per model)."""
