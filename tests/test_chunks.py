"""Rows streamed through a model in calls bounded in bytes, and out of memory as one line."""

import numpy as np
import pytest

from serving_optimiser.chunks import call_in_chunks, capped_rows, row_bytes, rows_per_call
from serving_optimiser.errors import UserError
from serving_optimiser.runner import EXIT_ERROR, run


def images(rows: int) -> dict[str, np.ndarray]:
    return {"image": np.arange(rows * 48 * 48 * 3, dtype=np.float32).reshape(rows, 48, 48, 3),
            "id": np.arange(rows, dtype=np.int64)}


def test_row_bytes_sums_every_input():
    assert row_bytes(images(5)) == 48 * 48 * 3 * 4 + 8
    assert row_bytes({"features": np.zeros((100_000, 4), np.float32)}) == 16


def test_iris_batch_stays_one_call_and_images_split_by_bytes():
    calls = []

    def model(inputs):
        calls.append(len(inputs["id"]))
        return {"score": inputs["image"].reshape(len(inputs["id"]), -1).sum(axis=1), "id": inputs["id"] * 2}

    iris = {"id": np.arange(100_000, dtype=np.int64)}
    call_in_chunks(lambda inputs: calls.append(len(inputs["id"])) or {"id": inputs["id"]}, iris, 16 * 2**20)
    assert calls == [100_000]
    calls.clear()
    batch = images(10)
    chunked = call_in_chunks(model, batch, chunk_bytes=3 * row_bytes(batch))
    assert calls == [3, 3, 3, 1]
    whole = model(batch)
    assert sorted(chunked) == ["id", "score"]
    np.testing.assert_array_equal(chunked["score"], whole["score"])
    np.testing.assert_array_equal(chunked["id"], np.arange(10) * 2)


def test_a_row_larger_than_the_chunk_is_one_row_per_call():
    assert rows_per_call(images(4), chunk_bytes=10) == 1


def test_an_output_without_a_row_per_input_row_cannot_be_chunked():
    with pytest.raises(UserError, match="output 'total' has shape \\[\\] for 3 input rows"):
        call_in_chunks(lambda inputs: {"total": np.float32(inputs["image"].sum())}, images(5),
                       chunk_bytes=3 * row_bytes(images(1)), where="face_net")


@pytest.mark.parametrize(("rows", "per_row", "limit", "expected"),
                         [(100_000, 16, 256 * 2**20, 100_000), (100_000, 27_648, 256 * 2**20, 9709), (5, 10, 1, 1)],
                         ids=["iris-unchanged", "48x48x3-capped", "at-least-one"])
def test_capped_rows(rows, per_row, limit, expected):
    assert capped_rows(rows, per_row, limit) == expected


def test_out_of_memory_is_one_line_naming_what_to_lower(capsys):
    def main():
        raise MemoryError("Unable to allocate 2.8 GiB for an array")

    assert run("reference", main, memory_hint="lower evaluate.chunk_bytes") == EXIT_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["reference: error: out of memory (MemoryError: Unable to allocate 2.8 GiB for an array); "
                     "lower evaluate.chunk_bytes"]


def test_tensorflows_resource_exhausted_is_one_line_too(capsys):
    import tensorflow as tf

    def main():
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[100000,48,48,28]")

    assert run("reference", main, memory_hint="lower evaluate.chunk_bytes") == EXIT_ERROR
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("reference: error: out of memory (ResourceExhaustedError: OOM")
    assert err[0].endswith("; lower evaluate.chunk_bytes")
