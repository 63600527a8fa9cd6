"""Shared values for the pipeline tests: the data file and tiny training params."""

from pathlib import Path

from serving_optimiser.pipeline.train import TrainParams

ROOT = Path(__file__).resolve().parents[1]
IRIS = ROOT / "data" / "iris.csv"
TINY = TrainParams(hidden_units=[16, 16], learning_rate=0.05, batch_size=50, epochs=30, seed=19830610)
