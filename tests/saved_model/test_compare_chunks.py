"""The comparison, the gate and calibration call a model on at most ``chunk_bytes`` of input rows
at a time: on a published model (mtcnn RNet, 24 x 24 x 3 patches, 6,912 bytes a row) a chunk of a
few rows forces several calls, and every figure of the report is the same as with one call."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from serving_optimiser.chunks import DEFAULT_CHUNK_BYTES, check_memory, output_bytes
from serving_optimiser.errors import UserError
from serving_optimiser.saved_model import compare_saved_models, optimise_saved_model

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("published_models")]

WEIGHTS = "fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms quantize_weights " \
          "strip_unused_nodes"


@pytest.fixture(scope="module")
def rnet():
    from published_models import load

    return load("mtcnn_rnet")


def _calls(caplog) -> list[int]:
    """Calls per model of each signature compared, from the comparison's log lines."""
    return [int(m.group(1)) for r in caplog.records
            if (m := re.search(r"on \d+ rows in (\d+) calls? per model", r.getMessage()))]


def _figures(report: dict) -> dict:
    """The comparison's figures, without the timings that differ from run to run."""
    return {key: report[key] for key in ("comparison", "failing_outputs", "verdict", "size_bytes", "gate")
            if key in report}


def _assert_same(chunked, whole, where: str = "report") -> None:
    """Equal structure, names, kinds and verdicts; floats within 1e-5 relative or 1e-6 absolute
    (a few float32 ulps of outputs near 1). oneDNN and Eigen block a convolution by its batch
    size, so 3-row calls sum in another order than a 16-row call. Seen on mtcnn RNet: ~5e-8
    relative on the box RMS with oneDNN on; face_prob's max |diff| (a difference of two
    probabilities near 1) moved by 4e-9 with oneDNN off and 6.3e-8 under ONEDNN_MAX_CPU_ISA=AVX2.
    Never enough to move a verdict."""
    if isinstance(whole, dict):
        assert isinstance(chunked, dict) and sorted(chunked) == sorted(whole), where
        for key in whole:
            _assert_same(chunked[key], whole[key], f"{where}/{key}")
    elif isinstance(whole, list):
        assert isinstance(chunked, list) and len(chunked) == len(whole), where
        for index, (a, b) in enumerate(zip(chunked, whole)):
            _assert_same(a, b, f"{where}[{index}]")
    elif isinstance(whole, float) and not isinstance(whole, bool):
        assert chunked == pytest.approx(whole, rel=1e-5, abs=1e-6), where
    else:
        assert chunked == whole, where


def test_a_small_chunk_gives_the_same_comparison_in_several_calls(rnet, tmp_path, caplog):
    inputs = {rnet.signature: {name: np.array(values) for name, values in rnet.inputs.items()}}
    row_bytes = sum(v[0].nbytes for v in rnet.inputs.values())
    out = tmp_path / "weights"
    optimise_saved_model(rnet.saved_model, out, WEIGHTS, sample_inputs=inputs, compare=False)
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        whole = compare_saved_models(rnet.saved_model, out, inputs, chunk_bytes=None)
        assert _calls(caplog) == [1]
        caplog.clear()
        chunked = compare_saved_models(rnet.saved_model, out, inputs, chunk_bytes=5 * row_bytes)
        assert _calls(caplog) == [-(-rnet.rows // 5)]  # ceil: the last chunk holds the rest
    assert rnet.rows > 10
    _assert_same(chunked, whole, "comparison")
    assert DEFAULT_CHUNK_BYTES >= rnet.rows * row_bytes  # so the default is one call: figures as before


def test_optimise_saved_model_with_a_small_chunk_writes_the_same_report(rnet, tmp_path, caplog):
    half = rnet.rows // 2
    decide = {rnet.signature: {n: np.array(v[:half]) for n, v in rnet.inputs.items()}}
    judge = {rnet.signature: {n: np.array(v[half:]) for n, v in rnet.inputs.items()}}
    row_bytes = sum(v[0].nbytes for v in rnet.inputs.values())
    reports = {}
    for name, chunk_bytes in (("default", DEFAULT_CHUNK_BYTES), ("tiny", 3 * row_bytes)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="serving_optimiser"):
            reports[name] = optimise_saved_model(rnet.saved_model, tmp_path / name, WEIGHTS, sample_inputs=judge,
                                                 calibration_inputs=decide, chunk_bytes=chunk_bytes)
        calls = _calls(caplog)
        assert calls and all(c == (1 if name == "default" else -(-(rnet.rows - half) // 3)) for c in calls)
    _assert_same(_figures(reports["tiny"]), _figures(reports["default"]))


def test_chunk_bytes_below_one_is_refused_before_anything_loads(rnet, tmp_path):
    with pytest.raises(UserError, match="chunk_bytes must be at least 1, found 0"):
        optimise_saved_model(rnet.saved_model, tmp_path / "out", WEIGHTS, chunk_bytes=0)
    assert not (tmp_path / "out").exists()


def test_outputs_that_would_not_fit_stop_with_one_line_naming_what_to_lower():
    # 200,000 rows of a 48 x 48 x 16 float output, twice (both models): ~54.9 GiB.
    needed = 2 * output_bytes({"features": ("float32", [None, 48, 48, 16])}, 200_000)
    assert needed == 2 * 200_000 * 48 * 48 * 16 * 4
    with pytest.raises(UserError) as raised:
        check_memory(needed, "the sample inputs of signature 'serving_default' hold 200000 rows: the outputs of "
                     "both models", "use fewer rows (--sample-inputs)", available=8 * 2**30)
    assert str(raised.value) == ("the sample inputs of signature 'serving_default' hold 200000 rows: the outputs "
                                 "of both models need ~54.9 GiB, 8.0 GiB available; use fewer rows (--sample-inputs)")
    check_memory(needed, "unused", "unused", available=needed)  # exactly enough fits



def test_the_cli_takes_chunk_bytes(rnet, tmp_path, capsys):
    """--chunk-bytes reaches the comparison: stderr says how many calls, the report is the default's."""
    import json

    from serving_optimiser.cli.optimise_saved_model import main

    samples = tmp_path / "rows.npz"
    np.savez(samples, **{name: np.array(values) for name, values in rnet.inputs.items()})
    row_bytes = sum(v[0].nbytes for v in rnet.inputs.values())
    reports = {}
    for name, extra in (("default", []), ("tiny", ["--chunk-bytes", str(4 * row_bytes)])):
        code = main([str(rnet.saved_model), str(tmp_path / name), "--transforms", WEIGHTS, "--sample-inputs",
                     str(samples), "--report", str(tmp_path / f"{name}.json"), *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        calls = 1 if name == "default" else -(-rnet.rows // 4)
        assert f"on {rnet.rows} rows in {calls} call{'s' if calls > 1 else ''} per model" in captured.err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    _assert_same(_figures(reports["tiny"])["comparison"], _figures(reports["default"])["comparison"])
    with pytest.raises(SystemExit) as raised:
        main([str(rnet.saved_model), str(tmp_path / "bad"), "--chunk-bytes", "0"])
    assert raised.value.code == 2 and "--chunk-bytes: expected an integer >= 1, got '0'" in capsys.readouterr().err
