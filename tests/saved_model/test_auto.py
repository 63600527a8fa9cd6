"""--auto: every candidate list through the gate, timed side by side with the original, the best
passing one written by the objective's rules (5 % to beat the original). The choice is tested on
given figures (timings are not asserted: the machine is shared); one real run checks the flow."""

import pytest

from serving_optimiser.saved_model.auto import CANDIDATES, ORIGINAL, Candidate, auto_optimise, candidates_table, choose
from serving_optimiser.saved_model.errors import SavedModelError


def field(*rows) -> list[Candidate]:
    return [Candidate(ORIGINAL)] + [Candidate(name, size_ratio=size, time_ratio=time, verdict=verdict)
                                    for name, size, time, verdict in rows]


@pytest.mark.parametrize(("objective", "rows", "expected"), [
    ("size", [("lossless", 0.99, 0.97, "pass"), ("weights", 0.25, 1.0, "pass"), ("int8", 0.26, 0.7, "pass")],
     "weights"),
    ("size", [("weights", 0.25, 1.02, "pass"), ("int8", 0.26, 0.7, "pass")], "int8"),  # weights slower: out
    ("size", [("weights", 0.25, 0.9, "fail"), ("lossless", 0.97, 0.9, "pass")], ORIGINAL),  # under 5 % smaller
    ("latency", [("weights", 0.25, 0.99, "pass"), ("int8", 0.26, 0.7, "pass"), ("int8_b", 0.26, 0.69, "pass")],
     "int8_b"),
    ("latency", [("weights", 0.25, 0.96, "pass"), ("lossless", 0.99, 0.97, "pass")], ORIGINAL),  # under 5 % faster
    ("latency", [("bigger", 1.2, 0.5, "pass"), ("int8", 0.3, 0.8, "fail")], ORIGINAL),
], ids=["size-smallest", "size-not-slower", "size-5-percent", "latency-fastest", "latency-5-percent",
        "latency-not-bigger-and-passing"])
def test_choose_follows_the_objectives_rules(objective, rows, expected):
    assert choose(field(*rows), objective).name == expected


def test_an_unknown_objective_is_named():
    with pytest.raises(SavedModelError, match="objective 'speed' is unknown"):
        choose(field(), "speed")


def test_auto_tries_every_candidate_and_writes_a_passing_one(tmp_path, wide_mlp):
    from saved_model.models import wide_mlp_inputs

    samples = {"serving_default": wide_mlp_inputs(512, seed=1)}
    report = auto_optimise(wide_mlp, tmp_path / "out", sample_inputs=samples, objective="size",
                           serving_batch_size=8)
    rows = {row["name"]: row for row in report["candidates"]}
    assert list(rows) == [ORIGINAL, *CANDIDATES]
    # Without calibration inputs the int8 lists are skipped, saying why.
    assert rows["int8"]["verdict"] == "skipped" and "calibration" in rows["int8"]["reason"]
    assert rows["lossless"]["verdict"] == "pass" and rows["lossless"]["size_ratio"] < 1.05
    assert rows["weights_8bit_per_tensor"]["size_ratio"] < 0.5
    written = rows[report["written"]]
    assert written["verdict"] == "pass" and (tmp_path / "out" / "saved_model.pb").is_file()
    assert report["winner"] in (ORIGINAL, "weights_8bit_per_tensor", "weights_8bit_per_channel", "lossless")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".auto-")]  # candidates cleaned up
    table = candidates_table(report)
    assert table.splitlines()[0].split() == ["candidate", "size", "time@8", "verdict", "worst", "output"]
    assert "<- written" in table and f"objective size: {report['winner']}" in table


def test_auto_needs_sample_inputs(tmp_path, wide_mlp):
    with pytest.raises(SavedModelError, match="needs sample inputs"):
        auto_optimise(wide_mlp, tmp_path / "out", sample_inputs=None)
    assert not (tmp_path / "out").exists()


def test_without_onednn_the_int8_candidates_are_skipped_saying_why(tmp_path, wide_mlp, monkeypatch):
    """No traceback where oneDNN is off (an AVX2-only CPU): the int8 lists are skipped, named."""
    from saved_model.models import wide_mlp_inputs

    import serving_optimiser.graph_transforms.transforms._int8 as int8

    monkeypatch.setattr(int8, "int8_kernels_available", lambda: False)
    samples = {"serving_default": wide_mlp_inputs(256, seed=1)}
    report = auto_optimise(wide_mlp, tmp_path / "out", sample_inputs=samples, calibration_inputs=samples,
                           serving_batch_size=8)
    rows = {row["name"]: row for row in report["candidates"]}
    for name in ("int8", "int8_small_batch"):
        assert rows[name]["verdict"] == "skipped" and "TF_ENABLE_ONEDNN_OPTS=1" in rows[name]["reason"]
    assert rows[report["written"]]["verdict"] == "pass"
