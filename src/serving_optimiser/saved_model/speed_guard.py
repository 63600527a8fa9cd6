"""The speed guard: int8 only where it is faster at the batch size a model is served at, on
this machine (``optimise_saved_model(..., serving_batch_size=N)``, ``--serving-batch-size N``).

int8 pays for its quantize and dequantize steps with cheaper multiply-adds, so it wins on large
batches and can lose on small ones; where the break-even lies depends on the layers, their
chaining, the CPU and its kernels, so it is measured, not modelled. Two measurements:

* each candidate layer alone (:func:`time_layers`): cut out of the graph (its input becomes a
  Placeholder; weights, bias and activation come with it), rewritten by the transform alone,
  both versions in one session, interleaved round by round in a seeded order
  (:mod:`serving_optimiser.timing`). An isolated layer pays a quantize step that a chain of
  int8 layers does not, so this figure only orders the layers;
* the whole model (:func:`time_against_original`): the converted SavedModel against the
  original, called as the comparison calls them, at the serving batch size. It decides: while
  the int8 model is not faster, the int8 layer with the worst isolated ratio goes back to float.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, tensor_shape_pb2, types_pb2

from ..graph_transforms.calibration import Calibration, LayerProbe
from ..graph_transforms.graph_utils import node_map, parse_input

log = logging.getLogger(__name__)

DEFAULT_ROUNDS = 7
ROWS_PER_ROUND = 2048  # as the latency stages: small batches get more calls per round
MAX_CALLS_PER_ROUND = 20


def layer_graph(graph_def: graph_pb2.GraphDef, input_tensor: str, output_tensor: str) -> graph_pb2.GraphDef | None:
    """The nodes that compute ``output_tensor`` from ``input_tensor`` and constants only, with the
    input's node turned into a float Placeholder of the same name; None when the layer reads
    another input (it cannot be timed alone) or its input is not a node's first output."""
    is_control, input_node, index = parse_input(input_tensor)
    if is_control or index != 0:
        return None
    nodes = node_map(graph_def)
    keep, stack = set(), [parse_input(output_tensor)[1]]
    while stack:
        name = stack.pop()
        if name in keep or name not in nodes:
            continue
        keep.add(name)
        if name != input_node:
            stack.extend(parse_input(i)[1] for i in nodes[name].input if not i.startswith("^"))
    if input_node not in keep or any(nodes[n].op == "Placeholder" for n in keep - {input_node}):
        return None
    if any(nodes[n].op in ("Enter", "Exit", "Switch", "Merge", "NextIteration") for n in keep):
        return None
    cut = graph_pb2.GraphDef()
    cut.versions.CopyFrom(graph_def.versions)
    cut.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name not in keep:
            continue
        if node.name == input_node:
            placeholder = node_def_pb2.NodeDef(name=node.name, op="Placeholder")
            placeholder.attr["dtype"].type = types_pb2.DT_FLOAT
            placeholder.attr["shape"].shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(unknown_rank=True))
            cut.node.append(placeholder)
        else:
            copied = cut.node.add()
            copied.CopyFrom(node)
            del copied.input[:]
            copied.input.extend(i for i in node.input if not i.startswith("^") or i[1:] in keep)
    return cut


class _SessionCall:
    """One graph in its own session, fed one array (TensorFlow's default threads: as served)."""

    def __init__(self, graph_def: graph_pb2.GraphDef, input_tensor: str, output_tensor: str, x: np.ndarray) -> None:
        import tensorflow as tf

        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        self.session = tf.compat.v1.Session(graph=graph)
        self.fetch = graph.get_tensor_by_name(_tensor_name(output_tensor))
        self.feed = {graph.get_tensor_by_name(_tensor_name(input_tensor)): x}

    def __call__(self) -> None:
        self.session.run(self.fetch, self.feed)

    def close(self) -> None:
        self.session.close()


def _calls(batch_size: int) -> int:
    return max(1, min(MAX_CALLS_PER_ROUND, ROWS_PER_ROUND // batch_size))


def _tensor_name(tensor: str) -> str:
    return tensor if ":" in tensor else f"{tensor}:0"


def time_layers(
    graph_def: graph_pb2.GraphDef,
    transform,
    calibration: Calibration,
    probes: Sequence[LayerProbe],
    input_shapes: Mapping[str, tuple[int, ...]],
    batch_size: int,
    rounds: int = DEFAULT_ROUNDS,
    seed: int = 0,
) -> dict[str, float]:
    """Layer name -> its int8 time over its float time at ``batch_size`` rows (median of per-round
    ratios), for each probe that can be cut out and that ``transform`` (a ParsedTransform)
    rewrites on its own. ``input_shapes`` are the shapes the calibration saw at each probe's
    input; rows become ``batch_size``, values uniform over the calibrated input range."""
    from ..graph_transforms.engine import apply_transform
    from ..timing import TimedModel, call_timer, interleaved_rounds, round_ratio

    rng = np.random.default_rng(seed)
    ratios: dict[str, float] = {}
    calls = _calls(batch_size)
    for probe in probes:
        cut = layer_graph(graph_def, probe.input_tensor, probe.output_tensor)
        shape = input_shapes.get(probe.input_tensor)
        if cut is None or shape is None:
            log.info("timing %s: layer '%s' cannot be cut out of the graph; not timed", transform.name, probe.layer)
            continue
        input_node, output_node = parse_input(probe.input_tensor)[1], parse_input(probe.output_tensor)[1]
        # The transform refuses ranges of nodes its graph lacks: hand it this layer's only.
        names = {node.name for node in cut.node}
        own = Calibration({name: pair for name, pair in calibration.ranges.items() if name in names})
        quantized = apply_transform(cut, transform, [input_node], [output_node], own)
        if not any(node.op.startswith("Quantized") for node in quantized.node):
            log.info("timing %s: layer '%s' is not rewritten on its own; not timed", transform.name, probe.layer)
            continue
        low, high = calibration.ranges.get(probe.layer, (0.0, 1.0))
        x = rng.uniform(low, high, (batch_size, *shape[1:])).astype(np.float32)
        sides = {"float": _SessionCall(cut, probe.input_tensor, probe.output_tensor, x),
                 "int8": _SessionCall(quantized, probe.input_tensor, probe.output_tensor, x)}
        try:
            models = [TimedModel(name, call_timer(call), 0.0) for name, call in sides.items()]
            for model in models:
                model.timer(batch_size, 2)  # oneDNN's first run at this shape
            times = interleaved_rounds(models, batch_size, calls, rounds, rng)
        finally:
            for call in sides.values():
                call.close()
        ratios[probe.layer] = round_ratio(times["int8"], times["float"])
        log.info("timing %s: layer '%s' int8 takes %.2f x its float time at batch %d", transform.name,
                 probe.layer, ratios[probe.layer], batch_size)
    return ratios


def _batch_of(feeds: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` rows of every input, repeated when there are fewer."""
    batch = {}
    for name, array in feeds.items():
        array = np.asarray(array)
        repeats = -(-batch_size // max(1, len(array)))
        batch[name] = np.concatenate([array] * repeats)[:batch_size] if repeats > 1 else array[:batch_size]
    return batch


class OriginalTimer:
    """The original SavedModel, loaded once, timed against each converted candidate at one batch
    size on one signature's rows (the first signature, by key, that the rows feed)."""

    def __init__(self, original_dir, inputs: Mapping[str, Mapping[str, np.ndarray]], tags, batch_size: int,
                 rounds: int = DEFAULT_ROUNDS, seed: int = 0) -> None:
        import tensorflow as tf

        from .compare import _as_tensor
        from .errors import tensorflow_errors
        from .reader import read_meta_graph, signature_info_from_proto

        self.key = min(inputs)
        self.tags, self.batch_size, self.rounds, self.seed = list(tags), batch_size, rounds, seed
        meta_graph = read_meta_graph(str(original_dir), self.tags)
        signature = signature_info_from_proto(self.key, meta_graph.signature_def[self.key])
        self.tensors = {name: _as_tensor(signature, name, value)
                        for name, value in _batch_of(inputs[self.key], batch_size).items()}
        with tensorflow_errors(str(original_dir), "loading"):
            self.original = tf.saved_model.load(str(original_dir), tags=self.tags).signatures[self.key]

    def ratio(self, converted_dir) -> float:
        """The converted model's time over the original's at the batch size (median of per-round
        ratios of each round's median call)."""
        import tensorflow as tf

        from ..timing import TimedModel, call_timer, interleaved_rounds, round_ratio
        from .errors import tensorflow_errors

        with tensorflow_errors(str(converted_dir), "loading"):
            converted = tf.saved_model.load(str(converted_dir), tags=self.tags).signatures[self.key]

        def call(function):
            return lambda: [value.numpy() for value in function(**self.tensors).values()]

        models = [TimedModel("original", call_timer(call(self.original)), 0.0),
                  TimedModel("converted", call_timer(call(converted)), 0.0)]
        for model in models:
            model.timer(self.batch_size, 2)  # first calls at this shape: tracing, oneDNN's primitives
        times = interleaved_rounds(models, self.batch_size, _calls(self.batch_size), self.rounds,
                                   np.random.default_rng(self.seed))
        return round_ratio(times["converted"], times["original"])
