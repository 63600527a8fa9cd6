"""params.yaml checks: every malformed file fails with one line naming the key."""

from pathlib import Path

import pytest
import yaml

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.evaluate import EvaluateParams
from serving_optimiser.pipeline.params import load_params, section
from serving_optimiser.pipeline.train import TrainParams

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_section_parses_through_its_stage():
    """The shipped params.yaml is what each stage accepts (not what its values are)."""
    from serving_optimiser.graph_transforms.catalogue import check_transforms
    from serving_optimiser.graph_transforms.parser import parse_transforms
    from serving_optimiser.pipeline.evaluate import peers_section
    from serving_optimiser.pipeline.latency import LatencyParams

    params = load_params(ROOT / "params.yaml")
    TrainParams.from_section(section(params, "train"))
    EvaluateParams.from_section(section(params, "evaluate"))
    LatencyParams.from_section(section(params, "latency"))
    assert peers_section(params).variants
    for variant, transforms in section(params, "optimise").items():
        parsed = parse_transforms(" ".join(transforms))
        assert parsed, variant
        check_transforms(parsed)


TRAIN = {"hidden_units": [8], "learning_rate": 0.05, "batch_size": 10, "epochs": 2, "seed": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": None}, "missing key 'train.epochs'"),
        ({"epochs": "ten"}, "'train.epochs' must be int, got 'ten'"),
        ({"epochs": 0}, "'train.epochs' must be positive"),
        ({"hidden_units": [8, "x"]}, r"'train.hidden_units\[1\]' must be int"),
        ({"hidden_units": []}, "'train.hidden_units' must not be empty"),
        ({"learning_rate": True}, "'train.learning_rate' must be float"),
    ],
    ids=["missing", "wrong-type", "not-positive", "bad-list-item", "empty-list", "bool-not-number"],
)
def test_bad_train_params(change, message):
    values = {**TRAIN, **change}
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(UserError, match=message):
        TrainParams.from_section(values)


def test_unreadable_and_malformed_yaml(tmp_path):
    with pytest.raises(UserError, match="cannot read params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_params(bad)
    bad.write_text(yaml.safe_dump({"prepare": {}}))
    with pytest.raises(UserError, match="missing section 'train'"):
        section(load_params(bad), "train")
