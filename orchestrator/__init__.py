"""Distributed compression of Hugging Face models on Ray, measured and logged to MLflow."""

__version__ = "0.1.0"
