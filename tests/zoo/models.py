"""Temporary: moved to model_builders.zoo; removed once its last importer moves."""

from model_builders.zoo import *  # noqa: F403
