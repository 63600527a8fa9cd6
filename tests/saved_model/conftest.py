"""Session fixtures: the SavedModels of ``saved_model.models``, each built once into a temporary
directory."""

from __future__ import annotations

import pytest
from saved_model.models import (
    build_keras_cnn,
    build_module,
    build_reads_a_file,
    build_tf1_iris,
    build_tf1_vocabulary_asset,
    build_wide_mlp,
)


def _built(models_dir, name, builder, *args):
    path = models_dir / name
    if not path.exists():
        builder(str(path), *args)
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("saved_models")


@pytest.fixture(scope="session")
def keras_cnn(models_dir):
    return _built(models_dir, "keras_cnn", build_keras_cnn)


@pytest.fixture(scope="session")
def tf1_iris(models_dir):
    return _built(models_dir, "tf1_iris", build_tf1_iris)


@pytest.fixture(scope="session")
def tf1_vocabulary(models_dir, tmp_path_factory):
    return _built(models_dir, "tf1_vocabulary", build_tf1_vocabulary_asset, str(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="session")
def multi_signature_module(models_dir):
    return _built(models_dir, "module", build_module)


@pytest.fixture(scope="session")
def reads_a_file(models_dir):
    return _built(models_dir, "reads_a_file", build_reads_a_file)


@pytest.fixture(scope="session")
def wide_mlp(models_dir):
    return _built(models_dir, "wide_mlp", build_wide_mlp)


@pytest.fixture(scope="session")
def mixed_scale_wide_deep(models_dir):
    from saved_model.models import build_mixed_scale_wide_deep

    return _built(models_dir, "mixed_scale_wide_deep", build_mixed_scale_wide_deep)


@pytest.fixture(scope="session")
def output_kinds_module(models_dir):
    from saved_model.models import build_output_kinds_module

    return _built(models_dir, "output_kinds_module", build_output_kinds_module)
