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
    from serving_optimiser.pipeline.entries import ModelEntry, model_names, peers_section
    from serving_optimiser.pipeline.latency import LatencyParams
    from serving_optimiser.pipeline.params import PipelineParams

    params = load_params(ROOT / "params.yaml")
    TrainParams.from_section(section(params, "train"))
    EvaluateParams.from_section(section(params, "evaluate"))
    LatencyParams.from_section(section(params, "latency"))
    resolved = PipelineParams(params, ROOT / "params.yaml")
    assert peers_section(resolved).variants
    assert resolved.model().source == "iris" and resolved.model().signature == "predict"
    assert ModelEntry.find(resolved, "int8").needs_onednn and not ModelEntry.find(resolved, "lossless").needs_onednn
    assert model_names(resolved)[:3] == ["auto", "int8", "int8_dynamic"]
    for variant in section(params, "optimise"):
        parsed = parse_transforms(" ".join(resolved.transforms(variant)))
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


def broken(name, key=None, value=None):
    def change(params):
        if key is None:
            params.pop(name)
        else:
            params[name][key] = value
    return change


@pytest.mark.parametrize(
    ("reader", "change", "expected"),
    [
        ("train", broken("train", "epochs", 0), "'train.epochs' must be positive"),
        ("evaluate", broken("evaluate", "tolerances", {"agreement": 1.5}),
         "'evaluate.tolerances.agreement' = 1.5 must be a fraction in [0, 1]"),
        ("evaluate", broken("evaluate", "tolerances", {"accuracy": 0.9}), "'evaluate.tolerances.accuracy' is unknown"),
        ("evaluate", broken("evaluate", "stop_on_gate_failure", "sometimes"),
         "'evaluate.stop_on_gate_failure' = 'sometimes' must be one of auto, true, false"),
        ("evaluate", broken("evaluate", "min_class_agreement", 0.99), "unknown key(s) evaluate.min_class_agreement"),
        ("evaluate", broken("evaluate", "signature", "predict"), "unknown key(s) evaluate.signature"),
        ("latency", broken("latency", "repeats", 2), "'latency.repeats' must be at least 5"),
        ("label_vocabulary", broken("data", "label_vocabulary", ["a", "a"]), "lists a label twice"),
        ("model", broken("model"), "missing section 'model'"),
        ("model", broken("model", "eval_fraction", 1.5), "'model.eval_fraction' = 1.5 must be between 0 and 1"),
        ("variants", broken("optimise", "my variant", ["fold_constants"]), "is not a valid variant name"),
    ],
    ids=["train", "evaluate-tolerance-range", "evaluate-tolerance-name", "evaluate-stop", "evaluate-removed-key",
         "evaluate-old-key", "latency", "vocabulary", "model-missing", "model-fraction", "variants"],
)
def test_every_reader_names_the_file_it_read(tmp_path, reader, change, expected):
    """--params may point anywhere: the error names that file, not a hard-coded params.yaml."""
    from serving_optimiser.pipeline.params import PipelineParams

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    change(data)
    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        getattr(PipelineParams.load(path), reader)()
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
