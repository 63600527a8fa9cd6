"""Each output judged by what it means: kinds inferred from real SavedModels' graphs (through
shape-only ops and the function library), each kind's metric on crafted arrays, verdicts at the
tolerance boundaries, the override, and the command's report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from saved_model.models import DESTRUCTIVE, LOSSLESS, OUTPUT_KINDS, output_kinds_inputs

from serving_optimiser.cli.optimise_saved_model import main
from serving_optimiser.saved_model import SavedModelError, compare_saved_models, freeze_saved_model
from serving_optimiser.saved_model.compare import compare_outputs, failing_outputs
from serving_optimiser.saved_model.output_kinds import (
    DEFAULT_TOLERANCES,
    GROSS_TOLERANCES,
    class_agreement,
    infer_output_kinds,
    judge,
    label_agreement,
    multi_label_flips,
    parse_output_kinds,
    regression_errors,
)
from serving_optimiser.saved_model.reader import read_meta_graph, signature_info_from_proto

# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def _outputs(signature) -> dict[str, tuple[str, str]]:
    return {name: (info.name, info.dtype) for name, info in signature.outputs.items()}


def test_kinds_from_the_saved_models_graph_through_calls_and_shape_only_ops(output_kinds_module):
    meta_graph = read_meta_graph(str(output_kinds_module))
    signature = signature_info_from_proto("serving_default", meta_graph.signature_def["serving_default"])
    # TF 2's signature is a StatefulPartitionedCall into the library; the Sigmoid is one call deeper.
    assert meta_graph.graph_def.library.function
    assert infer_output_kinds(meta_graph.graph_def, _outputs(signature)) == OUTPUT_KINDS


def test_kinds_from_the_frozen_graph_are_the_same(output_kinds_module):
    frozen = freeze_saved_model(output_kinds_module)
    assert infer_output_kinds(frozen.graph_def, _outputs(frozen.signatures["serving_default"])) == OUTPUT_KINDS


def test_tf1_export_logits_are_classes_because_an_argmax_reads_them(tf1_iris):
    meta_graph = read_meta_graph(str(tf1_iris))
    signature = signature_info_from_proto("predict", meta_graph.signature_def["predict"])
    assert infer_output_kinds(meta_graph.graph_def, _outputs(signature)) == {
        "class_ids": ("label", "dtype int64"),
        "classes": ("label", "dtype string"),
        "logits": ("class", "BiasAdd read by ArgMax"),  # through the dnn/head/logits Identity
        "probabilities": ("class", "Softmax"),
    }


def _graph(text: str):
    from google.protobuf import text_format
    from tensorflow.core.framework import graph_pb2

    return text_format.Parse(text, graph_pb2.GraphDef())


CAST_GRAPH = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "probability" op: "Sigmoid" input: "x" }
node { name: "as_double" op: "Cast" input: "probability"
       attr { key: "SrcT" value { type: DT_FLOAT } } attr { key: "DstT" value { type: DT_DOUBLE } } }
node { name: "as_int_then_float" op: "Cast" input: "as_int"
       attr { key: "SrcT" value { type: DT_INT32 } } attr { key: "DstT" value { type: DT_FLOAT } } }
node { name: "as_int" op: "Cast" input: "probability"
       attr { key: "SrcT" value { type: DT_FLOAT } } attr { key: "DstT" value { type: DT_INT32 } } }
node { name: "unread_argmax_input" op: "Relu" input: "x" }
node { name: "call_of_nothing" op: "PartitionedCall" input: "probability"
       attr { key: "f" value { func { name: "not_in_the_library" } } } }
"""


@pytest.mark.parametrize(
    ("tensor", "dtype", "expected"),
    [
        ("as_double:0", "float64", ("multi_label", "Sigmoid")),
        ("as_int:0", "int32", ("label", "dtype int32")),
        # Through an integer the values are rounded: no longer the Sigmoid's probabilities.
        ("as_int_then_float:0", "float32", ("regression", "Cast")),
        ("x:0", "float32", ("regression", "Placeholder")),
        ("unread_argmax_input:0", "float32", ("regression", "Relu")),  # no ArgMax in the graph
        ("missing:0", "float32", ("regression", "producer not found")),
        ("call_of_nothing:0", "float32", ("regression", "PartitionedCall")),  # no function to look into
    ],
    ids=["float_cast_looked_through", "int_dtype", "int_cast_stops", "placeholder", "no_argmax", "missing_node",
         "call_without_function"],
)
def test_casts_and_plain_graphs(tensor, dtype, expected):
    assert infer_output_kinds(_graph(CAST_GRAPH), {"out": (tensor, dtype)}) == {"out": expected}


# --------------------------------------------------------------------------------------------
# Metrics on crafted arrays
# --------------------------------------------------------------------------------------------


def test_class_agreement_is_argmax_over_the_last_axis():
    original = np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    converted = np.array([[0.2, 0.8], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])  # values move, one class flips
    assert class_agreement(original, converted) == 0.75
    per_frame = np.zeros((2, 5, 3))
    per_frame[..., 0] = 1.0
    moved = per_frame.copy()
    moved[1, 4] = [0.0, 0.0, 1.0]
    assert class_agreement(per_frame, moved) == 0.9  # 1 of 10 (row, frame) positions


def test_label_agreement_counts_elements():
    assert label_agreement(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 5]])) == 0.75
    assert label_agreement(np.array([b"cat", b"dog"], object), np.array([b"cat", b"cat"], object)) == 0.5


def test_multi_label_flips_over_positives_and_over_all():
    original = np.zeros((4, 5))
    original[0, :3] = original[1, :3] = original[2, :2] = 0.9  # 8 positives of 20
    original[3, 0] = 0.5  # exactly 0.5 is not positive
    converted = original.copy()
    converted[0, 0] = 0.49  # a positive lost
    converted[3, 1] = 0.51  # a negative gained
    converted[1, 1] = 0.6  # moved, still positive: no flip
    assert multi_label_flips(original, converted) == (2 / 8, 2 / 20)


def test_multi_label_without_positives_is_judged_on_all_elements():
    original, converted = np.full((10, 10), 0.1), np.full((10, 10), 0.1)
    assert multi_label_flips(original, converted) == (None, 0.0)
    converted[0, 0] = 0.9
    assert multi_label_flips(original, converted) == (None, 0.01)
    judgement = judge("multi_label", original, converted)
    assert judgement.checks[0].value is None and judgement.checks[0].passed
    assert judgement.verdict == "fail"  # 0.01 of all elements > 0.005


def test_regression_errors_are_over_the_originals_range():
    original = np.array([[2.0, 4.0], [6.0, 12.0]])  # range 10, not its max of 12
    converted = np.array([[2.0, 4.0], [6.5, 12.0]])  # one |diff| of 0.5
    rms, largest = regression_errors(original, converted)
    assert rms == pytest.approx(0.25 / 10, rel=1e-12)  # sqrt(0.5**2 / 4) = 0.25
    assert largest == pytest.approx(0.05, rel=1e-12)


@pytest.mark.parametrize(
    ("original", "converted", "expected"),
    [
        (np.array([3.0, 3.0]), np.array([3.0, 3.3]), 0.1),  # constant: its magnitude is the scale
        (np.zeros(2), np.array([0.0, 0.2]), 0.2),  # all zeros: an absolute error
        (np.array([0.0, 1.0, np.nan]), np.array([0.0, 1.0, np.nan]), 0.0),  # NaN where the original has it
        (np.array([0.0, 1.0, 2.0]), np.array([0.0, np.nan, 2.0]), np.inf),  # a NaN appears
    ],
    ids=["constant_output", "zero_output", "same_nan", "new_nan"],
)
def test_regression_edge_cases(original, converted, expected):
    assert regression_errors(original, converted)[1] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Verdicts at the tolerance boundaries
# --------------------------------------------------------------------------------------------


def _classes_with_flips(rows: int, flips: int) -> tuple[np.ndarray, np.ndarray]:
    original = np.tile([0.9, 0.1], (rows, 1))
    converted = original.copy()
    converted[:flips] = [0.1, 0.9]
    return original, converted


def _tags_with_flips(rows: int, positives: int, flips: int) -> tuple[np.ndarray, np.ndarray]:
    original = np.zeros(rows)
    original[:positives] = 0.9
    converted = original.copy()
    converted[:flips] = 0.1  # positives lost
    return original, converted


def _regression_with_max(diff: float) -> tuple[np.ndarray, np.ndarray]:
    original = np.linspace(-50.0, 50.0, 10_001)  # range 100
    converted = original.copy()
    converted[0] += diff  # one element off: RMS = diff / 100, far under its bound
    return original, converted


@pytest.mark.parametrize(
    ("kind", "arrays", "verdict"),
    [
        ("class", _classes_with_flips(100, 1), "pass"),  # 0.99 exactly
        ("class", _classes_with_flips(100, 2), "fail"),
        ("label", (np.arange(100), np.r_[np.arange(99), -1]), "pass"),
        ("label", (np.arange(100), np.r_[np.arange(98), -1, -1]), "fail"),
        ("multi_label", _tags_with_flips(1000, 50, 1), "pass"),  # 1/50 = 0.02 of positives, 0.001 of all
        ("multi_label", _tags_with_flips(1000, 50, 2), "fail"),  # 0.04 of positives
        ("multi_label", _tags_with_flips(200, 150, 1), "pass"),  # 0.0067 of positives, 0.005 of all
        ("multi_label", _tags_with_flips(200, 150, 2), "fail"),  # 0.013 of positives passes, 0.01 of all fails
        ("regression", _regression_with_max(5.0), "pass"),  # max 0.05 of range exactly
        ("regression", _regression_with_max(5.001), "fail"),
    ],
    ids=["class_at_bound", "class_under", "label_at_bound", "label_under", "tags_at_bound", "tags_over",
         "tags_common_at_bound", "tags_common_over_all", "regression_max_at_bound", "regression_max_over"],
)
def test_default_verdicts_at_the_boundaries(kind, arrays, verdict):
    assert judge(kind, *arrays, DEFAULT_TOLERANCES).verdict == verdict


def test_regression_rms_bound():
    original = np.linspace(0.0, 100.0, 101)
    assert judge("regression", original, original + 1.0).verdict == "pass"  # RMS 0.01 and max 0.01 of range
    judgement = judge("regression", original, original + 1.01)
    assert judgement.verdict == "fail"
    assert judgement.failures() == ["rms diff of range 0.0101 is over the maximum 0.0100"]


def test_gross_tolerances_only_catch_breakage():
    half = _classes_with_flips(100, 50)
    assert judge("class", *half, DEFAULT_TOLERANCES).verdict == "fail"
    assert judge("class", *half, GROSS_TOLERANCES).verdict == "pass"  # 0.5: the gross bound
    assert judge("class", *_classes_with_flips(100, 51), GROSS_TOLERANCES).verdict == "fail"
    assert judge("regression", *_regression_with_max(40.0), GROSS_TOLERANCES).verdict == "pass"
    assert judge("regression", *_regression_with_max(60.0), GROSS_TOLERANCES).verdict == "fail"


def test_judgement_json_names_kind_metric_value_tolerance_and_verdict():
    assert judge("multi_label", *_tags_with_flips(1000, 50, 2)).to_json() == {
        "kind": "multi_label",
        "metric": "flips_of_positives",
        "value": 0.04,
        "tolerance": 0.02,
        "verdict": "fail",
        "checks": [
            {"metric": "flips_of_positives", "value": 0.04, "op": "<=", "tolerance": 0.02, "passed": False},
            {"metric": "flips_of_all", "value": 0.002, "op": "<=", "tolerance": 0.005, "passed": True},
        ],
    }


def test_class_agreement_is_gone_for_regression_and_multi_label_outputs():
    box = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.2, 0.1]])
    moved = np.array([[0.1, 0.9, 0.3, 0.2], [0.4, 0.5, 0.2, 0.1]])
    assert compare_outputs(box, moved)["class_agreement"] == 0.5  # no kind: the arrays' old guess
    assert compare_outputs(box, moved, "regression")["class_agreement"] is None
    assert compare_outputs(box, moved, "multi_label")["class_agreement"] is None
    assert compare_outputs(box, moved, "class")["class_agreement"] == 0.5


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unknown output kind 'score'"):
        judge("score", np.zeros(2), np.zeros(2))


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["box=class"], {"box": "class"}),
        (["serving_default/box = regression", "tags=multi_label"],
         {"serving_default/box": "regression", "tags": "multi_label"}),
        (["box"], "'box' is not NAME=KIND"),
        (["=class"], "'=class' is not NAME=KIND"),
        (["box=classes"], "'box=classes': unknown kind 'classes'"),
    ],
    ids=["one", "two_with_signature", "no_kind", "no_name", "unknown_kind"],
)
def test_parse_output_kinds(items, expected):
    if isinstance(expected, dict):
        assert parse_output_kinds(items) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            parse_output_kinds(items)


# --------------------------------------------------------------------------------------------
# The comparison and the command
# --------------------------------------------------------------------------------------------


def test_comparison_gives_every_output_its_kind_and_verdict(output_kinds_module):
    inputs = {"serving_default": output_kinds_inputs()}
    report = compare_saved_models(output_kinds_module, output_kinds_module, inputs,
                                  output_kind_overrides={"serving_default/box": "class", "box_rank": "regression"})
    outputs = report["serving_default"]
    overridden = {"box": ("class", "given"), "box_rank": ("regression", "given")}
    assert {name: (r["kind"], r["kind_from"]) for name, r in outputs.items()} == {**OUTPUT_KINDS, **overridden}
    assert {r["verdict"] for r in outputs.values()} == {"pass"} and failing_outputs(report) == []
    assert outputs["tags"]["metric"] == "flips_of_positives" and outputs["tags"]["inputs"] == "sample"
    assert outputs["box"]["class_agreement"] == 1.0 and outputs["scaled"]["class_agreement"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"boxes": "class"}, "output kind for 'boxes': no compared signature has that output"),
        ({"predict/box": "class"}, "output kind for 'predict/box': no compared signature"),
        ({"box": "vector"}, "output kind 'vector' for 'box' is unknown"),
    ],
    ids=["unknown_output", "unknown_signature", "unknown_kind"],
)
def test_a_bad_override_is_named(overrides, message, output_kinds_module):
    with pytest.raises(SavedModelError, match=message):
        compare_saved_models(output_kinds_module, output_kinds_module, output_kind_overrides=overrides)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "inputs.npz"
    np.savez(path, **output_kinds_inputs())
    return path


def test_command_reports_kind_metric_value_and_verdict(output_kinds_module, sample_file, tmp_path, capsys):
    code = main([str(output_kinds_module), str(tmp_path / "out"), "--transforms", LOSSLESS,
                 "--sample-inputs", str(sample_file), "--output-kind", "box=class", "--report",
                 str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert "signature 'serving_default'" in lines  # sample inputs: no note
    row = next(line for line in lines if line.startswith("  tags "))
    assert row.split()[1:3] == ["pass", "multi_label"]
    assert "flips of positives 0.00% (<= 2.00%), of all 0.00% (<= 0.50%)" in row
    assert "RMS |diff| of range 0.00% (<= 1.00%), max 0.00% (<= 5.00%)" in next(
        line for line in lines if line.startswith("  scaled "))
    assert "class agreement 100.00% (>= 99.00%)" in next(line for line in lines if line.startswith("  box "))
    assert "verdict: pass (every output within its tolerance)" in lines
    report = json.loads((tmp_path / "report.json").read_text())
    box = report["comparison"]["serving_default"]["box"]
    assert {k: box[k] for k in ("kind", "kind_from", "metric", "value", "tolerance", "verdict", "inputs")} == {
        "kind": "class", "kind_from": "given", "metric": "class_agreement", "value": 1.0, "tolerance": 0.99,
        "verdict": "pass", "inputs": "sample",
    }
    assert "max_abs_diff" in box and "within_rounding" in box
    assert report["verdict"] == "pass" and report["generated_inputs"] == []
    assert report["tolerances"]["sample"]["max_diff_of_range"] == 0.05
    assert report["tolerances"]["generated"]["agreement"] == 0.5


def test_command_on_generated_inputs_says_so_and_the_gate_holds_the_gross_tolerances(output_kinds_module, tmp_path,
                                                                                      capsys):
    """The gate is on by default: on generated inputs only the gross-breakage tolerances apply,
    and the destructive list's weights go back until they hold."""
    code = main([str(output_kinds_module), str(tmp_path / "out"), "--transforms", DESTRUCTIVE,
                 "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "signature 'serving_default' (generated inputs: only the gross-breakage tolerances apply)" in captured.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["generated_inputs"] == ["serving_default"] and report["verdict"] == "pass"
    box = report["comparison"]["serving_default"]["box"]
    assert box["inputs"] == "generated" and box["checks"][1]["tolerance"] == GROSS_TOLERANCES.max_diff_of_range
    assert report["gate"]["sent_back"], "the destructive list passes only with weights sent back"
    assert (tmp_path / "out" / "saved_model.pb").is_file()


def test_a_failing_verdict_under_the_gate_exits_3_and_names_the_outputs(output_kinds_module, sample_file, tmp_path,
                                                                        capsys):
    # The box head's bias turned into a subtraction: a loss no weight sent back explains.
    beyond_the_gate = "rename_op(old_op_name=AddV2, new_op_name=Sub) " + DESTRUCTIVE
    code = main([str(output_kinds_module), str(tmp_path / "out"), "--transforms", beyond_the_gate,
                 "--sample-inputs", str(sample_file), "--min-agreement", "0.9", "--report", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert code == 3 and len(errors) == 1, captured.err
    assert "signature 'serving_default' output 'box' (regression): rms diff of range " in errors[0]
    report = json.loads((tmp_path / "r.json").read_text())  # --min-agreement is the agreement bound
    assert report["comparison"]["serving_default"]["probabilities"]["tolerance"] == 0.9
    assert errors[0].endswith(f"{tmp_path / 'out'} not written")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "code", "message"),
    [
        ("boxes=class", 1, "optimise_saved_model: error: output kind for 'boxes': no compared signature has that "
                           "output"),
        ("box=vector", 2, "optimise_saved_model: error: argument --output-kind: 'box=vector': unknown kind 'vector'"),
        ("box", 2, "optimise_saved_model: error: argument --output-kind: 'box' is not NAME=KIND"),
    ],
    ids=["unknown_output", "unknown_kind", "malformed"],
)
def test_a_bad_output_kind_is_one_line_and_writes_nothing(flag, code, message, output_kinds_module, tmp_path, capsys):
    argv = [str(output_kinds_module), str(tmp_path / "out"), "--transforms", LOSSLESS, "--output-kind", flag,
            "--frozen-dir", str(tmp_path / "frozen"), "--report", str(tmp_path / "report.json")]
    if code == 2:
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
    else:
        assert main(argv) == code
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(message)
    assert list(tmp_path.iterdir()) == []
