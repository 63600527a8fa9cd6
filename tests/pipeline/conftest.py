import pytest
from pipeline_helpers import IRIS, TINY

from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv, stratified_split


@pytest.fixture(scope="session")
def iris_split():
    return stratified_split(read_iris_csv(IRIS), 0.2, seed=19830610)


@pytest.fixture(scope="session")
def tiny_trained(iris_split):
    from serving_optimiser.pipeline.train import dense_weights, train_model

    features, labels = features_and_labels(iris_split[0])
    model, history = train_model(features, labels, TINY, n_classes=3)
    return model, dense_weights(model), history


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_trained):
    from serving_optimiser.pipeline.export import export_saved_model

    directory = tmp_path_factory.mktemp("export") / "exported"
    export_saved_model(tiny_trained[1], directory)
    return directory


@pytest.fixture(scope="session")
def tiny_samples(tmp_path_factory, iris_split, tiny_export):
    """The model stage's directory (data/samples) for the tiny export and the Iris split."""
    from serving_optimiser.pipeline.data import LABEL_VOCABULARY
    from serving_optimiser.pipeline.model import write_samples
    from serving_optimiser.pipeline.params import ModelSection

    prepared = tmp_path_factory.mktemp("prepared")
    iris_split[0].to_csv(prepared / "train.csv", index=False)
    iris_split[1].to_csv(prepared / "eval.csv", index=False)
    model = ModelSection("iris", tiny_export, "predict", prepared, None, None, 0.5, 7, "params.yaml")
    out = tmp_path_factory.mktemp("samples") / "samples"
    write_samples(model, LABEL_VOCABULARY, out)
    return out
