"""Training whose float sums are fixed by the graph, not by the CPU's cache sizes.

TensorFlow's x86 wheel runs MatMul as an Eigen tensor contraction that calls oneDNN's sgemm once
per depth slice, and Eigen picks the slice depth from the L1 size the CPU reports through CPUID
(``evaluateProductBlockingSizesHeuristic``): at most 320 when the contraction runs on several
threads, ``(L1 - 256) / 80`` rounded down to 8 when it runs on one (400 on a 32 KiB L1d, 608 on a
48 KiB one). A 512-deep sum is one slice on an Intel Xeon with 48 KiB and two on an AMD EPYC with
32 KiB, so the sums associate differently from the first step and the trained weights differ.
Any depth of 320 or less is one slice on every x86-64 CPU with an L1d of 32 KiB or more.

So every contraction of a training step here is at most :data:`CONTRACTION_DEPTH_BOUND` deep:
:func:`bounded_matmul` splits the depth into slices of that size, summed left to right, in the
forward pass and in both gradients (dX = dY·Wᵀ contracts over the layer's outputs, dW = Xᵀ·dY
over the batch's rows). :func:`contraction_depths` reads a traced graph's contractions, so a test
can prove the bound on the whole training step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

# Below Eigen's multi-threaded cap (320) and the single-threaded depth on a 32 KiB L1d (400), so
# ceil(depth / slice) is 1 on every x86-64 CPU this project runs on, whatever the thread count.
CONTRACTION_DEPTH_BOUND = 256

CONTRACTION_OPS = frozenset({"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "_FusedMatMul"})


def sliced_matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False, depth: int | None = None,
                  bound: int = CONTRACTION_DEPTH_BOUND):
    """``a @ b`` (with the given transposes) as a left-to-right sum of MatMuls at most ``bound`` deep.

    ``depth`` is the contraction's length when the graph does not know it (the batch's rows in
    dW): slices past the real end are empty and add exact zeros.
    """
    import tensorflow as tf

    axis_of_a = 0 if transpose_a else 1
    if depth is None:
        depth = a.shape[axis_of_a]
    if depth is None:
        raise ValueError("sliced_matmul: the contraction's length is unknown; pass depth")

    def depth_slice(tensor, along_rows: bool, start: int, stop: int):
        return tensor[start:stop] if along_rows else tensor[:, start:stop]

    total = None
    for start in range(0, depth, bound):
        stop = min(start + bound, depth)
        if start == 0 and stop == depth and depth <= bound:
            part = tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
        else:
            part = tf.linalg.matmul(
                depth_slice(a, transpose_a, start, stop),
                depth_slice(b, not transpose_b, start, stop),
                transpose_a=transpose_a,
                transpose_b=transpose_b,
            )
        total = part if total is None else total + part  # fixed order: ((s0 + s1) + s2) ...
    return total


def bounded_matmul(inputs, kernel, max_rows: int, bound: int = CONTRACTION_DEPTH_BOUND):
    """``inputs @ kernel`` whose forward pass and both gradients contract at most ``bound`` deep.

    ``max_rows`` is the largest batch the gradient will see (the training batch size): dW
    contracts over the rows, which the traced graph leaves unknown.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def matmul(x, w):
        def gradient(dy):
            rows = tf.shape(x)[0]
            with tf.control_dependencies([
                tf.debugging.assert_less_equal(rows, max_rows, message="bounded_matmul: batch above max_rows")
            ]):
                dx = sliced_matmul(dy, w, transpose_b=True, bound=bound)
                dw = sliced_matmul(x, dy, transpose_a=True, depth=max_rows, bound=bound)
            return dx, dw

        return sliced_matmul(x, w, bound=bound), gradient

    return matmul(inputs, tf.convert_to_tensor(kernel))


def bounded_dense_class():
    """A Keras ``Dense`` layer whose matmul is :func:`bounded_matmul`: the same weights, names and
    layout as ``keras.layers.Dense`` (kernel ``[inputs, units]``, bias ``[units]``)."""
    import keras

    class BoundedDense(keras.layers.Dense):
        def __init__(self, units: int, max_rows: int, **kwargs) -> None:
            super().__init__(units, **kwargs)
            self.max_rows = max_rows

        def call(self, inputs, training=None):
            outputs = bounded_matmul(inputs, self.kernel, self.max_rows)
            if self.use_bias:
                outputs = keras.ops.add(outputs, self.bias)
            return self.activation(outputs)

        def get_config(self):
            return {**super().get_config(), "max_rows": self.max_rows}

    return BoundedDense


@contextlib.contextmanager
def graph_as_traced() -> Iterator[None]:
    """Run the block's tf.functions as traced: Grappler off.

    Grappler's arithmetic optimiser rewrites ``a / sqrt(b)`` (Adagrad's update) into
    ``a * rsqrt(b)``, and Eigen's float rsqrt is the CPU's ``rsqrtps`` approximation plus one
    Newton step, whose last bits differ between Intel and AMD (measured here: 45 % of 100,000
    quotients differ from the correctly rounded ones); it also regroups chains of adds, which
    would undo the fixed order above. With Grappler off the graph a test walks is the graph
    that runs. The options are restored afterwards, since they are process-wide.
    """
    import tensorflow as tf

    previous = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": bool(previous.get("disable_meta_optimizer", False))}
        )


def contraction_depths(graph) -> dict[str, int | None]:
    """Each contraction op in ``graph`` and its nested functions, by name, with its depth (None
    where the graph does not know it)."""
    depths: dict[str, int | None] = {}
    seen: set[int] = set()

    def visit(current) -> None:
        if id(current) in seen:
            return
        seen.add(id(current))
        for operation in current.get_operations():
            if operation.type in CONTRACTION_OPS:
                depths[f"{current.name}/{operation.name}"] = _depth(operation)
        for function in getattr(current, "_functions", {}).values():
            nested = getattr(function, "graph", None)
            if nested is not None:
                visit(nested)

    visit(graph)
    return depths


def _depth(operation) -> int | None:
    first = operation.inputs[0].shape
    if first.rank is None:
        return None
    if operation.type == "Einsum":
        equation = operation.get_attr("equation").decode()
        inputs, output = equation.split("->")
        left = inputs.split(",")[0]
        contracted = [axis for axis, letter in enumerate(left) if letter not in output]
        sizes = [first[axis] for axis in contracted]
        return None if any(size is None for size in sizes) else math.prod(sizes)
    transpose = "transpose_a" if operation.type in ("MatMul", "_FusedMatMul") else "adj_x"
    axis = -2 if operation.get_attr(transpose) else -1
    return first[axis]
