"""Temporary: moved to model_builders.sample_graphs; removed once its last importer moves."""

from model_builders.sample_graphs import *  # noqa: F403
