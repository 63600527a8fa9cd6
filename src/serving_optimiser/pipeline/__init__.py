"""The reproducible pipeline's stage logic (the Iris model by default, or your own SavedModel: the
``model`` section of params.yaml): prepare, train, export, model, freeze, calibrate, optimise,
convert, evaluate, latency, report. The scripts in ``scripts/`` are thin wrappers around these
modules; parameters are resolved in :mod:`serving_optimiser.pipeline.params`."""
