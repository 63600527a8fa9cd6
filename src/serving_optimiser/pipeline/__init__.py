"""The reproducible Iris pipeline's stage logic: prepare, train, export, freeze, optimise,
convert and evaluate. The scripts in ``scripts/`` are thin wrappers around these modules."""
