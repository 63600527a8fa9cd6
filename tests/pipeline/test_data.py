"""Reading, checking and splitting the Iris data."""

from pathlib import Path

import numpy as np
import pytest

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.data import (
    FEATURE_NAMES,
    LABEL_VOCABULARY,
    features_and_labels,
    read_iris_csv,
    sample_around,
    stratified_split,
)

IRIS = Path(__file__).resolve().parents[2] / "data" / "iris.csv"
HEADER = "sepal_length,sepal_width,petal_length,petal_width,species\n"


def test_shipped_data_is_the_classic_iris_set():
    frame = read_iris_csv(IRIS)
    assert len(frame) == 150
    assert frame["species"].value_counts().to_dict() == {"setosa": 50, "versicolor": 50, "virginica": 50}
    assert frame["sepal_length"].min() == pytest.approx(4.3)
    assert frame["petal_width"].max() == pytest.approx(2.5)


def test_split_is_stratified_seeded_and_disjoint():
    frame = read_iris_csv(IRIS)
    train, evaluation = stratified_split(frame, 0.2, seed=19830610)
    again_train, _ = stratified_split(frame, 0.2, seed=19830610)
    other_train, _ = stratified_split(frame, 0.2, seed=1)
    assert len(train) == 120 and len(evaluation) == 30
    assert evaluation["species"].value_counts().to_dict() == {"setosa": 10, "versicolor": 10, "virginica": 10}
    assert train.equals(again_train)
    assert not train.equals(other_train)
    rows = lambda f: set(map(tuple, f.to_numpy().tolist()))  # noqa: E731
    assert len(rows(train) & rows(evaluation)) <= 1  # the data set has one duplicated row


def test_labels_follow_the_notebook_vocabulary():
    frame = read_iris_csv(IRIS)
    features, labels = features_and_labels(frame)
    assert LABEL_VOCABULARY == ["setosa", "virginica", "versicolor"]
    assert labels[0] == 0 and labels[-1] == 1  # first row setosa, last row virginica
    assert set(features) == set(FEATURE_NAMES)
    assert features["sepal_length"].dtype == np.float32


def test_sample_around_is_seeded_and_covers_the_classes():
    frame = read_iris_csv(IRIS)
    batch = sample_around(frame, 1000, seed=7)
    assert batch["petal_length"].shape == (1000,)
    np.testing.assert_array_equal(batch["petal_length"], sample_around(frame, 1000, seed=7)["petal_length"])
    assert batch["petal_length"].min() < 2 and batch["petal_length"].max() > 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("a,b,c\n1,2,3\n", "header must be"),
        (HEADER, "no data rows"),
        (HEADER + "5.1,3.5,1.4,0.2,setosa\n4.9,abc,1.4,0.2,setosa\n", "row 3: sepal_width='abc' is not a number"),
        (HEADER + "5.1,3.5,1.4,0.2,setosa\n4.9,3.0,1.4,0.2,daisy\n", "row 3: species='daisy' is not one of"),
        (HEADER + "5.1,3.5,1.4,,setosa\n", "row 2: petal_width='' is not a number"),
    ],
    ids=["empty-file", "bad-header", "no-rows", "non-numeric", "unknown-species", "missing-value"],
)
def test_malformed_data_is_reported_with_file_and_row(tmp_path, content, message):
    path = tmp_path / "iris.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        read_iris_csv(path)
    assert str(path) in str(error.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_iris_csv(tmp_path / "nope.csv")
