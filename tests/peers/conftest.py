"""A small trained Iris model exported as the pipeline exports it, its six peer artefacts, and a
few hundred rows drawn around the data to compare them on."""

import pytest
from peers_helpers import PEER_MODEL, SPECS
from pipeline_helpers import IRIS

from serving_optimiser.pipeline.data import LABEL_VOCABULARY, features_and_labels, read_iris_csv, sample_around


@pytest.fixture(scope="session")
def peer_split():
    from serving_optimiser.pipeline.data import stratified_split

    return stratified_split(read_iris_csv(IRIS), 0.2, seed=19830610)


@pytest.fixture(scope="session")
def train_features(peer_split):
    return features_and_labels(peer_split[0])[0]


@pytest.fixture(scope="session")
def compare_rows(peer_split):
    return sample_around(peer_split[1], 300, seed=7)


@pytest.fixture(scope="session")
def peer_export(tmp_path_factory, peer_split, train_features):
    from serving_optimiser.pipeline.export import export_saved_model
    from serving_optimiser.pipeline.train import dense_weights, train_model

    _, labels = features_and_labels(peer_split[0])
    model, _ = train_model(train_features, labels, PEER_MODEL, n_classes=3)
    directory = tmp_path_factory.mktemp("peers") / "exported"
    export_saved_model(dense_weights(model), directory)
    return directory


@pytest.fixture(scope="session")
def peer_samples(tmp_path_factory, peer_split, peer_export):
    """The model stage's directory for the small export (its predict signature, as the pipeline's)."""
    from serving_optimiser.pipeline.model import write_samples
    from serving_optimiser.pipeline.params import ModelSection

    prepared = tmp_path_factory.mktemp("prepared")
    peer_split[0].to_csv(prepared / "train.csv", index=False)
    peer_split[1].to_csv(prepared / "eval.csv", index=False)
    model = ModelSection("iris", peer_export, "predict", prepared, None, None, 0.5, 7, "params.yaml")
    out = tmp_path_factory.mktemp("samples") / "samples"
    write_samples(model, LABEL_VOCABULARY, out)
    return out


@pytest.fixture(scope="session")
def peer_artefacts(tmp_path_factory, peer_export, train_features):
    from serving_optimiser.peers.convert import convert_peer

    out_dir = tmp_path_factory.mktemp("peers") / "peers"
    return {
        name: convert_peer(spec, peer_export, out_dir, train_features, LABEL_VOCABULARY) for name, spec in SPECS.items()
    }


@pytest.fixture(scope="session")
def tf_predictor(peer_export):
    from serving_optimiser.peers.predictor import TFPredictor

    return TFPredictor.load(peer_export)


@pytest.fixture(scope="session")
def reference_outputs(tf_predictor, compare_rows):
    return tf_predictor(compare_rows)
