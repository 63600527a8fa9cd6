"""Temporary: moved to model_builders.int8_models; removed once its last importer moves."""

from model_builders.int8_models import *  # noqa: F403
