"""Optimise TensorFlow SavedModels for serving: the Graph Transform Tool on TensorFlow 2, and
the freeze / transform / convert / evaluate steps of the reproducible Iris pipeline."""

__version__ = "0.1.0"
